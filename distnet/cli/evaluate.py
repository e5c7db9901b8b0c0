"""Evaluate a checkpoint: accuracy and loss over every example of the data given.

With no --data, the data the checkpoint was trained on (its validation split).
"""

from __future__ import annotations

import argparse

EXAMPLES = """\
  distnet eval --checkpoint lenet300.npz
  distnet eval --checkpoint lenet300.npz --data mnist:../shared/data/mnist
  distnet eval --checkpoint model.dcz --data digits --split train
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint (.npz) or compressed model (.dcz)")
    p.add_argument("--data", default=None, help="digits | mnist:DIR | synthetic[:N] "
                   "(default: the checkpoint's data)")
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--split", default="val", choices=("val", "train", "all"),
                   help="which part of the data to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default=None, help="cpu | cuda")


def load_model(path: str):
    """A model and its metadata from a checkpoint (.npz) or a compressed file (.dcz)."""
    if path.endswith(".dcz"):
        from compression.dcz import load_dcz

        loaded = load_dcz(path)
        return loaded.model, loaded.meta
    from distnet.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return ckpt.model, ckpt.meta


def run(args: argparse.Namespace) -> int:
    from distnet import backend
    from distnet.data import load_data
    from distnet.train import evaluate

    model, meta = load_model(args.checkpoint)
    trained = meta.get("config") or {}
    data = args.data or trained.get("data")
    if not data:
        raise ValueError(f"{args.checkpoint} does not record its data: give --data")
    # The same data spec, split and seed as in training, so "val" means the same examples.
    val_size = args.val_size if args.val_size is not None else trained.get("val_size")
    train, val, _ = load_data(data, val_size=val_size, seed=int(trained.get("seed") or 0))
    if args.split == "all":
        import numpy as np

        from distnet.data import Dataset

        dataset = Dataset(np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y]))
    else:
        dataset = val if args.split == "val" else train
    model.to(backend.check_device(args.device or backend.default_device()))
    result = evaluate(model, dataset, batch_size=args.batch_size)
    print(f"accuracy: {100 * result['accuracy']:.2f}%  loss: {result['loss']:.4f}  "
          f"({len(dataset)} examples, {args.split})")
    return 0
