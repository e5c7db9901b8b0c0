import numpy as np

from distnet.data import load_data
from distnet.metrics import MetricsWriter, read_metrics
from distnet.models import build_model
from distnet.nn import CrossEntropyLoss
from distnet.optim import build_optimizer
from distnet.setup import normalize_inputs
from distnet.train import LocalUpdate, evaluate, fit


def test_fit_learns_digits_and_writes_metrics(tmp_path):
    train, val, info = load_data("digits", seed=0)
    model = build_model("lenet300", info["input_shape"], info["num_classes"], seed=0)
    normalize_inputs(model, train)
    before = evaluate(model, val)
    opt = build_optimizer("momentum", model, lr=0.05)
    with MetricsWriter(tmp_path / "m.jsonl", rank=0) as metrics:
        history = fit(model, train, val, epochs=3, batch_size=64, criterion=CrossEntropyLoss(),
                      update=LocalUpdate(opt), metrics=metrics, progress=False)
    assert len(history) == 3
    assert history[-1]["val_accuracy"] > 0.9 > before["accuracy"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    rows = read_metrics(tmp_path / "m.jsonl")
    assert {r["kind"] for r in rows} == {"step", "epoch"}
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "step")


def test_fit_is_reproducible():
    train, val, info = load_data("digits", seed=0)

    def run():
        model = build_model("lenet300", info["input_shape"], 10, seed=0)
        fit(model, train, None, epochs=1, batch_size=32, criterion=CrossEntropyLoss(),
            update=LocalUpdate(build_optimizer("momentum", model, lr=0.05)), progress=False)
        return model.state_dict()

    a, b = run(), run()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_evaluate_counts_every_example():
    train, val, info = load_data("digits", seed=0)
    model = build_model("lenet300", info["input_shape"], 10)
    result = evaluate(model, val, batch_size=7)  # not a divisor of the size
    assert 0.0 <= result["accuracy"] <= 1.0
    n_correct = result["accuracy"] * len(val)
    assert abs(n_correct - round(n_correct)) < 1e-9
