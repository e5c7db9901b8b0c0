"""distnet: distributed training with a parameter server, and model compression.

    from distnet import nn, optim
    from distnet.models import build_model
    from distnet.data import load_data
    from distnet.train import fit, evaluate
"""

__version__ = "0.1.0"
