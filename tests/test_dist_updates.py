"""The async update's timing of pulls, against a recording stand-in for PSClient."""

from __future__ import annotations

import numpy as np
import pytest

from distnet.dist.updates import AsyncUpdate
from distnet.nn.linear import Linear


class RecordingClient:
    """Answers at once; ``events`` lists what the update asked for, in order."""

    bytes_sent = bytes_received = 0

    def __init__(self) -> None:
        self.events: list[str] = []
        self.version = 0

    def push(self, grads, version):
        self.version += 1  # the server applies the push
        self.events.append("push")
        return ("push", self.version)

    def pull(self, since_version=None, out=None):
        self.events.append("pull")
        return ("pull", self.version)

    def wait(self, ticket):
        op, version = ticket
        self.events.append(f"wait {op}")
        return version if op == "push" else (version, {})


def run_steps(overlap: bool, steps: int = 2) -> RecordingClient:
    model = Linear(3, 2)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    client = RecordingClient()
    config = {"push_every": 1, "pull_every": 1, "pull_overlap": overlap}
    update = AsyncUpdate(model, client, config, lambda: 1.0, 0)
    for step in range(steps):
        update(step)
        client.events.append("-- step done")
    return client


@pytest.mark.parametrize("overlap", [True, False])
def test_async_pull_is_awaited_in_the_next_step_or_at_once(overlap: bool) -> None:
    events = run_steps(overlap).events
    first_step = events[:events.index("-- step done")]
    # the pull goes out after the push, on the same socket: its reply includes the push
    assert first_step.index("pull") > first_step.index("push")
    if overlap:  # the pull overlaps the next step's compute: awaited only then
        assert "wait pull" not in first_step
        assert "wait pull" in events[len(first_step):]
    else:
        assert first_step[-1] == "wait pull"
