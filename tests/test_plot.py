"""``distnet plot``: figures from a synthetic run directory (local + async ranks + compression)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from distnet.cli.main import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_795_000_000.0
STEPS_PER_EPOCH = 23


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _training_rows(common: dict[str, Any], t0: float, rng: np.random.Generator,
                   extra: Any = None, val: bool = True) -> list[dict[str, Any]]:
    """What fit writes: a step row every 10 steps and at each epoch's end, an epoch row."""
    rows, t = [], t0
    for epoch in (1, 2):
        for i in range(STEPS_PER_EPOCH):
            t += 0.004
            if i % 10 and i != STEPS_PER_EPOCH - 1:
                continue
            step = (epoch - 1) * STEPS_PER_EPOCH + i
            row = {"time": t, **common, "kind": "step", "epoch": epoch, "step": step,
                   "loss": 2.3 * np.exp(-step / 30) + 0.1 * rng.random(),
                   "samples_per_s": 9000 + 500 * rng.random()}
            rows.append({**row, **(extra(step) if extra else {})})
        summary = {"time": t + 0.01, **common, "kind": "epoch", "epoch": epoch,
                   "train_loss": 1.5 / epoch, "samples_per_s": 9200.0, "seconds": 0.09}
        if val:
            summary.update(val_accuracy=0.8 + 0.05 * epoch, val_loss=0.7 / epoch)
        rows.append(summary)
    return rows


def _async_extra(rng: np.random.Generator) -> Any:
    def extra(step: int) -> dict[str, Any]:
        if step == 0:  # the first record comes before any push is settled
            return {"version": 0, "bytes_sent": 202837, "bytes_received": 202752, "steps": 1}
        return {"push_wait_ms": 0.5 + rng.random(), "push_ms": 3 + 2 * rng.random(),
                "staleness": int(rng.integers(1, 5)), "pull_wait_ms": rng.random(),
                "version": 2 * step, "bytes_sent": 202702, "bytes_received": 202760,
                "steps": 10}
    return extra


def _report() -> dict[str, Any]:
    """A compression report as compression.report.build_report writes it (abridged)."""
    def row(name: str, shape: list[int], kept: float, wb: float, ib: float) -> dict[str, Any]:
        size = int(np.prod(shape))
        return {"name": name, "shape": shape, "weights": size, "kept_pct": kept,
                "encoding": "book", "bytes": int(size * kept / 100 * (wb + ib) / 8),
                "codebook": 8, "index_coding": "huffman", "weight_bits_pq": wb,
                "weight_bits_pqh": wb - 0.4, "gap_bits": 3, "index_bits_pq": ib,
                "index_bits_pqh": ib - 1, "ratio_pq": 30.0, "ratio_pqh": 36.0}

    stages = [{"stage": s, "accuracy": a, "loss": 0.5, "params": 100, "dcz_bytes": b,
               "seconds": 0.1} for s, a, b in (("baseline", 0.9, 460), ("prune", 0.86, 200),
                                               ("share", 0.85, 90), ("final", 0.85, 80))]
    return {"dense_bytes": 400, "file_bytes": 80, "ratio": 5.0, "header_bytes": 40,
            "buffer_bytes": 0, "weights_kept_pct": 40.0,
            "accuracy": {"baseline": 0.9, "final": 0.85, "drop_points": 5.0},
            "stages": stages, "layers": [row("0.weight", [16, 6], 40.0, 3.0, 4.0),
                                         row("0.bias", [16], 100.0, 16.0, 0.0)],
            "plan": {"prune": 0.6}, "codebooks": {"0.weight": [-0.3, -0.1, 0.1, 0.3]}}


def _compression(run: Path) -> None:
    """A shared layer in a .dcz, its report, and the dense checkpoint it started from."""
    from compression.dcz import save_dcz
    from distnet.nn import Linear, Sequential

    rng = np.random.default_rng(1)
    model = Sequential(Linear(6, 16))
    weight = model[0].weight
    dense = rng.normal(0, 0.2, weight.shape).astype(np.float32)
    mask = (np.abs(dense) > np.quantile(np.abs(dense), 0.6)).astype(np.float32)
    book = np.array([-0.3, -0.1, 0.1, 0.3], np.float32)
    nearest = book[np.abs(dense[..., None] - book).argmin(-1)]
    weight.data[...] = nearest
    weight.set_mask(mask)
    out = run / "compress"
    out.mkdir(parents=True)
    save_dcz(out / "model.dcz", model)
    np.savez(run / "local" / "model.npz", **{"model/0.weight": dense,
                                             "model/0.bias": np.zeros(16, np.float32)})
    (out / "report.json").write_text(json.dumps(_report()), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    run = tmp_path / "runs" / "demo"
    _write(run / "local" / "metrics.jsonl",
           _training_rows({"rank": 0, "mode": "local"}, T0, rng))
    (run / "local" / "config.toml").write_text('mode = "local"\ncodec = "none"\n')
    (run / "async").mkdir()
    (run / "async" / "config.toml").write_text('mode = "async"\ncodec = "fp16"\n')
    for worker in (0, 1):  # rank 0 is the server: workers are ranks 1 and 2
        common = {"rank": worker + 1, "mode": "async", "role": "worker", "worker": worker}
        _write(run / "async" / f"metrics.rank{worker + 1}.jsonl",
               _training_rows(common, T0 + 60 + 0.01 * worker, rng, _async_extra(rng),
                              val=worker == 0))
    _write(run / "async" / "metrics.rank0.jsonl", [{
        "time": T0 + 61, "rank": 0, "mode": "async", "role": "server", "kind": "server",
        "server_id": 0, "version": 92, "pushes_applied": 92,
        "staleness_hist": {"0": 1, "1": 33, "2": 22, "3": 24, "4": 8, "5": 3, "7": 1},
        "bytes_in": 18650452, "bytes_out": 19264950, "requests": {"push": 92}}])
    _compression(run)
    return run


def _assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.is_file(), path
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


EXPECTED = ["loss.png", "accuracy.png", "staleness.png", "bytes.png", "latency.png",
            "compression_layers.png", "compression_stages.png", "compression_weights.png"]


def test_plot_cli_writes_every_figure(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    _assert_pngs([run_dir / name for name in EXPECTED])
    for name in EXPECTED:
        assert f"wrote {run_dir / name}" in out
    assert not (run_dir / "sensitivity.png").exists()  # no scan in this run


def test_plot_run_out_dir_and_skips(run_dir: Path, tmp_path: Path) -> None:
    from distnet.plots import load_run, plot_run

    run = load_run(run_dir)
    labels = [s.label for s in run.series if s.steps]
    assert labels == ["local", "async fp16 worker 0", "async fp16 worker 1"]
    notes: list[str] = []
    figs = tmp_path / "figs"
    written = plot_run(run_dir / "local", out=figs, log=notes.append)
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    _assert_pngs(written)
    assert all(p.parent == figs for p in written)
    assert any(n.startswith("skipped staleness.png") for n in notes)


def test_appended_metrics_keep_the_last_run(tmp_path: Path) -> None:
    from distnet.plots.runs import load_series

    rng = np.random.default_rng(0)
    rows = _training_rows({"rank": 0, "mode": "local"}, T0, rng)
    rows += _training_rows({"rank": 0, "mode": "local"}, T0 + 100, rng)
    path = tmp_path / "metrics.jsonl"
    _write(path, rows)
    with path.open("a") as f:
        f.write('{"time": 1, "kind": "st')  # a rank killed mid-write
    series = load_series(path, tmp_path)
    assert series is not None
    assert all(r["time"] > T0 + 100 for r in series.steps + series.epochs)
    assert len(series.epochs) == 2


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("distnet: error: ") and err.count("\n") == 1, err
    return err


def test_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _one_line_error(capsys, ["plot", str(tmp_path / "nope")])
    assert "run directory not found" in err


def test_no_metrics_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    err = _one_line_error(capsys, ["plot", str(tmp_path / "empty")])
    assert "no metrics found" in err


def test_missing_matplotlib_says_how_to_install(run_dir: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = _one_line_error(capsys, ["plot", str(run_dir)])
    assert "distnet[plot]" in err


def test_dcz_and_sensitivity_scan_without_report(run_dir: Path, tmp_path: Path) -> None:
    """A .dcz alone still gives its weight histogram (counts per shared value); a
    sensitivity scan (distnet compress --sensitivity --report) gives its curves."""
    from distnet.plots import plot_run

    only = tmp_path / "only"
    only.mkdir()
    (only / "model.dcz").write_bytes((run_dir / "compress" / "model.dcz").read_bytes())
    scan = {"baseline": 0.9, "layers": {"0.weight": [[0.5, 0.9], [0.8, 0.89], [0.9, 0.8]],
                                        "2.weight": [[0.5, 0.9], [0.8, 0.85], [0.9, 0.6]]},
            "proposal": {"0.weight": 0.8, "2.weight": 0.5}, "prune_spec": "0:0.8,2:0.5"}
    (only / "scan.json").write_text(json.dumps(scan), encoding="utf-8")
    written = plot_run(only)
    assert sorted(p.name for p in written) == ["compression_weights.png", "sensitivity.png"]
    _assert_pngs(written)
