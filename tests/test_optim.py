"""Optimizers against torch.optim, masks, state round trips, clipping and schedules."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from distnet.nn.module import Module, Parameter
from distnet.optim import (
    SGD,
    Adam,
    build_optimizer,
    build_schedule,
    clip_grad_norm,
    named_parameter_list,
)

torch = pytest.importorskip("torch")

SHAPES = [(6, 5), (6,), (3, 6), (3,)]


def make_params(seed: int = 0) -> list[Parameter]:
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def grads_for(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


TORCH = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adam": (torch.optim.Adam, {}),
}

CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.01}),
    ("momentum", {"lr": 0.05}),
    ("momentum", {"lr": 0.05, "weight_decay": 1e-3, "momentum": 0.8}),
    ("nesterov", {"lr": 0.05, "weight_decay": 1e-3}),
    ("adagrad", {"lr": 0.1}),
    ("adagrad", {"lr": 0.1, "weight_decay": 0.01, "lr_decay": 0.01}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01}),
]


def run_torch(name: str, config: dict, steps: int, seed: int = 0, clip: float | None = None):
    cls, defaults = TORCH[name]
    tp = [torch.tensor(p.data) for p in make_params(seed)]
    for t in tp:
        t.requires_grad_(True)
    opt = cls(tp, **{**defaults, **config})
    for i in range(steps):
        for t, g in zip(tp, grads_for(i), strict=True):
            t.grad = torch.tensor(g)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tp, clip)
        opt.step()
    return [t.detach().numpy() for t in tp]


def run_ours(name: str, config: dict, steps: int, seed: int = 0, clip: float | None = None):
    params = make_params(seed)
    opt = build_optimizer(name, params, clip_norm=clip, **config)
    for i in range(steps):
        for p, g in zip(params, grads_for(i), strict=True):
            p.grad = g
        opt.step()
    return [p.data for p in params], opt


@pytest.mark.parametrize(("name", "config"), CASES)
def test_matches_torch(name, config):
    expected = run_torch(name, config, steps=8)
    got, _ = run_ours(name, config, steps=8)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_clip_norm_matches_torch_clipping(name):
    config = {"lr": 0.05, "weight_decay": 1e-3}
    expected = run_torch(name, config, steps=6, clip=0.5)
    got, opt = run_ours(name, config, steps=6, clip=0.5)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert opt.last_grad_norm > 0.5


def test_adam_bias_correction_first_step():
    """After one step each coordinate moves by about lr (m/sqrt(v) = sign(g) once corrected)."""
    params = make_params()
    before = [p.data.copy() for p in params]
    opt = Adam(params, lr=0.01)
    for p, g in zip(params, grads_for(0), strict=True):
        p.grad = g
    opt.step()
    for p, b, g in zip(params, before, grads_for(0), strict=True):
        np.testing.assert_allclose(b - p.data, 0.01 * np.sign(g), rtol=1e-4, atol=1e-6)


def test_grad_is_only_read():
    params = make_params()
    opt = build_optimizer("momentum", params, lr=0.1, weight_decay=0.1, clip_norm=0.1)
    for p, g in zip(params, grads_for(0), strict=True):
        g.flags.writeable = False  # e.g. a buffer received from the network
        p.grad = g
    opt.step()
    np.testing.assert_array_equal(params[0].grad, grads_for(0)[0])


def test_wrong_grad_shape_is_refused_before_any_change():
    params = make_params()
    before = [p.data.copy() for p in params]
    opt = build_optimizer("adam", params, lr=0.1)
    params[2].grad = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match=r"'2': grad shape \(6, 3\) != data shape \(3, 6\)"):
        opt.step()
    assert opt.step_count == 0
    assert all(np.array_equal(p.data, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", ["momentum", "nesterov", "rmsprop", "adam", "adagrad"])
def test_masked_weights_stay_zero(name):
    params = make_params()
    mask = (np.random.default_rng(5).random(SHAPES[0]) > 0.5).astype(np.float32)
    opt = build_optimizer(name, params, lr=0.1, weight_decay=0.01, clip_norm=1.0)
    for i in range(3):  # momentum builds up before the mask arrives
        for p, g in zip(params, grads_for(i), strict=True):
            p.grad = g
        opt.step()
        if i == 0:
            params[0].set_mask(mask)
    assert np.all(params[0].data[mask == 0] == 0)
    assert np.any(params[0].data[mask == 1] != 0)


def test_mask_excluded_from_clip_norm():
    p = Parameter(np.zeros(4, np.float32))
    p.set_mask(np.array([1, 1, 0, 0], np.float32))
    p.grad = np.array([3.0, 4.0, 100.0, 100.0], np.float32)
    opt = SGD([p], lr=1.0, clip_norm=10.0)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(5.0)
    np.testing.assert_allclose(p.data, [-3, -4, 0, 0])


@pytest.mark.parametrize(("name", "config"), [("nesterov", {"weight_decay": 1e-3}),
                                              ("rmsprop", {"momentum": 0.5, "centered": True}),
                                              ("adam", {}), ("adagrad", {})])
def test_state_dict_round_trip_resumes_identically(name, config):
    full, _ = run_ours(name, {"lr": 0.01, **config}, steps=6)
    params = make_params()
    opt = build_optimizer(name, params, lr=0.01, **config)
    for i in range(3):
        for p, g in zip(params, grads_for(i), strict=True):
            p.grad = g
        opt.step()
    state = opt.state_dict()
    assert int(state["step"]) == 3
    assert all(k == "step" or "/" in k for k in state)
    resumed_params = [Parameter(p.data.copy()) for p in params]
    resumed = build_optimizer(name, resumed_params, **opt.get_config())
    resumed.load_state_dict(state)
    for i in range(3, 6):
        for p, g in zip(resumed_params, grads_for(i), strict=True):
            p.grad = g
        resumed.step()
    for e, p in zip(full, resumed_params, strict=True):
        np.testing.assert_array_equal(p.data, e)


def test_load_state_dict_errors():
    opt = build_optimizer("adam", make_params(), lr=0.01)
    state = opt.state_dict()
    assert set(state) == {"step"} | {f"{i}/{s}" for i in range(4) for s in ("exp_avg",
                                                                           "exp_avg_sq")}
    missing = dict(state)
    del missing["1/exp_avg"]
    with pytest.raises(KeyError, match="missing.*1/exp_avg"):
        opt.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*9/x"):
        opt.load_state_dict({**state, "9/x": np.zeros(1)})
    with pytest.raises(ValueError, match="0/exp_avg.*shape"):
        opt.load_state_dict({**state, "0/exp_avg": np.zeros((5, 6))})
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict({**state, "step": np.array(1.5)})


def test_params_normalisation():
    class Tiny(Module):
        def __init__(self):
            super().__init__()
            self.w = Parameter(np.zeros(3, np.float32))

    assert [n for n, _ in named_parameter_list(Tiny())] == ["w"]
    ps = make_params()
    assert [n for n, _ in named_parameter_list(ps)] == ["0", "1", "2", "3"]
    assert [n for n, _ in named_parameter_list([("a", ps[0])])] == ["a"]
    with pytest.raises(ValueError, match="empty"):
        named_parameter_list([])
    with pytest.raises(ValueError, match="duplicate"):
        named_parameter_list([("a", ps[0]), ("a", ps[1])])
    with pytest.raises(ValueError, match="twice"):
        named_parameter_list([ps[0], ps[0]])
    with pytest.raises(TypeError, match="not a Parameter"):
        named_parameter_list([np.zeros(3)])


def test_build_optimizer_names_and_errors():
    for name in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"):
        opt = build_optimizer(name, make_params(), lr=0.01)
        assert opt.lr == 0.01
    assert build_optimizer("momentum", make_params()).get_config()["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        build_optimizer("lbfgs", make_params())
    with pytest.raises(TypeError, match="adam"):
        build_optimizer("adam", make_params(), momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer("sgd", make_params(), lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(make_params(), nesterov=True)


def test_clip_grad_norm_matches_torch():
    params = make_params()
    tp = [torch.tensor(p.data, requires_grad=True) for p in params]
    for p, t, g in zip(params, tp, grads_for(0), strict=True):
        p.grad = g.copy()
        t.grad = torch.tensor(g)
    for max_norm in (100.0, 1.0):
        expected = float(torch.nn.utils.clip_grad_norm_(tp, max_norm))
        got = clip_grad_norm(params, max_norm)
        assert got == pytest.approx(expected, rel=1e-5)
        for p, t in zip(params, tp, strict=True):
            np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert math.sqrt(sum(float((p.grad ** 2).sum()) for p in params)) == pytest.approx(1.0,
                                                                                     rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params, 0)


def test_schedules():
    const = build_schedule("constant", 0.1, 100)
    assert const(0) == const(99) == 0.1
    step = build_schedule("step", 1.0, 100, step_size=10, gamma=0.5)
    assert [step(i) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = build_schedule("cosine", 1.0, 100, min_lr=0.1)
    assert cos(0) == 1.0
    assert cos(50) == pytest.approx(0.55)
    assert cos(100) == cos(500) == pytest.approx(0.1)
    warm = build_schedule("cosine", 1.0, 110, warmup_steps=10)
    assert [warm(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warm(10) == 1.0 and warm(60) == pytest.approx(0.5) and warm(110) == pytest.approx(0)
    vals = [warm(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    warm_step = build_schedule("step", 1.0, 100, warmup_steps=4, step_size=10)
    assert warm_step(3) == 1.0 and warm_step(13) == 1.0 and warm_step(14) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("linear", 0.1, 10)
    with pytest.raises(TypeError, match="gamma"):
        build_schedule("cosine", 0.1, 10, gamma=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        build_schedule("constant", 0.1, 0)
    with pytest.raises(ValueError, match="step"):
        const(-1)


def test_schedule_drives_optimizer_lr():
    opt = build_optimizer("sgd", make_params(), lr=1.0)
    sched = build_schedule("step", 1.0, 30, step_size=10, gamma=0.1)
    opt.lr = sched(15)
    assert opt.lr == pytest.approx(0.1) and opt.get_config()["lr"] == pytest.approx(0.1)


def test_state_follows_parameters_rebinding():
    """A server may hand new arrays (same shape) to the Parameters between steps."""
    params = make_params()
    opt = build_optimizer("momentum", params, lr=0.1)
    for p, g in zip(params, grads_for(0), strict=True):
        p.grad = g
    opt.step()
    params[0].data = params[0].data.copy()
    opt.step()
    assert opt.state_dict()["0/momentum_buffer"].shape == SHAPES[0]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_step_on_gpu_matches_cpu(name):
    from distnet import backend

    config = {"lr": 0.01, "weight_decay": 1e-3}
    expected, _ = run_ours(name, config, steps=5, clip=1.0)
    params = [Parameter(backend.to_device(p.data, "cuda")) for p in make_params()]
    params[0].set_mask(backend.to_device(np.ones(SHAPES[0], np.float32), "cuda"))
    opt = build_optimizer(name, params, clip_norm=1.0, **config)
    for i in range(5):
        for p, g in zip(params, grads_for(i), strict=True):
            p.grad = backend.to_device(g, "cuda")
        opt.step()
    for e, p in zip(expected, params, strict=True):
        assert backend.device_of(p.data) == "cuda"
        np.testing.assert_allclose(backend.to_host(p.data), e, rtol=1e-5, atol=1e-6)
    assert all(isinstance(v, np.ndarray) for v in opt.state_dict().values())


@pytest.mark.gpu
def test_state_moves_with_the_model():
    """build_training makes the optimizer before model.to(device): the slots must follow."""
    from distnet import backend

    class Tiny(Module):
        def __init__(self):
            super().__init__()
            self.w = Parameter(np.ones(4, np.float32))

    model = Tiny()
    opt = build_optimizer("momentum", model, lr=0.1)
    model.w.grad[...] = 1.0
    opt.step()
    model.to("cuda")
    model.w.grad[...] = 1.0
    opt.step()
    assert backend.device_of(opt.state["w"]["momentum_buffer"]) == "cuda"
    np.testing.assert_allclose(backend.to_host(model.w.data), 1 - 0.1 - 0.1 * 1.9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_updates_are_in_place_and_match_numpy(dtype):
    from distnet.optim.blas import axpy, scal

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)).astype(dtype)
    x.flags.writeable = False  # a gradient received from the network is read-only
    y = rng.standard_normal((300, 7)).astype(dtype)
    want = y + np.asarray(-0.3, dtype) * x
    before = y.ctypes.data
    axpy(-0.3, x, y)
    assert y.ctypes.data == before
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    scal(0.5, y)
    np.testing.assert_allclose(y, want * 0.5, rtol=1e-6, atol=1e-6)
    # strided views and float16 take the NumPy route, into the scratch buffer
    z = np.zeros((300, 14), dtype)[:, ::2]
    axpy(2.0, x, z, np.empty_like(z))
    np.testing.assert_allclose(z, 2 * x, rtol=1e-6)
    h = np.ones(5, np.float16)
    axpy(1.0, np.ones(5, np.float16), h)
    scal(3.0, h)
    np.testing.assert_array_equal(h, np.full(5, 6, np.float16))


def test_large_sgd_steps_match_the_formula():
    rng = np.random.default_rng(0)
    n = 300_001
    for nesterov in (False, True):
        p = Parameter(rng.standard_normal(n).astype(np.float32))
        ref, v = p.data.astype(np.float64), np.zeros(n)
        opt = SGD([("w", p)], lr=0.1, momentum=0.9, nesterov=nesterov)
        for _ in range(3):
            g = rng.standard_normal(n).astype(np.float32)
            p.grad = g
            opt.step()
            v = 0.9 * v + g
            ref -= 0.1 * (g + 0.9 * v if nesterov else v)
        np.testing.assert_allclose(p.data, ref, rtol=1e-5, atol=1e-5)


def test_scipy_private_blas_runs_on_the_calling_thread_only():
    # two OpenBLAS pools spinning on the same cores made a lenet300 step 6x slower
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from distnet.optim.blas import axpy

    axpy(1.0, np.ones(8, np.float32), np.ones(8, np.float32))
    private = [lib for lib in threadpoolctl.threadpool_info()
               if "scipy.libs" in lib["filepath"].replace("\\", "/").split("/")]
    if not private:
        pytest.skip("SciPy shares NumPy's BLAS here: nothing to limit")
    assert all(lib["num_threads"] == 1 for lib in private), private


def test_limit_threads_covers_numpy_and_scipy_blas():
    # in a child process: the limit is process-wide and would slow the rest of the suite
    code = ("from distnet.optim.blas import limit_threads\n"
            "from threadpoolctl import threadpool_info\n"
            "limit_threads(1)\n"
            "print(sorted({i['num_threads'] for i in threadpool_info()"
            " if i['user_api'] == 'blas'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[1]"
