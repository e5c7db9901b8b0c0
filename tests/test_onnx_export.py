"""ONNX export: parity with distnet for every layer type, compressed weights kept compressed."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from compression import onnx_graph as og  # noqa: E402
from compression.onnx_export import (  # noqa: E402
    ExportError,
    Int8,
    Shared,
    Sparse,
    encodings_from_model,
    export_onnx,
    reference_output,
    run_onnx,
)
from distnet import nn  # noqa: E402
from distnet.models import build_model  # noqa: E402
from distnet.nn.conv import Conv2d  # noqa: E402
from distnet.nn.pool import AvgPool2d, MaxPool2d  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (eval uses them)."""
    rng = np.random.default_rng(seed)
    for _, mod in model.named_modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            mod.weight.data[...] = rng.uniform(0.5, 1.5, mod.weight.shape)
            mod.bias.data[...] = rng.uniform(-0.5, 0.5, mod.bias.shape)
            mod.running_mean[...] = rng.standard_normal(mod.running_mean.shape)
            mod.running_var[...] = rng.uniform(0.5, 2.0, mod.running_var.shape)
    return model


def _inputs(shape: tuple[int, ...], n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _export(model, tmp_path, shape, name="m.onnx", **kw):
    """Export, then check the written file independently of export_onnx's own check."""
    path = tmp_path / name
    x = _inputs(shape)
    result = export_onnx(model, path, input_shape=shape, verify_inputs=x, **kw)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    got = run_onnx(path, _inputs(shape, n=3, seed=7))  # a batch size unlike the export's
    want = reference_output(model, _inputs(shape, n=3, seed=7), kw.get("softmax", False))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return result, proto


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _mlp(seed: int = 0) -> nn.Sequential:
    """LeNet-300-100's shape: 784-300-100-10, with the MNIST normalisation."""
    s = seed * 10
    return nn.Sequential(nn.Normalize(0.1307, 0.3081), nn.Flatten(),
                         nn.Linear(784, 300, seed=s), nn.ReLU(),
                         nn.Linear(300, 100, seed=s + 1), nn.ReLU(),
                         nn.Linear(100, 10, seed=s + 2))


# ---- one small model per layer type -----------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5, seed=1)), (3, 2, 2), "Gemm"),
    "linear-nobias": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False, seed=1)),
                      (3, 2, 2), "Gemm"),
    "conv": (lambda: nn.Sequential(Conv2d(3, 4, 3, stride=2, padding=1, seed=1)), (3, 7, 7),
             "Conv"),
    "conv-nobias": (lambda: nn.Sequential(Conv2d(2, 3, (3, 2), bias=False, seed=1)),
                    (2, 6, 5), "Conv"),
    "maxpool": (lambda: nn.Sequential(MaxPool2d(2)), (2, 6, 6), "MaxPool"),
    "maxpool-pad": (lambda: nn.Sequential(MaxPool2d(3, stride=2, padding=1)), (2, 7, 7),
                    "MaxPool"),
    "avgpool-pad": (lambda: nn.Sequential(AvgPool2d(3, stride=2, padding=1)), (2, 7, 7),
                    "AveragePool"),
    "avgpool-pad-exclude": (lambda: nn.Sequential(AvgPool2d(3, stride=2, padding=1,
                                                               count_include_pad=False)),
                            (2, 7, 7), "AveragePool"),
    "relu": (lambda: nn.Sequential(nn.Normalize(0.5, 0.5), nn.ReLU()), (6,), "Relu"),
    "leaky-relu": (lambda: nn.Sequential(nn.Normalize(0.5, 0.5), nn.LeakyReLU(0.2)), (6,),
                   "LeakyRelu"),
    "sigmoid": (lambda: nn.Sequential(nn.Normalize(0.5, 0.1), nn.Sigmoid()), (6,), "Sigmoid"),
    "tanh": (lambda: nn.Sequential(nn.Normalize(0.5, 0.1), nn.Tanh()), (6,), "Tanh"),
    "softmax": (lambda: nn.Sequential(nn.Normalize(0.5, 0.1), nn.Softmax(dim=1)), (6,),
                "Softmax"),
    "batchnorm1d": (lambda: nn.Sequential(nn.BatchNorm1d(6)), (6,), "BatchNormalization"),
    "batchnorm1d-seq": (lambda: nn.Sequential(nn.BatchNorm1d(3)), (3, 5), "BatchNormalization"),
    "batchnorm2d": (lambda: nn.Sequential(nn.BatchNorm2d(3)), (3, 4, 4), "BatchNormalization"),
    "flatten": (lambda: nn.Sequential(nn.Flatten()), (2, 3, 4), "Flatten"),
    "normalize-scalar": (lambda: nn.Sequential(nn.Normalize(0.1307, 0.3081)), (1, 4, 4), "Div"),
    "normalize-channel": (lambda: nn.Sequential(nn.Normalize([[[0.4]], [[0.5]], [[0.6]]],
                                                             [[[0.2]], [[0.25]], [[0.3]]])),
                          (3, 4, 4), "Sub"),
    "dropout": (lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.5, seed=0),
                                      nn.Linear(8, 3, seed=1)), (2, 2, 2), "Gemm"),
    "residual-identity": (lambda: nn.Sequential(nn.ResidualBlock(3, 3, seed=1)), (3, 6, 6),
                          "Add"),
    "residual-projection": (lambda: nn.Sequential(nn.ResidualBlock(2, 4, stride=2, seed=1)),
                            (2, 7, 7), "Add"),
    "lstm": (lambda: nn.Sequential(nn.LSTM(4, 6, num_layers=2, seed=1), nn.Flatten(),
                                   nn.Linear(5 * 6, 3, seed=2)), (5, 4), "LSTM"),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_parity(name, tmp_path):
    build, shape, op = LAYERS[name]
    model = _randomise(build())
    result, proto = _export(model, tmp_path, shape)
    assert op in _ops(proto)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == list(shape)


def test_dropout_is_removed(tmp_path):
    model = LAYERS["dropout"][0]().train()  # export is eval mode whatever the model's mode
    _, proto = _export(model, tmp_path, (2, 2, 2))
    assert "Dropout" not in _ops(proto)
    assert model.training  # and the mode is given back


def test_identity_normalize_adds_no_node(tmp_path):
    _, proto = _export(nn.Sequential(nn.Normalize(), nn.Flatten()), tmp_path, (1, 2, 2))
    assert _ops(proto) == ["Flatten"]


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "cnn-bn", "resnet-small"])
def test_zoo_models(name, tmp_path):
    shape = (1, 12, 12)
    model = _randomise(build_model(name, shape, num_classes=10, seed=3))
    model[0].set_buffer("mean", np.float32(0.13))  # as distnet train's normalize_inputs does
    model[0].set_buffer("std", np.float32(0.31))
    result, proto = _export(model, tmp_path, shape)
    assert result.size_bytes == result.dense_size_bytes
    assert {"Sub", "Div"} <= set(_ops(proto))  # the input normalisation is in the graph
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["distnet.spec"]) == model.to_spec()
    assert json.loads(meta["distnet.verified"])["max_abs_diff"] == result.max_abs_diff
    assert proto.doc_string.startswith("distnet Sequential (Normalize, ")


def test_fold_batchnorm(tmp_path):
    model = _randomise(build_model("cnn-bn", (1, 8, 8), seed=1))
    result, proto = _export(model, tmp_path, (1, 8, 8), fold_batchnorm=True)
    assert "BatchNormalization" not in _ops(proto)
    assert result.size_bytes < _export(model, tmp_path, (1, 8, 8), "b.onnx")[0].size_bytes


def test_softmax_output(tmp_path):
    _, proto = _export(_mlp(), tmp_path, (1, 28, 28), softmax=True)
    assert proto.graph.output[0].name == "probabilities" and _ops(proto)[-1] == "Softmax"
    probs = run_onnx(tmp_path / "m.onnx", _inputs((1, 28, 28)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_opset_and_ir_version(tmp_path):
    result, proto = _export(_mlp(), tmp_path, (1, 28, 28))
    assert result.opset == 18 and proto.opset_import[0].version == 18
    assert proto.ir_version == result.ir_version == 8


# ---- compressed weights -------------------------------------------------------------------------

def _share(model: nn.Module, bits: int = 5) -> dict[str, Shared]:
    """Quantile codebooks per weight matrix, written into the model (as weight sharing does)."""
    encodings = {}
    for name, p in model.named_parameters():
        if p.data.ndim < 2:
            continue
        book = np.quantile(p.data, np.linspace(0, 1, 2**bits)).astype(np.float32)
        idx = np.abs(p.data[..., None] - book).argmin(axis=-1).astype(np.uint8)
        p.data[...] = book[idx]
        encodings[name] = Shared(book, idx)
    return encodings


def test_shared_weights_smaller_and_identical(tmp_path):
    model = _mlp()
    encodings = _share(model, bits=5)
    dense, _ = _export(model, tmp_path, (1, 28, 28), "dense.onnx")
    result, proto = _export(model, tmp_path, (1, 28, 28), "shared.onnx",
                            weight_encodings=encodings)
    size = (tmp_path / "shared.onnx").stat().st_size
    assert size == result.size_bytes
    assert (tmp_path / "dense.onnx").stat().st_size / size >= 3.5
    assert result.dense_size_bytes == pytest.approx(dense.size_bytes, rel=1e-3)
    assert {"Gather", "BitwiseAnd"} <= set(_ops(proto))
    x = _inputs((1, 28, 28), n=64, seed=5)
    np.testing.assert_array_equal(run_onnx(tmp_path / "shared.onnx", x).argmax(1),
                                  run_onnx(tmp_path / "dense.onnx", x).argmax(1))
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    assert big.data_type == onnx.TensorProto.UINT8  # no float copy of a shared weight
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["distnet.compression"])
    assert meta["encodings"]["2.weight"].startswith("shared 5-bit")


def test_shared_weights_unpacked_before_opset_18(tmp_path):
    model = _mlp()
    encodings = _share(model, bits=5)
    result, proto = _export(model, tmp_path, (1, 28, 28), weight_encodings=encodings, opset=13)
    assert "BitwiseAnd" not in _ops(proto) and proto.ir_version == 7
    assert result.ratio >= 3.5  # one uint8 per weight is still 4x smaller than float32


def _quantise_int8(model: nn.Module) -> tuple[dict[str, Int8], nn.Module]:
    """Symmetric per-output-channel int8; the model gets the dequantised weights."""
    float_model = _mlp()
    float_model.load_state_dict(model.state_dict())
    encodings = {}
    for name, p in model.named_parameters():
        if p.data.ndim < 2:
            continue
        scale = (np.abs(p.data).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.round(p.data / scale[:, None]), -127, 127).astype(np.int8)
        encodings[name] = Int8(q, scale, axis=0)
        p.data[...] = encodings[name].decode()
    return encodings, float_model


def test_int8_parity(tmp_path):
    model = _mlp()
    encodings, float_model = _quantise_int8(model)
    result, proto = _export(model, tmp_path, (1, 28, 28), weight_encodings=encodings)
    assert _ops(proto).count("DequantizeLinear") == 3
    assert result.ratio >= 3.5
    x = _inputs((1, 28, 28), n=32)
    got = run_onnx(tmp_path / "m.onnx", x)
    # Exact up to float rounding against the dequantised model (checked by _export), and
    # within the quantisation error of the float model.
    want = reference_output(float_model, x)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_low_bit_linear_codes_are_packed(tmp_path):
    model = _mlp()
    encodings = {}
    for name, p in model.named_parameters():
        if p.data.ndim == 2:  # 4-bit symmetric codes in [-7, 7]
            scale = np.float32(np.abs(p.data).max() / 7)
            enc = Int8(np.round(p.data / scale).astype(np.int8), scale)
            p.data[...] = enc.decode()
            encodings[name] = enc
    result, proto = _export(model, tmp_path, (1, 28, 28), weight_encodings=encodings)
    assert result.ratio >= 6.5 and "DequantizeLinear" in _ops(proto)


def test_low_rank_is_two_matrix_products(tmp_path):
    dense = nn.Linear(784, 100, seed=1)
    u, s, vt = np.linalg.svd(dense.weight.data, full_matrices=False)
    r = 16
    first, second = nn.Linear(784, r, bias=False), nn.Linear(r, 100)
    first.weight.data[...] = vt[:r]
    second.weight.data[...] = u[:, :r] * s[:r]
    second.bias.data[...] = dense.bias.data
    model = nn.Sequential(nn.Normalize(0.1307, 0.3081), nn.Flatten(), first, second, nn.ReLU(),
                          nn.Linear(100, 10, seed=2))
    result, proto = _export(model, tmp_path, (1, 28, 28))
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3 and [len(n.input) for n in gemms[:2]] == [2, 3]  # r-pair, no bias
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    assert shapes["2.weight"] == (r, 784) and shapes["3.weight"] == (100, r)


def _prune(model: nn.Module, keep: float = 0.1) -> None:
    for _, p in model.named_parameters():
        if p.data.ndim == 2:
            p.set_mask(np.abs(p.data) >= np.quantile(np.abs(p.data), 1 - keep))


def test_sparse_weights(tmp_path):
    model = _mlp()
    _prune(model)
    encodings = {n: Sparse.from_dense(p.data, p.mask) for n, p in model.named_parameters()
                 if p.mask is not None}
    result, proto = _export(model, tmp_path, (1, 28, 28), weight_encodings=encodings)
    assert {"ScatterElements", "CumSum"} <= set(_ops(proto))
    assert not any(t.dims == [300, 784] for t in proto.graph.initializer)
    nnz = sum(e.indices.size for e in encodings.values())
    # ONNX's own sparse_initializer needs int64 indices (12 bytes a non-zero, and it fails
    # check_model(full_check=True)); the packed gaps here take well under half of that.
    weights = sum(p.stored_bytes for p in result.params if p.name.endswith("weight"))
    assert weights < 0.5 * 12 * nnz
    assert result.ratio > 5


def _prune_and_share(model: nn.Module, keep: float = 0.08) -> dict[str, Sparse]:
    """Deep Compression's first two stages: prune, then share the survivors (5 bits)."""
    _prune(model, keep)
    share = {}
    for name, p in model.named_parameters():
        if p.mask is None:
            continue
        idx = np.flatnonzero(p.mask)
        values = p.data.ravel()[idx]
        book = np.linspace(values.min(), values.max(), 32).astype(np.float32)
        labels = np.abs(values[:, None] - book).argmin(axis=1).astype(np.uint8)
        p.data.ravel()[idx] = book[labels]
        share[name] = Sparse(p.shape, idx, Shared(book, labels))
    return share


def test_sparse_shared_and_inferred(tmp_path):
    model = _mlp()
    share = _prune_and_share(model)
    given, _ = _export(model, tmp_path, (1, 28, 28), "given.onnx", weight_encodings=share)
    inferred = encodings_from_model(model)
    assert set(inferred) >= set(share)
    for name, enc in inferred.items():
        np.testing.assert_array_equal(enc.decode(), dict(model.named_parameters())[name].data)
    found, _ = _export(model, tmp_path, (1, 28, 28), "found.onnx", weight_encodings=inferred)
    assert given.ratio > 15 and found.size_bytes <= given.size_bytes * 1.05


def test_inferred_linear_quantisation():
    model = _mlp()
    encodings, _ = _quantise_int8(model)  # symmetric int8 per output channel
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (10, 100)).astype(np.uint8)  # 4-bit asymmetric, per tensor
    model[6].weight.data[...] = Int8(q, np.float32(0.01), np.uint8(5)).decode()
    inferred = encodings_from_model(model)
    for name in ("2.weight", "4.weight"):
        assert isinstance(inferred[name], Int8) and inferred[name].axis == 0
    assert isinstance(inferred["6.weight"], Int8) and inferred["6.weight"].axis is None
    params = dict(model.named_parameters())
    for name, enc in inferred.items():
        np.testing.assert_array_equal(enc.decode(), params[name].data)  # bit for bit


def test_fold_keeps_encoded_layers(tmp_path):
    model = _randomise(nn.Sequential(Conv2d(2, 4, 3, seed=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     Conv2d(4, 3, 3, seed=2), nn.BatchNorm2d(3)))
    w = model[3].weight
    scale = (np.abs(w.data).reshape(3, -1).max(axis=1) / 127).astype(np.float32)
    enc = Int8(np.round(w.data / scale[:, None, None, None]).astype(np.int8), scale, axis=0)
    w.data[...] = enc.decode()
    _, proto = _export(model, tmp_path, (2, 8, 8), fold_batchnorm=True,
                       weight_encodings={"3.weight": enc})
    assert _ops(proto).count("BatchNormalization") == 1  # the first pair folded, not the second
    assert "DequantizeLinear" in _ops(proto)


def test_pack_bit_planes_round_trip():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 5, 7, 9, 12, 16):
        for n in (1, 8, 13):
            values = rng.integers(0, 2**bits, n)
            packed = og.pack_bit_planes(values, bits)
            assert packed.shape == (bits, (n + 7) // 8, 1)
            np.testing.assert_array_equal(og.unpack_bit_planes(packed, bits, n), values)


def test_gap_symbols_with_fillers():
    positions = np.array([0, 3, 4, 40, 1000])
    for bits in (2, 4, 8, 10):
        symbols = og.gap_symbols(positions, bits)
        assert symbols.max() < 2**bits
        assert (symbols == 2**bits - 1).any() == (bits < 10)  # a gap of 960 needs fillers
        np.testing.assert_array_equal(og.positions_of(symbols, bits), positions)


# ---- errors -------------------------------------------------------------------------------------

def test_encoding_must_match_the_weight(tmp_path):
    model = _mlp()
    book = np.linspace(-0.1, 0.1, 32).astype(np.float32)
    idx = np.zeros((10, 100), np.uint8)
    with pytest.raises(ValueError, match="does not reproduce"):
        export_onnx(model, tmp_path / "x.onnx", input_shape=(1, 28, 28),
                    weight_encodings={"6.weight": Shared(book, idx)})
    with pytest.raises(ValueError, match="unknown parameters"):
        export_onnx(model, None, input_shape=(1, 28, 28),
                    weight_encodings={"9.weight": Shared(book, idx)})
    assert not (tmp_path / "x.onnx").exists()


def test_unsupported_layer_and_opset():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(NotImplementedError, match="Odd"):
        export_onnx(nn.Sequential(Odd()), None, input_shape=(3,))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(_mlp(), None, input_shape=(1, 28, 28), opset=9)


def test_mismatch_is_reported(tmp_path, monkeypatch):
    from compression import onnx_layers

    monkeypatch.setitem(onnx_layers.CONVERTERS, "ReLU",
                        lambda ctx, m, x, prefix: ctx.g.add("Sigmoid", [x], prefix))
    with pytest.raises(ExportError, match="does not reproduce"):
        export_onnx(_mlp(), tmp_path / "bad.onnx", input_shape=(1, 28, 28))
    assert not (tmp_path / "bad.onnx").exists()


# ---- the command --------------------------------------------------------------------------------

def test_cli_export_checkpoint(tmp_path, capsys):
    from distnet.checkpoint import save_checkpoint
    from distnet.cli.main import main

    model = _mlp()
    _prune_and_share(model)
    ckpt = tmp_path / "m.npz"
    save_checkpoint(ckpt, model, meta={"data": {"input_shape": [1, 28, 28]}})
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--softmax"]) == 0
    text = capsys.readouterr().out
    assert "verified: onnxruntime matches distnet (max abs diff" in text
    assert "random inputs" in text and "x smaller" in text
    proto = onnx.load(str(out))
    assert proto.graph.output[0].name == "probabilities"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "d.onnx"),
                 "--dense"]) == 0
    assert (tmp_path / "d.onnx").stat().st_size > 5 * out.stat().st_size
    assert "x smaller" not in capsys.readouterr().out  # --dense: every weight float32


def test_cli_export_dcz(tmp_path, capsys):
    from compression.dcz import save_dcz
    from distnet.cli.main import main

    model = _mlp()
    _prune_and_share(model)
    save_dcz(tmp_path / "m.dcz", model, meta={"data": {"input_shape": [1, 28, 28]}})
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tmp_path / "m.dcz"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sparse 8.0%, values shared" in text and "verified: onnxruntime matches" in text
    assert out.stat().st_size < 1_068_000 / 15
