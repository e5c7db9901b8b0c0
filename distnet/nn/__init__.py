"""distnet.nn: layers with explicit forward/backward, losses and initialisers.

Every class here is registered by name for ``from_spec``. See docs/internals.md for
the contracts (workspaces, ``.grad`` written not added, specs).
"""

from distnet.nn import init
from distnet.nn.activation import LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from distnet.nn.conv import Conv2d
from distnet.nn.dropout import Dropout
from distnet.nn.linear import Linear, skip_input_grad
from distnet.nn.loss import CrossEntropyLoss, Loss, MSELoss, MultiMarginLoss
from distnet.nn.module import Module, Parameter, Sequential, from_spec
from distnet.nn.normalization import BatchNorm1d, BatchNorm2d
from distnet.nn.pool import AvgPool2d, MaxPool2d
from distnet.nn.recurrent import LSTM
from distnet.nn.residual import ResidualBlock
from distnet.nn.shape import Flatten, Normalize

__all__ = [
    "LSTM",
    "AvgPool2d",
    "Conv2d",
    "MaxPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "Linear",
    "Loss",
    "MSELoss",
    "Module",
    "MultiMarginLoss",
    "Normalize",
    "Parameter",
    "ReLU",
    "ResidualBlock",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "from_spec",
    "init",
    "skip_input_grad",
]
