"""Parameters, the Module base class and Sequential.

Every layer has an explicit ``forward(x)`` and ``backward(grad_out) -> grad_in``.
``backward`` must follow the ``forward`` of the same batch; it *writes* (does not
add to) the ``.grad`` of the layer's parameters, so no ``zero_grad`` is needed
between steps. Arrays a layer returns may live in a workspace that the layer
reuses: they stay valid until that layer's next ``forward``/``backward``.
Copy them to keep them longer. Reusing buffers matters here: a fresh array above
glibc's mmap threshold is mapped and page-faulted anew on every step.

A module describes itself as a JSON-able *spec* (``to_spec``/``from_spec``), so a
checkpoint or a compressed file can rebuild any architecture, including one that
compression changed, without pickle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from distnet import backend

_REGISTRY: dict[str, type[Module]] = {}


class Parameter:
    """A trainable array with its gradient.

    data: the values (float32 by default). grad: same shape and dtype, written by
    ``backward``. mask: ``None`` or an array of 0/1 of the same shape; the optimizer
    keeps masked entries at zero and ignores their gradients (pruning).
    """

    __slots__ = ("data", "grad", "name", "mask")

    def __init__(self, data: Any, name: str = "") -> None:
        xp = backend.get_array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data)
        self.name = name
        self.mask = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return int(self.data.size)

    def set_mask(self, mask: Any) -> None:
        """Attach a 0/1 mask (combined with any mask already set) and zero the pruned values."""
        xp = backend.get_array_module(self.data)
        mask = xp.asarray(mask, dtype=self.data.dtype)
        if mask.shape != self.data.shape:
            raise ValueError(f"mask shape {mask.shape} != parameter {self.name!r} {self.shape}")
        self.mask = mask if self.mask is None else self.mask * mask
        self.data *= self.mask

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype})"


class Module:
    """Base class of layers and models."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_workspace", {})
        object.__setattr__(self, "training", True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # ---- registration -------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__()")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            # `self.running_mean *= m` rebinds the attribute: it must stay a buffer.
            self._buffers[name] = value
            object.__setattr__(self, name, value)
            return
        if isinstance(value, Module) and name in self._modules:
            self._modules[name] = value  # replaced where it stands: order is the architecture
            object.__setattr__(self, name, value)
            return
        for table in (self._parameters, self._modules, self._buffers):
            table.pop(name, None)
        if isinstance(value, Parameter):
            value.name = value.name or name
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array: Any) -> None:
        """A persistent array that is not trained (e.g. batch-norm running statistics)."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def set_buffer(self, name: str, array: Any) -> None:
        if name not in self._buffers:
            raise KeyError(f"{type(self).__name__} has no buffer {name!r}")
        self.register_buffer(name, array)

    # ---- the computation ------------------------------------------------------------
    def forward(self, x: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, grad_out: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def workspace(self, key: str, shape: tuple[int, ...], dtype: Any, xp: Any = np) -> Any:
        """A buffer kept across calls, reallocated only when shape, dtype or device change."""
        buf = self._workspace.get(key)
        if (
            buf is None
            or buf.shape != tuple(shape)
            or buf.dtype != dtype
            or backend.get_array_module(buf) is not xp
        ):
            buf = xp.empty(shape, dtype=dtype)
            self._workspace[key] = buf
        return buf

    # ---- traversal -------------------------------------------------------------
    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, Any]]:
        for mod_name, mod in self.named_modules():
            for name, b in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # ---- modes and devices -----------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for _, mod in self.named_modules():
            object.__setattr__(mod, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def to(self, device: str) -> Module:
        """Move parameters, gradients, masks and buffers to ``device``."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            p.grad = backend.to_device(p.grad, device)
            if p.mask is not None:
                p.mask = backend.to_device(p.mask, device)
        for _, mod in self.named_modules():
            for name, b in list(mod._buffers.items()):
                mod.register_buffer(name, backend.to_device(b, device))
            mod._workspace.clear()
        return self

    @property
    def device(self) -> str:
        params = self.parameters()
        return backend.device_of(params[0].data) if params else "cpu"

    # ---- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of parameters, buffers and pruning masks (``<name>_mask``)."""
        state: dict[str, np.ndarray] = {}
        for name, p in self.named_parameters():
            state[name] = backend.to_host(p.data).copy()
            if p.mask is not None:
                state[name + "_mask"] = backend.to_host(p.mask).copy()
        for name, b in self.named_buffers():
            state[name] = backend.to_host(b).copy()
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy ``state`` into this module in place (optimizers keep their references).

        Raises KeyError naming missing/unexpected keys (when strict) and ValueError
        naming a shape mismatch, before anything is changed.
        """
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        masks = {k for k in state if k.endswith("_mask") and k[: -len("_mask")] in params}
        expected = set(params) | set(buffers)
        given = set(state) - masks
        if strict and given != expected:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise KeyError(f"state does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
        for name in given & expected:
            have = params[name].data if name in params else buffers[name]
            if tuple(np.shape(state[name])) != tuple(have.shape):
                raise ValueError(f"{name}: shape {tuple(np.shape(state[name]))} in the state, "
                                 f"{tuple(have.shape)} in the model")
        for name in given & expected:
            if name in params:
                p = params[name]
                xp = backend.get_array_module(p.data)
                p.data[...] = xp.asarray(state[name], dtype=p.data.dtype)
            else:
                buffers[name][...] = backend.get_array_module(buffers[name]).asarray(state[name])
        for key in masks:
            params[key[: -len("_mask")]].set_mask(state[key])

    # ---- architecture spec -----------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; subclasses with arguments override this."""
        return {}

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": type(self).__name__, "config": self.get_config()}
        if self._modules:
            spec["children"] = [[n, m.to_spec()] for n, m in self._modules.items()]
        return spec

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.get_config().items())

    def __repr__(self) -> str:
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not self._modules:
            return head + ")"
        body = "\n".join(
            "  " + f"({n}): {m!r}".replace("\n", "\n  ") for n, m in self._modules.items()
        )
        return f"{head}\n{body}\n)"


def from_spec(spec: dict[str, Any]) -> Module:
    """Rebuild a module (with fresh parameters) from ``Module.to_spec()`` output."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"not a module spec: {spec!r:.80}")
    cls = _REGISTRY.get(spec["type"])
    if cls is None:
        raise ValueError(f"unknown module type {spec['type']!r} in spec")
    module = cls(**spec.get("config", {}))
    for name, child in spec.get("children", []):
        setattr(module, name, from_spec(child))
    return module


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential item {i} is {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)

    @property
    def layers(self) -> list[Module]:
        return list(self._modules.values())

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():
            x = layer.forward(x)
        return x

    def backward(self, grad_out: Any) -> Any:
        for layer in reversed(self._modules.values()):
            grad_out = layer.backward(grad_out)
        return grad_out

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __setitem__(self, i: int, layer: Module) -> None:
        """Replace layer ``i`` (compression swaps layers this way)."""
        name = list(self._modules)[i]
        setattr(self, name, layer)

    def replace(self, i: int, *layers: Module) -> None:
        """Replace layer ``i`` by one or more layers (e.g. a low-rank pair)."""
        current = self.layers
        current[i : i + 1] = list(layers)
        for name in list(self._modules):
            delattr(self, name)
            del self._modules[name]
        for j, layer in enumerate(current):
            setattr(self, str(j), layer)
