"""The entry points: ``quantize(model, config)``, ``calibrate(model)``, ``quant_report(model)``.

Lifecycle: quantize (swap layers, weights get qparams) -> calibrate activations (a context
manager over forward passes, or a PTQ algorithm) -> sample/evaluate/save.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from diffquant.config import QuantConfig, QuantScheme
from diffquant.models.adapter import call_model, example_inputs
from diffquant.nn.attention import QuantAttnProcessor
from diffquant.nn.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear, QuantMatMul
from diffquant.nn.quantizers import ActQuantizer, WeightQuantizer

log = logging.getLogger(__name__)


# ---- split-shortcut detection ---------------------------------------------------------------
@torch.no_grad()
def find_split_points(model: nn.Module, inputs: Optional[tuple] = None) -> dict[str, int]:
    """Layers that consume ``cat([h, skip], dim=1)`` in the up path, with the split channel.

    Runs one forward pass with a pre-hook on every up block that has ``resnets``: each of its
    resnets consumes ``cat([h, res_hidden_states_tuple[-1 - i]])`` (the diffusers convention),
    so the split of resnet ``i`` is the channel count of ``h``. Returns a mapping from the
    qualified names of each such resnet's ``conv1`` and ``conv_shortcut`` to the split index.
    """
    up_blocks = getattr(model, "up_blocks", None)
    if up_blocks is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, int] = {}
    handles = []

    def hook(block, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        if h is None or res is None or not isinstance(res, (tuple, list)):
            return
        c_h = h.shape[1]
        for i, resnet in enumerate(block.resnets):
            if i >= len(res):
                break
            c_skip = res[-1 - i].shape[1]
            if c_h + c_skip != getattr(resnet, "in_channels", -1):
                log.warning("up block %s resnet %d: channels %d+%d do not match its input %s; not split",
                            names[id(block)], i, c_h, c_skip, getattr(resnet, "in_channels", "?"))
            else:
                base = names[id(resnet)]
                found[f"{base}.conv1"] = c_h
                if getattr(resnet, "conv_shortcut", None) is not None:
                    found[f"{base}.conv_shortcut"] = c_h
            c_h = resnet.out_channels

    for blk in up_blocks:
        if hasattr(blk, "resnets"):
            handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        x, t, cond = inputs if inputs is not None else example_inputs(model)
        was_training = model.training
        model.eval()
        call_model(model, x, t, cond)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return found


# ---- quantize ---------------------------------------------------------------------------------
def _softmax_scheme(bits: int) -> Optional[QuantScheme]:
    return None if bits >= 16 else QuantScheme(bits=bits, symmetric=False, estimator="minmax")


def quantize(
    model: nn.Module,
    config: QuantConfig,
    *,
    inplace: bool = False,
    example: Optional[tuple] = None,
    split_points: Optional[dict[str, int]] = None,
    init_weights: bool = True,
) -> nn.Module:
    """Replace every Conv2d/Linear by its quantized version and route diffusers attention through
    quantized matmuls. Weight qparams are computed now; activation quantizers need calibration.

    ``split_points`` (name -> channel) overrides the automatic detection of concatenated skip
    inputs; ``example`` = (sample, timestep, cond) is the input used for that detection.
    ``init_weights=False`` skips computing weight qparams (a checkpoint will supply them).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig; got {type(config).__name__}")
    if any(isinstance(m, (*QUANT_LAYER_TYPES, QuantMatMul)) for m in model.modules()):
        raise ValueError("model is already quantized")
    if not inplace:
        model = copy.deepcopy(model)
    if config.split_shortcut:
        splits = find_split_points(model, example) if split_points is None else dict(split_points)
    else:
        splits = {}

    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, mod in targets:
        schemes = config.schemes_for(name)
        if schemes is None:
            continue
        w_s, a_s = schemes
        split = splits.get(name)
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        q = cls.from_float(mod, w_s, a_s, name=name, split=split, init=init_weights)
        _set_submodule(model, name, q)

    att_scheme = config.attention_scheme
    sm_scheme = _softmax_scheme(config.softmax_bits)
    if att_scheme is not None or sm_scheme is not None:
        for name, mod in list(model.named_modules()):
            if type(mod).__name__ == "Attention" and hasattr(mod, "set_processor"):
                o = config.override_for(name)
                if o is not None and o.skip:
                    continue
                proc = QuantAttnProcessor(att_scheme, sm_scheme, name=name).to(_device_of(mod))
                mod.set_processor(proc)
    model._diffquant_config = config  # type: ignore[attr-defined]
    model._diffquant_splits = splits  # type: ignore[attr-defined]
    return model


def _device_of(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---- calibration ------------------------------------------------------------------------------
def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer) and m.enabled]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer) and m.enabled]


def set_quant_mode(model: nn.Module, mode: str, *, weights: bool = True, acts: bool = True) -> None:
    """Switch quantizers to "quant", "fp" (pass-through) or "observe" (acts only)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer) and weights and mode != "observe":
            m.set_mode(mode)
        elif isinstance(m, ActQuantizer) and acts:
            m.set_mode(mode)


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run every quantizer as a pass-through inside the context (e.g. to trace shapes or call order of a
    model whose activations are not calibrated yet); the previous modes are restored on exit."""
    qs = [m for m in model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    modes = [q.mode for q in qs]
    for q in qs:
        q.mode = "fp"
    try:
        yield model
    finally:
        for q, mode in zip(qs, modes):
            q.mode = mode


@contextlib.contextmanager
def calibrate(model: nn.Module, reservoir_size: int = 1 << 20, seed: int = 0) -> Iterator[nn.Module]:
    """Forward passes inside this context feed the activation observers; on exit every activation
    quantizer gets its qparams. Observation sees full-precision activations (weights quantized)."""
    qs = act_quantizers(model)
    if not qs:
        log.info("calibrate: the model has no activation quantizers")
    for i, q in enumerate(qs):
        q.start_observing(reservoir_size=reservoir_size, seed=seed + i)
    ok = False
    try:
        yield model
        ok = True
    finally:
        if ok:
            unseen = [q.name for q in qs if q.observer is None or q.observer.batches == 0]
            if unseen:
                for q in qs:
                    q.observer, q.mode = None, "quant"
                raise RuntimeError(
                    f"{len(unseen)} activation quantizers saw no data during calibration "
                    f"(first: {unseen[:3]}); the calibration forward passes must exercise the whole model"
                )
            for q in qs:
                q.finalize()
        else:
            for q in qs:
                q.observer, q.mode = None, "quant"


# ---- report -----------------------------------------------------------------------------------
@dataclass
class QuantReport:
    config: str
    counts: dict[str, int]
    layers: list[dict[str, Any]] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    params_total: int = 0
    fp32_bytes: int = 0
    fp16_bytes: int = 0
    quantized_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "counts": self.counts,
            "params_total": self.params_total,
            "fp32_bytes": self.fp32_bytes,
            "fp16_bytes": self.fp16_bytes,
            "quantized_bytes": self.quantized_bytes,
            "compression_vs_fp16": self.fp16_bytes / max(self.quantized_bytes, 1),
            "float_layers": self.float_layers,
            "layers": self.layers,
        }

    def summary(self) -> str:
        c = self.counts
        return (
            f"{self.config}: {c.get('QuantConv2d', 0)} Conv2d + {c.get('QuantLinear', 0)} Linear quantized, "
            f"{c.get('QuantMatMul', 0)} attention matmuls, {c.get('split_layers', 0)} split-shortcut layers; "
            f"{self.params_total / 1e6:.2f}M params: fp16 {self.fp16_bytes / 2**20:.2f} MiB -> "
            f"{self.quantized_bytes / 2**20:.2f} MiB"
        )


def _bits(s: Optional[QuantScheme]) -> int:
    return 16 if s is None else s.bits


def quant_report(model: nn.Module) -> QuantReport:
    """What was quantized (counts per module type, bits per layer) and the model's size.

    ``quantized_bytes`` counts each quantized weight at its bit-width plus fp16 scale and zero
    point per quantization range, and every other parameter (biases, norms, float layers) at fp16.
    """
    cfg = getattr(model, "_diffquant_config", None)
    counts = {"QuantConv2d": 0, "QuantLinear": 0, "QuantMatMul": 0, "split_layers": 0, "Conv2d": 0, "Linear": 0}
    layers, floats = [], []
    q_weight_ids: set[int] = set()
    qbytes = 0.0
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES):
            counts[type(m).__name__] += 1
            counts["split_layers"] += int(m.split is not None)
            wqs = m.weight_quantizers()
            w_s, a_s = wqs[0].scheme, m.act_quantizer.scheme
            if w_s is not None:
                q_weight_ids.add(id(m.weight))
                qbytes += m.weight.numel() * w_s.bits / 8
                qbytes += sum(q.scale.numel() * 2 * (1 if w_s.symmetric else 2) for q in wqs)
            layers.append({
                "name": name, "type": type(m).__name__, "weight_bits": _bits(w_s), "act_bits": _bits(a_s),
                "weight_scheme": w_s.describe() if w_s else "fp", "act_scheme": a_s.describe() if a_s else "fp",
                "split": m.split, "params": m.weight.numel(),
            })
        elif isinstance(m, QuantMatMul):
            counts["QuantMatMul"] += 1
            layers.append({
                "name": name, "type": "QuantMatMul", "weight_bits": None,
                "act_bits": [_bits(m.quantizer_a.scheme), _bits(m.quantizer_b.scheme)], "split": None, "params": 0,
            })
        elif type(m) in (nn.Conv2d, nn.Linear):
            counts[type(m).__name__] += 1
            floats.append(name)
    total = 0
    fp_rest = 0
    for p in model.parameters():
        total += p.numel()
        if id(p) not in q_weight_ids:
            fp_rest += p.numel()
    qbytes += fp_rest * 2
    return QuantReport(
        config=cfg.describe() if cfg is not None else "fp",
        counts=counts,
        layers=layers,
        float_layers=floats,
        params_total=total,
        fp32_bytes=total * 4,
        fp16_bytes=total * 2,
        quantized_bytes=int(round(qbytes)),
    )
