import numpy as np
import pytest

from distnet import backend


def test_cpu_is_numpy():
    assert backend.array_module("cpu") is np
    x = np.arange(3, dtype=np.float32)
    assert backend.get_array_module(x) is np
    assert backend.to_host(x) is x
    assert backend.device_of(x) == "cpu"
    assert backend.to_device([1, 2], "cpu").tolist() == [1, 2]


def test_unknown_device_is_a_clear_error():
    with pytest.raises(backend.DeviceError, match="unknown device 'tpu'"):
        backend.check_device("tpu")


def test_cuda_without_gpu_is_an_error_not_a_fallback():
    if backend.cuda_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(backend.DeviceError, match="device 'cuda' is not available"):
        backend.check_device("cuda")
    with pytest.raises(backend.DeviceError):
        backend.to_device(np.zeros(2), "cuda")


def test_env_selects_default_device(monkeypatch):
    monkeypatch.setattr(backend, "_default_device", None)
    monkeypatch.setenv("DISTNET_DEVICE", "CPU")
    assert backend.default_device() == "cpu"
    monkeypatch.setattr(backend, "_default_device", None)
    monkeypatch.setenv("DISTNET_DEVICE", "gpu0")
    with pytest.raises(backend.DeviceError, match="unknown device"):
        backend.default_device()
    monkeypatch.setattr(backend, "_default_device", None)


@pytest.mark.gpu
def test_round_trip_through_gpu():
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    d = backend.to_device(x, "cuda")
    assert backend.device_of(d) == "cuda"
    assert backend.get_array_module(d) is not np
    np.testing.assert_array_equal(backend.to_host(d), x)
