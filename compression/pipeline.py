"""Deep Compression end to end: [fold BN] -> [low rank] -> prune -> retrain -> share (or
linear quantization) -> fine-tune centroids -> Huffman-coded .dcz file, with a report.

Every stage is optional and measured: accuracy (and loss) on the validation set after
it, parameters, and the size of the .dcz file the model would make at that point, so
the report shows what each stage buys. Retraining uses distnet's own loop
(``distnet.train.fit``) with an optimizer that honours the pruning masks; centroid
fine-tuning plugs ``CentroidUpdate`` in as the update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from compression import dcz, fold, lowrank, prune, quantize
from compression.linear_quant import QuantizedTensor, quantize_model
from distnet import backend
from distnet.nn.module import Module


@dataclass
class CompressionPlan:
    """What to do. Specs are the CLI's strings or their parsed forms (see each module)."""

    fold_bn: bool = False
    lowrank: str | None = None  # e.g. "ratio=0.3" or "2:r=40"
    lowrank_epochs: int = 0
    prune_units: Any = None  # structured: "fc1:0.3,conv2:10" (fraction or count of units)
    prune: Any = None  # 0.92 | "fc1:0.96,fc2:0.9" | "q=1.0" | {"2.weight": 0.9}
    prune_mode: str = "oneshot"  # oneshot | gradual (AGP rounds) | global (one threshold)
    prune_steps: int = 1  # gradual: pruning rounds, retraining between them
    retrain_epochs: int = 0
    retrain_lr: float = 0.01
    share_bits: Any = None  # "conv=8,fc=5" | "fc1=4,fc=5" | 5 | {"2.weight": 5}
    share_init: str = "linear"
    share_biases: int | None = None  # bits for biases, None: keep them (float16 if exact)
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    finetune_optimizer: str = "adam"
    quantize: str | None = None  # int8 | int4 | ... | ternary (instead of sharing)
    per_channel: bool = False
    asymmetric: bool = False
    half_biases: bool = True  # round unshared biases to float16: half the bytes
    half_codebooks: bool = True  # round shared values to float16: half the codebook bytes
    optimizer: str = "momentum"
    weight_decay: float = 0.0
    batch_size: int = 64
    augment: str | None = "shift"
    seed: int = 0


@dataclass
class CompressionResult:
    """The compressed model, its .dcz bytes and statistics, and the report (JSON-able)."""

    model: Module
    blob: bytes
    stats: dict[str, Any]
    report: dict[str, Any]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    shared: dict[str, quantize.SharedParam] = field(default_factory=dict)
    pre_share: dict[str, Any] = field(default_factory=dict)  # kept weights before k-means


def parse_bits(model: Module, spec: Any) -> dict[str, int]:
    """``{param: bits}`` from ``"conv=8,fc=5"``, ``"fc1=4,fc=5"``, ``"2:4"``, ``5`` or a dict.

    ``conv``/``fc`` set every 4-d / 2-d weight; a layer key (``fc1``, ``2``, ``#0``,
    ``2.weight``) sets one and wins over the kind.
    """
    weights = prune.prunable(model)
    if spec is None:
        return {}
    if isinstance(spec, int) and not isinstance(spec, bool):
        return {n: int(spec) for n in weights}
    items = spec.items() if isinstance(spec, dict) else [
        part.replace(":", "=").split("=", 1) for part in str(spec).split(",") if part.strip()]
    if isinstance(spec, str) and spec.strip().isdigit():
        return {n: int(spec) for n in weights}
    kinds, layers = {}, {}
    for key, value in items:
        key = str(key).strip()
        try:
            bits = int(value)
        except ValueError:
            raise ValueError(f"bits for {key!r} must be an integer, got {value!r}") from None
        if key in ("conv", "fc"):
            kinds[4 if key == "conv" else 2] = bits
        else:
            layers[prune.resolve_key(model, key)] = bits
    out = {n: kinds[p.data.ndim] for n, p in weights.items() if p.data.ndim in kinds}
    out.update(layers)
    return out


class Pipeline:
    """Runs a ``CompressionPlan`` on a model with train/validation data."""

    def __init__(self, model: Module, train: Any, val: Any, plan: CompressionPlan,
                 info: dict[str, Any] | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.model, self.train, self.val, self.plan = model, train, val, plan
        self.info = dict(info or {})
        self.progress = progress
        self.log = log or (lambda _msg: None)
        self.stages: list[dict[str, Any]] = []
        self.quantized: dict[str, QuantizedTensor] = {}
        self.shared: dict[str, quantize.SharedParam] = {}
        self.extra: dict[str, Any] = {}
        self.pre_share: dict[str, Any] = {}

    # ---- helpers ----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        from distnet.train import evaluate

        return evaluate(self.model, self.val)

    def record(self, stage: str, t0: float, size: int | None = None, **extra: Any
               ) -> dict[str, Any]:
        """Evaluate and measure the model after ``stage``; log and keep the figures."""
        result = self.evaluate()
        if size is None:
            size = dcz.encode_model(self.model, self.quantized)[1]["file_bytes"]
        entry = {"stage": stage, "accuracy": result["accuracy"], "loss": result["loss"],
                 "params": self.model.num_parameters(), "dcz_bytes": size,
                 "seconds": round(time.perf_counter() - t0, 2), **extra}
        self.stages.append(entry)
        self.log(f"{stage:<14} accuracy {100 * entry['accuracy']:.2f}%  "
                 f"file {entry['dcz_bytes']:,} B  ({entry['seconds']:.1f} s)")
        return entry

    def fit(self, epochs: int, update: Any, desc: str, start_epoch: int = 0) -> None:
        from distnet.nn import CrossEntropyLoss
        from distnet.train import fit

        augment = None
        if self.plan.augment and self.plan.augment != "none":
            from distnet.setup import augmentation_for

            augment = augmentation_for({"augment": self.plan.augment},
                                       {"input_shape": self.train.x.shape[1:]})
        fit(self.model, self.train, None, epochs=epochs, batch_size=self.plan.batch_size,
            criterion=CrossEntropyLoss(), update=update, seed=self.plan.seed, augment=augment,
            progress=self.progress, desc=desc, start_epoch=start_epoch)

    def retrain(self, epochs: int, lr: float, desc: str,
                rounds: list[Callable[[], Any]] | None = None) -> None:
        """Train ``epochs`` epochs under one cosine schedule (the optimizer honours masks).

        ``rounds`` (gradual pruning) run at equally spaced epochs over the first half, so
        the schedule is not restarted between pruning steps and the second half recovers.
        """
        rounds = list(rounds or [])
        if epochs <= 0:
            for step in rounds:
                step()
            return
        from distnet.optim import build_optimizer, build_schedule
        from distnet.train import LocalUpdate, steps_per_epoch

        opt = build_optimizer(self.plan.optimizer, self.model, lr=lr,
                              weight_decay=self.plan.weight_decay)
        total = epochs * steps_per_epoch(len(self.train), self.plan.batch_size)
        update = LocalUpdate(opt, build_schedule("cosine", lr, total))
        every = max(1, epochs // (2 * len(rounds))) if rounds else 0
        epoch = 0
        for k, step in enumerate(rounds):
            step()
            span = every if k < len(rounds) - 1 else 0
            span = min(span, epochs - epoch)
            if span:
                self.fit(span, update, f"{desc} {k + 1}/{len(rounds)}", start_epoch=epoch)
                epoch += span
        if epochs > epoch:
            self.fit(epochs - epoch, update, desc, start_epoch=epoch)

    # ---- stages ------------------------------------------------------------------------
    def run(self) -> CompressionResult:
        p = self.plan
        t0 = time.perf_counter()
        self.dense_bytes = 4 * self.model.num_parameters()
        self.record("baseline", t0)
        if p.fold_bn:
            t0 = time.perf_counter()
            self.record("fold-bn", t0, folded=fold.fold_batchnorm(self.model))
        if p.lowrank:
            t0 = time.perf_counter()
            self.extra["lowrank"] = lowrank.factorize_model(self.model, p.lowrank)
            self.record("lowrank", t0)
            if p.lowrank_epochs:
                t0 = time.perf_counter()
                self.retrain(p.lowrank_epochs, p.retrain_lr, "low-rank fine-tune")
                self.record("lowrank-tuned", t0)
        if p.prune_units:
            self.units_stage()
        if p.prune is not None:
            self.prune_stage()
        if p.quantize:
            t0 = time.perf_counter()
            self.quantize_stage()
            self.record("quantize", t0)
        elif p.share_bits is not None:
            self.share_stage()
        if p.half_biases:
            self.round_biases()
        t0 = time.perf_counter()
        meta = dict(self.info.get("meta", {}))  # small: it is part of the file size
        blob, stats = dcz.encode_model(self.model, self.quantized, meta)
        final = self.record("final", t0, size=stats["file_bytes"])
        report = self.report(stats, final)
        return CompressionResult(self.model, blob, stats, report, self.quantized, self.shared,
                                 self.pre_share)

    def prune_stage(self) -> None:
        p = self.plan
        t0 = time.perf_counter()
        if p.prune_mode == "gradual" and p.prune_steps > 1:
            params = dict(self.model.named_parameters())
            targets = prune.resolve_targets(self.model, p.prune)
            if any(isinstance(v, tuple) for v in targets.values()):
                raise ValueError("gradual pruning needs sparsities, not q= thresholds")
            targets = {n: prune.validate_amount(v, params[n].size) / params[n].size
                       for n, v in targets.items()}

            def round_k(k: int) -> Callable[[], None]:
                def step() -> None:
                    for n, final in targets.items():
                        prune.prune_param(params[n], prune.agp_sparsity(k, final, 0.0, 0,
                                                                         p.prune_steps))
                    self.log(f"AGP round {k}/{p.prune_steps}: " + ", ".join(
                        f"{n} {100 * s:.1f}%" for n, s in self.sparsities().items()))
                return step

            self.retrain(p.retrain_epochs, p.retrain_lr, "AGP",
                         [round_k(k) for k in range(1, p.prune_steps + 1)])
            self.record("prune+retrain", t0, sparsity=self.sparsities())
            return
        if p.prune_mode == "global":
            prune.global_prune(self.model, p.prune)
        elif p.prune_mode in ("oneshot", "gradual"):
            prune.prune_model(self.model, p.prune)
        else:
            raise ValueError(f"unknown prune mode {p.prune_mode!r}: oneshot, gradual or global")
        self.record("prune", t0, sparsity=self.sparsities())
        if p.retrain_epochs:
            t0 = time.perf_counter()
            self.retrain(p.retrain_epochs, p.retrain_lr, "retrain")
            self.record("retrain", t0)

    def units_stage(self) -> None:
        """Structured pruning: whole neurons / filters go, the dense shapes shrink."""
        from compression.structured import prune_units_model

        p = self.plan
        t0 = time.perf_counter()
        spec = prune.parse_spec(p.prune_units) if isinstance(p.prune_units, str) else \
            p.prune_units
        if not isinstance(spec, dict):
            raise ValueError(f"--prune-units needs LAYER:AMOUNT pairs, got {p.prune_units!r}")
        by_index = {}
        for key, amount in spec.items():
            name = prune.resolve_key(self.model, key)
            if name.count(".") != 1:
                raise ValueError(f"structured pruning works on a top-level Sequential layer, "
                                 f"not {name}")
            by_index[int(name.split(".")[0])] = amount
        kept = prune_units_model(self.model, by_index)
        self.record("prune-units", t0, units_kept={str(k): v for k, v in kept.items()})
        if p.prune is None and p.retrain_epochs:
            t0 = time.perf_counter()
            self.retrain(p.retrain_epochs, p.retrain_lr, "retrain")
            self.record("retrain", t0)

    def sparsities(self) -> dict[str, float]:
        return {n: round(prune.sparsity(q), 4) for n, q in prune.prunable(self.model).items()}

    def share_stage(self) -> None:
        p = self.plan
        t0 = time.perf_counter()
        bits = parse_bits(self.model, p.share_bits)
        if p.share_biases:
            bits.update({n: int(p.share_biases) for n, q in self.model.named_parameters()
                         if q.data.ndim == 1 and n.endswith("bias")})
        params = dict(self.model.named_parameters())
        self.pre_share = {n: backend.to_host(params[n].data).reshape(-1)[
            quantize.kept_positions(params[n])].copy() for n in bits if n in params}
        self.shared = quantize.share_weights(self.model, bits, init=p.share_init, seed=p.seed)
        self.record("share", t0, bits=bits)
        if p.finetune_epochs:
            t0 = time.perf_counter()
            update = quantize.CentroidUpdate.build(
                self.model, self.shared, p.finetune_optimizer, lr=p.finetune_lr,
                others_lr=p.finetune_lr)
            self.fit(p.finetune_epochs, update, "centroid fine-tune")
            self.record("finetune", t0)
        if p.half_codebooks:
            import numpy as np

            for sp in self.shared.values():
                c = sp.centroids.data
                c[...] = c.astype(np.float16).astype(np.float32)
                sp.apply()

    def quantize_stage(self) -> None:
        p = self.plan
        text = str(p.quantize).lower()
        if text == "ternary":
            bits, scheme = 2, "ternary"
        elif text.startswith("int") and text[3:].isdigit():
            bits, scheme = int(text[3:]), "asymmetric" if p.asymmetric else "symmetric"
        else:
            raise ValueError(f"--quantize takes int2..int8 or ternary, got {p.quantize!r}")
        self.quantized = quantize_model(self.model, bits, scheme, p.per_channel)

    def round_biases(self) -> None:
        """Round the parameters that are stored raw (not shared) to float16 values."""
        import numpy as np

        coded = set(self.shared) | set(self.quantized)
        for name, q in self.model.named_parameters():
            if name not in coded and q.data.ndim == 1:
                host = backend.to_host(q.data).astype(np.float16).astype(np.float32)
                q.data[...] = backend.get_array_module(q.data).asarray(host)

    def report(self, stats: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
        from compression.report import build_report

        return build_report(self.model, stats, self.stages, self.dense_bytes,
                            plan=asdict(self.plan), extra=self.extra,
                            codebooks=quantize.codebook_of(self.shared.values()))


def compress(model: Module, train: Any, val: Any, plan: CompressionPlan,
             info: dict[str, Any] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> CompressionResult:
    """Run ``plan`` on ``model`` (changed in place); see ``Pipeline``."""
    return Pipeline(model, train, val, plan, info, progress, log).run()
