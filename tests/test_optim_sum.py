"""``Optimizer.step_sum``: a step from the mean of several gradients (a server's round).

Every optimizer must move its parameters exactly as ``step()`` with the mean gradient
does; SGD folds the sum into its momentum pass, the others sum first. No torch needed.
"""

from __future__ import annotations

import numpy as np
import pytest

from distnet.nn.module import Parameter
from distnet.optim import build_optimizer

SHAPES = {"w": (7, 5), "b": (5,), "v": (3, 7)}
CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.01}),
    ("momentum", {"lr": 0.05, "momentum": 0.9}),
    ("momentum", {"lr": 0.05, "momentum": 0.8, "weight_decay": 1e-3}),
    ("nesterov", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("momentum", {"lr": 0.05, "momentum": 0.9, "clip_norm": 0.5}),
    ("adam", {"lr": 0.01, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5}),
]


def params(dtype) -> dict[str, Parameter]:
    rng = np.random.default_rng(0)
    return {k: Parameter(rng.standard_normal(s).astype(dtype), k) for k, s in SHAPES.items()}


def parts_for(step: int, n: int, dtype) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(100 + step)
    return [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
            for _ in range(n)]


def run(name, config, dtype, n, fused, steps=6, mask=False):
    ps = params(dtype)
    if mask:
        ps["w"].mask = (np.arange(35).reshape(7, 5) % 3 != 0).astype(dtype)
    opt = build_optimizer(name, list(ps.items()), **config)
    for step in range(steps):
        parts = parts_for(step, n, dtype)
        if fused:
            opt.step_sum(parts, 1.0 / n)
        else:
            for k, p in ps.items():
                p.grad = sum(part[k] for part in parts) / dtype(n)
            opt.step()
    return {k: p.data for k, p in ps.items()}, opt


@pytest.mark.parametrize(("name", "config"), CASES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_step_sum_is_a_step_with_the_mean(name, config, n):
    want, ref = run(name, config, np.float64, n, fused=False)
    got, opt = run(name, config, np.float64, n, fused=True)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
    assert opt.step_count == ref.step_count
    for k, slots in ref.state.items():
        for slot, arr in slots.items():
            np.testing.assert_allclose(opt.state[k][slot], arr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "config"), CASES[:4])
def test_step_sum_float32_within_rounding(name, config):
    want, _ = run(name, config, np.float32, 2, fused=False)
    got, _ = run(name, config, np.float32, 2, fused=True)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-6, err_msg=k)


def test_masked_weights_stay_zero_under_step_sum():
    got, _ = run("momentum", {"lr": 0.05, "momentum": 0.9}, np.float64, 2, fused=True, mask=True)
    want, _ = run("momentum", {"lr": 0.05, "momentum": 0.9}, np.float64, 2, fused=False,
                  mask=True)
    assert not got["w"][np.arange(35).reshape(7, 5) % 3 == 0].any()
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-12)


def test_parts_are_only_read():
    ps = params(np.float32)
    opt = build_optimizer("momentum", list(ps.items()), lr=0.1, momentum=0.9, weight_decay=0.1)
    parts = parts_for(0, 2, np.float32)
    for part in parts:
        for a in part.values():
            a.flags.writeable = False  # frames from the network are read-only
    opt.step_sum(parts, 0.5)
    opt.step_sum(parts[:1])


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_wrong_part_is_refused_before_any_change(name):
    ps = params(np.float32)
    opt = build_optimizer(name, list(ps.items()), lr=0.1)
    before = {k: p.data.copy() for k, p in ps.items()}
    good, bad = parts_for(0, 2, np.float32)
    bad["v"] = bad["v"][:2]
    with pytest.raises(ValueError, match=r"'v': gradient part 1 has shape \(2, 7\)"):
        opt.step_sum([good, bad], 0.5)
    del bad["v"]
    with pytest.raises(ValueError, match="'v': gradient part 1 has shape None"):
        opt.step_sum([good, bad], 0.5)
    with pytest.raises(ValueError, match="at least one gradient"):
        opt.step_sum([], 1.0)
    for k, p in ps.items():
        np.testing.assert_array_equal(p.data, before[k])
    assert opt.step_count == 0


def two_steps(prepare, dtype=np.float32) -> dict[str, np.ndarray]:
    """Two rounds of three gradients through SGD with momentum and weight decay;
    ``prepare(opt, parts, step)`` may call prepare_sum (or anything) before each round."""
    ps = params(dtype)
    opt = build_optimizer("momentum", list(ps.items()), lr=0.05, momentum=0.9,
                          weight_decay=1e-3)
    for step in range(2):
        parts = parts_for(step, 3, dtype)
        prepare(opt, parts, step)
        opt.step_sum(parts, 1 / 3)
    return {k: p.data for k, p in ps.items()} | {f"{k}/v": opt.state[k]["momentum_buffer"]
                                                 for k in ps}


PREPARES = {
    "nothing": lambda opt, parts, step: None,
    "no gradient yet": lambda opt, parts, step: opt.prepare_sum([], 1 / 3),
    "the first": lambda opt, parts, step: opt.prepare_sum(parts[:1], 1 / 3),
    "one by one": lambda opt, parts, step: [opt.prepare_sum(parts[:k], 1 / 3)
                                            for k in range(3)],
    "all of them": lambda opt, parts, step: opt.prepare_sum(parts, 1 / 3),
    "out of order": lambda opt, parts, step: opt.prepare_sum(parts[1:2], 1 / 3),
    "copies": lambda opt, parts, step: opt.prepare_sum([dict(p) for p in parts[:1]], 1 / 3),
    "another scale": lambda opt, parts, step: opt.prepare_sum(parts[:1], 1 / 2),
    "a step between": lambda opt, parts, step: step == 1 or (opt.prepare_sum(parts[:1], 1 / 3),
                                                             opt.step_sum(parts[:1], 1.0)),
    "state reloaded": lambda opt, parts, step: (opt.prepare_sum(parts[:1], 1 / 3),
                                                opt.load_state_dict(opt.state_dict())),
}


@pytest.mark.parametrize("how", list(PREPARES))
def test_prepare_sum_never_changes_the_step(how):
    want = two_steps(PREPARES["nothing"])
    if how == "a step between":  # one more step in round 0: compare with that done plainly
        want = two_steps(lambda opt, parts, step: step == 1 or opt.step_sum(parts[:1], 1.0))
    got = two_steps(PREPARES[how])
    for k in want:  # bit for bit, float32
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_prepare_sum_leaves_parameters_and_state_alone():
    ps = params(np.float32)
    opt = build_optimizer("momentum", list(ps.items()), lr=0.05, momentum=0.9,
                          weight_decay=1e-3)
    opt.step_sum(parts_for(0, 2, np.float32), 0.5)
    before = {k: p.data.copy() for k, p in ps.items()}
    state = opt.state_dict()
    opt.prepare_sum(parts_for(1, 2, np.float32)[:1], 0.5)
    for k, p in ps.items():
        np.testing.assert_array_equal(p.data, before[k])
    for k, a in opt.state_dict().items():
        np.testing.assert_array_equal(a, state[k])


def test_a_round_shorter_than_what_was_prepared_starts_over():
    want = two_steps(PREPARES["nothing"])
    got = two_steps(lambda opt, parts, step: opt.prepare_sum(parts + parts[:1], 1 / 3))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_what_prepare_sum_took_is_not_read_again():
    """The point of preparing: step_sum only adds the parts that came later. Shown by
    changing a prepared part afterwards (the server never does; it copies a slot
    before its worker may write it): the step still has the value it prepared."""
    want = two_steps(PREPARES["nothing"])

    def prepare_then_scribble(opt, parts, step):
        opt.prepare_sum(parts[:2], 1 / 3)
        for p in parts[:2]:
            for a in p.values():
                a[...] = np.nan

    got = two_steps(prepare_then_scribble)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
