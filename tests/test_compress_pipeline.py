"""The compression pipeline and `distnet compress`, end to end on the small digits data."""

import json

import numpy as np
import pytest

from compression import dcz
from compression.pipeline import CompressionPlan, compress, parse_bits
from compression.report import format_report, layer_row, plot_weights
from distnet.checkpoint import save_checkpoint
from distnet.cli.main import main
from distnet.data import load_data
from distnet.models import build_model
from distnet.nn import CrossEntropyLoss
from distnet.optim import build_optimizer
from distnet.train import LocalUpdate, evaluate, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """lenet300 trained briefly on digits, and its checkpoint."""
    train, val, info = load_data("digits")
    model = build_model("lenet300", info["input_shape"], info["num_classes"], seed=0)
    opt = build_optimizer("momentum", model, lr=0.05)
    fit(model, train, None, epochs=4, batch_size=64, criterion=CrossEntropyLoss(),
        update=LocalUpdate(opt), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "digits.npz"
    save_checkpoint(path, model, opt, meta={"model": "lenet300", "data": info,
                                            "config": {"data": "digits", "seed": 0}})
    return path, train, val, info


def test_pipeline_prunes_shares_and_writes_an_exact_file(trained, tmp_path):
    from distnet.checkpoint import load_checkpoint

    path, train, val, info = trained
    model = load_checkpoint(path).model
    base = evaluate(model, val)["accuracy"]
    plan = CompressionPlan(prune="fc1:0.9,fc2:0.8,fc3:0.5", retrain_epochs=2,
                           share_bits="fc=5,fc1=4", finetune_epochs=1, augment="none")
    logs = []
    result = compress(model, train, val, plan, info={"meta": {"data": info}}, progress=False,
                      log=logs.append)
    report = result.report
    assert [s["stage"] for s in report["stages"]] == [
        "baseline", "prune", "retrain", "share", "finetune", "final"]
    assert len(logs) == 6 and report["accuracy"]["baseline"] == base
    assert report["file_bytes"] == len(result.blob)
    assert report["ratio"] == pytest.approx(4 * model.num_parameters() / len(result.blob))
    assert report["ratio"] > 15
    assert report["accuracy"]["final"] > 0.8
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["2.weight"]["kept_pct"] == pytest.approx(10, abs=0.1)
    assert rows["2.weight"]["codebook"] <= 16 and rows["4.weight"]["codebook"] <= 32
    assert rows["2.weight"]["weight_bits_pqh"] <= rows["2.weight"]["weight_bits_pq"] + 1e-9
    assert sum(r["bytes"] for r in report["layers"]) + report["header_bytes"] + report[
        "buffer_bytes"] == len(result.blob)  # the table accounts for every byte of the file
    assert 0 < report["header_bytes"] < 2000
    assert "total" in format_report(report)
    file = tmp_path / "m.dcz"
    file.write_bytes(result.blob)
    loaded = dcz.load_dcz(file)
    x = val.x[:200]
    model.eval()
    np.testing.assert_array_equal(loaded.model(x), model(x))
    assert evaluate(loaded.model, val)["accuracy"] == report["accuracy"]["final"]
    assert loaded.meta["data"]["input_shape"] == list(info["input_shape"])


def test_pipeline_gradual_global_quantize_lowrank(trained):
    from distnet.checkpoint import load_checkpoint

    path, train, val, _ = trained
    model = load_checkpoint(path).model
    plan = CompressionPlan(prune={"fc1": 0.8}, prune_mode="gradual", prune_steps=3,
                           retrain_epochs=2, quantize="int8", per_channel=True, augment="none")
    result = compress(model, train, val, plan, progress=False)
    assert [s["stage"] for s in result.report["stages"]] == [
        "baseline", "prune+retrain", "quantize", "final"]
    assert result.report["stages"][1]["sparsity"]["2.weight"] == pytest.approx(0.8, abs=1e-3)
    assert set(result.quantized) == {"2.weight", "4.weight", "6.weight"}
    model = load_checkpoint(path).model
    result = compress(model, train, val, CompressionPlan(prune=0.5, prune_mode="global",
                                                         lowrank="2:ratio=0.3", augment="none"),
                      progress=False)
    assert result.report["lowrank"]["2"]["applied"]
    assert [s["stage"] for s in result.report["stages"]][:3] == ["baseline", "lowrank", "prune"]
    model = load_checkpoint(path).model
    result = compress(model, train, val, CompressionPlan(prune_units="fc1:0.5,fc2:10",
                                                         retrain_epochs=1, augment="none"),
                      progress=False)
    assert model[2].weight.shape == (150, 64) and model[4].weight.shape == (90, 150)
    assert [s["stage"] for s in result.report["stages"]] == [
        "baseline", "prune-units", "retrain", "final"]
    assert result.report["stages"][-1]["params"] < result.report["stages"][0]["params"]


def test_parse_bits():
    from distnet import nn
    from distnet.nn.conv import Conv2d
    from distnet.nn.pool import MaxPool2d

    model = nn.Sequential(nn.Normalize(), Conv2d(1, 4, 3), MaxPool2d(2), Conv2d(4, 4, 3),
                          MaxPool2d(2), nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert parse_bits(model, "conv=8,fc=5") == {"1.weight": 8, "3.weight": 8, "6.weight": 5,
                                                "8.weight": 5}
    assert parse_bits(model, "conv=8,fc=5,fc1=4")["6.weight"] == 4
    assert parse_bits(model, 6)["1.weight"] == 6 and parse_bits(model, "3") == parse_bits(model, 3)
    with pytest.raises(KeyError, match="no prunable layer"):
        parse_bits(model, "fc9=3")
    with pytest.raises(ValueError, match="integer"):
        parse_bits(model, "fc=five")


def test_cli_compress_eval_and_sensitivity(trained, tmp_path, capsys):
    path = trained[0]
    out, rep, fig = tmp_path / "c.dcz", tmp_path / "r.json", tmp_path / "w.png"
    code = main(["compress", "--checkpoint", str(path), "--prune", "fc1:0.9,fc2:0.85",
                 "--retrain-epochs", "1", "--share-bits", "fc=5", "--finetune-epochs", "1",
                 "--augment", "none", "--out", str(out), "--report", str(rep),
                 "--figure", str(fig), "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and "compressed model" in text and "x smaller" in text
    report = json.loads(rep.read_text())
    assert report["file_bytes"] == out.stat().st_size
    pytest.importorskip("matplotlib")
    assert fig.stat().st_size > 0
    assert main(["eval", "--checkpoint", str(out)]) == 0
    acc = float(capsys.readouterr().out.split("accuracy:")[1].split("%")[0])
    assert acc == pytest.approx(100 * report["accuracy"]["final"], abs=0.006)
    assert main(["compress", "--checkpoint", str(path), "--sensitivity", "--levels",
                 "0.5,0.9", "--no-progress", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "proposed" in text and "--prune fc1:" in text and "fc3:" in text
    assert set(json.loads(rep.read_text())["proposal"]) == {"2.weight", "4.weight", "6.weight"}
    assert main(["compress", "--checkpoint", str(path)]) == 1
    assert "nothing to do" in capsys.readouterr().err


def test_report_rows_and_figure(tmp_path):
    row = layer_row({"name": "w", "shape": [10, 10], "size": 100, "kept": 10, "encoding": "book",
                     "book_size": 4, "book_bytes": 16, "index_coding": "huffman",
                     "index_bytes": 3, "index_nbits": 20, "index_width": 2, "value_bytes": 0,
                     "gap_bits": 4, "gap_symbols": 12, "gap_bytes": 5})
    assert row["weight_bits_pq"] == 2 and row["weight_bits_pqh"] == 2.0
    assert row["index_bits_pq"] == pytest.approx(4.8) and row["bytes"] == 24
    assert row["ratio_pqh"] == pytest.approx(400 / 24)
    ok = plot_weights(np.random.default_rng(0).normal(size=500), np.linspace(-2, 2, 8),
                      tmp_path / "h.png")
    assert ok == (tmp_path / "h.png").exists()
