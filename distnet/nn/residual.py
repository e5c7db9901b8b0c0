"""The basic residual block of ResNet-18/34 (He et al., 2016)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.activation import ReLU
from distnet.nn.module import Module, Sequential
from distnet.nn.normalization import BatchNorm2d


class ResidualBlock(Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    x: (N, in_channels, H, W) float32 -> (N, out_channels, H', W') with
    ``H' = ceil(H / stride)``. conv1 is 3x3 with ``stride``, conv2 3x3 with stride 1,
    both padded by 1 and without bias (the batch norm that follows has one). The
    shortcut is the identity when shape is kept; otherwise a projection, a 1x1
    convolution with ``stride`` followed by batch norm (torchvision's ``downsample``).
    Children: ``conv1, bn1, relu1, conv2, bn2`` (and ``shortcut``, a Sequential),
    ``relu2``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 seed: int | None = None) -> None:
        super().__init__()
        # Imported here: conv.py imports the package, which imports this module.
        from distnet.nn.conv import Conv2d  # noqa: PLC0415

        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.stride, self.seed = int(stride), seed
        seeds = [None] * 3
        if seed is not None:
            seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3)]
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
                            seed=seeds[0])
        self.bn1 = BatchNorm2d(out_channels)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False,
                            seed=seeds[1])
        self.bn2 = BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Sequential(
                Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=False,
                       seed=seeds[2]),
                BatchNorm2d(out_channels),
            )
        self.relu2 = ReLU()

    def get_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "stride": self.stride, "seed": self.seed}

    def _branch(self) -> list[Module]:
        return [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2]

    def forward(self, x: Any) -> Any:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResidualBlock({self.in_channels}, {self.out_channels}): expected "
                             f"input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        xp = backend.get_array_module(x)
        y = x
        for layer in self._branch():
            y = layer.forward(y)
        short = self.shortcut.forward(x) if "shortcut" in self._modules else x
        total = xp.add(y, short, out=self.workspace("sum", y.shape, y.dtype, xp))
        return self.relu2.forward(total)

    def backward(self, grad_out: Any) -> Any:
        g = self.relu2.backward(grad_out)
        xp = backend.get_array_module(g)
        # g feeds both paths; no layer writes into its incoming gradient, so sharing is safe.
        gb = g
        for layer in reversed(self._branch()):
            gb = layer.backward(gb)
        gs = self.shortcut.backward(g) if "shortcut" in self._modules else g
        return xp.add(gb, gs, out=self.workspace("grad_in", gb.shape, gb.dtype, xp))
