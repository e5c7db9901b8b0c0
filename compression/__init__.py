"""Model compression for distnet models, after Deep Compression (Han, Mao and Dally, 2016).

Modules (each usable on its own; importing this package imports none of them):

- ``prune``: magnitude pruning by sparsity or threshold, global pruning, the cubic
  gradual (AGP) schedule; masks live on the Parameters.
- ``structured``: removing whole neurons / conv filters (smaller dense shapes).
- ``sensitivity``: accuracy against per-layer sparsity, and a proposal from it.
- ``quantize``: weight sharing by 1-D k-means per layer, centroid fine-tuning.
- ``linear_quant``: int8 (2-8 bit) symmetric/asymmetric, per tensor/channel; ternary.
- ``huffman``: canonical Huffman codes, packed bitstreams, a table-driven decoder.
- ``lowrank``: truncated-SVD factorisation of Linear and Conv2d layers.
- ``fold``: folding batch norm into the preceding conv/linear layer.
- ``dcz``: the .dcz compressed-model file (``save_dcz``/``load_dcz``).
- ``pipeline`` and ``report``: prune -> retrain -> share -> fine-tune -> Huffman, with
  a per-layer report; ``distnet compress`` is its command line.
- ``onnx_export`` (and its helpers): ONNX export of (compressed) models.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "save_dcz": "compression.dcz", "load_dcz": "compression.dcz",
    "compress": "compression.pipeline", "CompressionPlan": "compression.pipeline",
    "kmeans_1d": "compression.quantize", "share_weights": "compression.quantize",
    "prune_model": "compression.prune", "global_prune": "compression.prune",
    "quantize_model": "compression.linear_quant", "fold_batchnorm": "compression.fold",
    "factorize_model": "compression.lowrank",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy, so `import compression.onnx_export` does not pay for the training machinery.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compression' has no attribute {name!r}")
