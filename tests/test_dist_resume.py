"""A whole job restarted from its servers' checkpoints continues where it stopped."""

import json

import numpy as np
import pytest

from distnet.checkpoint import load_checkpoint
from distnet.cli.main import main

pytestmark = pytest.mark.mpi

JOB = ["--model", "lenet300", "--data", "synthetic:600", "--batch-size", "60", "--seed", "3",
       "--lr", "0.05", "--schedule", "constant", "--warmup-steps", "0", "--augment", "none",
       "--workers", "2", "--no-progress", "--timeout", "60"]


def params(path):
    return {k: v for k, v in load_checkpoint(path).model.state_dict().items()}


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_resumed_job_equals_an_uninterrupted_one(tmp_path, mpiexec, mode, capsys):
    straight, first, resumed = (tmp_path / n for n in ("straight", "first", "resumed"))
    ckpts = tmp_path / "server-ckpts"
    assert main(["train", "--mode", mode, *JOB, "--epochs", "2", "--run-dir", str(straight)]) == 0
    # one epoch, checkpointed when the job stops; then the same job asked for two epochs
    assert main(["train", "--mode", mode, *JOB, "--epochs", "1", "--run-dir", str(first),
                 "--checkpoint-dir", str(ckpts)]) == 0
    assert main(["train", "--mode", mode, *JOB, "--epochs", "2", "--run-dir", str(resumed),
                 "--checkpoint-dir", str(ckpts), "--resume"]) == 0
    capsys.readouterr()
    a, b = params(straight / "model.npz"), params(resumed / "model.npz")
    changed = params(first / "model.npz")
    assert any(not np.allclose(changed[k], b[k]) for k in b)  # the second run trained
    done = [json.loads((d / "result.json").read_text()) for d in (straight, first, resumed)]
    # the restarted job made exactly the updates the first one had not
    assert done[2]["server_version"] == done[0]["server_version"] == 2 * done[1]["server_version"]
    if mode == "sync":  # deterministic: bit-for-bit the run that was never interrupted
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:  # pushes arrive in a timing-dependent order: the same quality, not the same bits
        assert abs(done[2]["val_accuracy"] - done[0]["val_accuracy"]) <= 0.05
