import subprocess
import sys

import pytest
import tomllib

from distnet.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_eval(tmp_path, capsys):
    ckpt = tmp_path / "digits.npz"
    code, out, err = run_cli(capsys, "train", "--epochs", "2", "--out", str(ckpt),
                             "--metrics", str(tmp_path / "m.jsonl"), "--no-progress")
    assert code == 0, err
    assert "accuracy: " in out and ckpt.exists()
    train_acc = float(out.split("accuracy: ")[1].split("%")[0])
    assert train_acc > 85.0
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt))
    assert code == 0, err
    assert float(out.split("accuracy: ")[1].split("%")[0]) == pytest.approx(train_acc, abs=0.01)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--split", "all")
    assert code == 0, err
    assert "(1797 examples, all)" in out  # every example of the digits


def test_print_config_and_toml_file(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('model = "lenet5"\nlr = 0.5\n[train]\nepochs = 3\n')
    code, out, _ = run_cli(capsys, "train", "--config", str(job), "--lr", "0.25",
                           "--print-config")
    assert code == 0
    resolved = tomllib.loads(out)
    assert resolved["model"] == "lenet5" and resolved["epochs"] == 3
    assert resolved["lr"] == 0.25  # the command line wins over the file
    assert resolved["optimizer"] == "momentum"  # from the model's recipe


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "vgg"], "unknown model 'vgg'"),
    (["train", "--data", "mnist:/nonexistent"], "/nonexistent"),
    (["train", "--epochs", "-1"], "--epochs must be positive"),
    (["eval", "--checkpoint", "/nonexistent.npz"], "/nonexistent.npz"),
])
def test_errors_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_key_in_config_file(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text("learning_rate = 0.1\n")
    code, _, err = run_cli(capsys, "train", "--config", str(job))
    assert code == 1 and "unknown option 'learning_rate'" in err


def test_console_script_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "distnet.cli.main", "train", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "examples:" in out.stdout and "distnet train --model lenet5" in out.stdout
