import numpy as np
import pytest

from distnet import nn
from distnet.models import MODELS, build_model, recipe
from distnet.nn.module import from_spec


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_zoo_model_forward_backward_and_spec(name, shape):
    model = build_model(name, shape, 10, seed=1)
    assert isinstance(model[0], nn.Normalize)
    x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    out = model.forward(x)
    assert out.shape == (4, 10) and out.dtype == np.float32
    grad = model.backward(np.ones_like(out) / 4)
    assert grad.shape == x.shape
    for pname, p in model.named_parameters():
        assert p.grad.shape == p.data.shape, pname
    rebuilt = from_spec(model.to_spec())
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    np.testing.assert_array_equal(rebuilt.forward(x), model.forward(x))


def test_lenet300_is_deep_compressions_size():
    model = build_model("lenet300", (1, 28, 28), 10)
    assert model.num_parameters() * 4 == 1_066_440  # the paper's 1070 KB


def test_lenet5_shape_and_size():
    model = build_model("lenet5", (1, 28, 28), 10)
    assert model.num_parameters() == 431_080  # 1724 KB in float32: the paper's 1720 KB


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (build_model("lenet300", (1, 8, 8), 10, seed=s) for s in (3, 3, 4))
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert not np.array_equal(a[2].weight.data, c[2].weight.data)


def test_unknown_model_and_recipe():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="unknown model"):
        recipe("vgg")
    assert recipe("lenet300")["optimizer"]
