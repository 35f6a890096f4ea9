"""Model cost accounting: parameter bytes at the chosen bit-widths and bit-operations per forward pass.

``BOPs = MACs x weight bits x activation bits`` (for the attention matmuls: MACs x bits of the two
operands), per layer and in total, counted with forward hooks on one example forward pass (batch 1
by default, so the numbers are per image and per model evaluation; one sample costs ``steps`` of
them):

* Conv2d: MACs = output elements x in_channels / groups x kh x kw;
* Linear: MACs = output elements x in_features;
* attention matmuls: through the :class:`~diffquant.nn.modules.QuantMatMul` modules of a quantized
  model (MACs = batch x M x K x N of ``a @ b``), or, for diffusers ``Attention`` blocks with their
  own processor, Q·Kᵀ = B x L_q x L_k x inner_dim and softmax·V = B x L_q x L_k x inner_dim_v.

Bit-widths come from the model's quantizers (a quantized model), or from a :class:`QuantConfig`
(what the model *would* cost, overrides included), or from uniform ``weight_bits``/``act_bits``.
Floating-point operands count ``float_bits`` (16 by default, the fp16 convention of
:func:`~diffquant.quantize.quant_report`; pass 32 for the W32A32 convention of some papers).
Elementwise work (norms, activations, softmax, residual adds) is not counted.

Parameter bytes: each quantized weight at its bit-width plus one fp16 scale (and one fp16 zero
point when asymmetric) per quantization range; every other parameter at ``float_bits``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from diffquant.config import OFF_BITS, QuantConfig, QuantScheme
from diffquant.models.adapter import call_model, example_inputs

log = logging.getLogger(__name__)

__all__ = ["LayerCost", "ModelCost", "model_cost"]


@dataclass
class LayerCost:
    name: str
    type: str  # Conv2d | Linear | MatMul
    macs: int
    weight_bits: Optional[int]  # None for matmuls (no weights)
    act_bits: tuple[int, ...]  # (input,) or, for matmuls, (a, b)
    params: int = 0
    param_bytes: float = 0.0
    calls: int = 0

    @property
    def bops(self) -> int:
        bits = (self.weight_bits,) + self.act_bits if self.weight_bits is not None else self.act_bits
        return int(self.macs * math.prod(bits))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["act_bits"] = list(self.act_bits)
        d["bops"] = self.bops
        return d


@dataclass
class ModelCost:
    layers: list[LayerCost]
    float_bits: int
    params_total: int
    param_bytes: float  # all parameters, at their bit-widths
    other_params: int  # parameters outside Conv2d/Linear weights (biases, norms, embeddings, float layers' ...)
    batch: int = 1
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bops(self) -> int:
        return sum(layer.bops for layer in self.layers)

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for layer in self.layers:
            d = out.setdefault(layer.type, {"layers": 0, "macs": 0, "bops": 0})
            d["layers"] += 1
            d["macs"] += layer.macs
            d["bops"] += layer.bops
        return out

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        d = {"description": self.description, "float_bits": self.float_bits, "batch": self.batch,
             "params_total": self.params_total, "param_bytes": self.param_bytes, "param_MiB": self.param_bytes / 2**20,
             "macs": self.macs, "bops": self.bops, "gmacs": self.macs / 1e9, "gbops": self.bops / 1e9,
             "by_type": self.by_type(), "notes": self.notes}
        if layers:
            d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    def summary(self) -> str:
        return (f"{self.description or 'model'}: {self.params_total / 1e6:.2f}M params, {self.param_bytes / 2**20:.2f} MiB "
                f"at these bit-widths; {self.macs / 1e9:.3f} GMACs, {self.bops / 1e9:.1f} GBOPs per forward "
                f"(batch {self.batch}; float = {self.float_bits} bits)")

    def rows(self, top: Optional[int] = None) -> list[dict[str, Any]]:
        """Per-layer table rows, largest BOPs first (``top`` of them)."""
        total = max(self.bops, 1)
        layers = sorted(self.layers, key=lambda l: -l.bops)[:top]
        return [{"layer": l.name, "type": l.type, "w_bits": l.weight_bits if l.weight_bits is not None else "",
                 "a_bits": "x".join(map(str, l.act_bits)), "MMACs": l.macs / 1e6, "GBOPs": l.bops / 1e9,
                 "share_%": 100.0 * l.bops / total, "KiB": l.param_bytes / 1024} for l in layers]


def _bits_of(s: Optional[QuantScheme], float_bits: int) -> int:
    return float_bits if s is None else int(s.bits)


def _num_ranges(s: QuantScheme, weight: torch.Tensor) -> int:
    if s.granularity == "per_tensor":
        return 1
    if s.granularity == "per_channel":
        return int(weight.shape[0])
    gs = s.group_size or weight.shape[1]
    return int(weight.shape[0] * math.ceil(weight[0].numel() / gs))


def _qparam_bytes(s: QuantScheme, ranges: int) -> float:
    return ranges * 2.0 * (1 if s.symmetric else 2)


def _uniform_scheme(bits: Optional[int], what: str) -> Optional[QuantScheme]:
    if bits is None or bits in OFF_BITS:
        return None
    return QuantScheme(bits=bits, granularity="per_channel") if what == "weight" else QuantScheme(bits=bits)


def model_cost(
    model: nn.Module,
    *,
    config: Optional[QuantConfig] = None,
    weight_bits: Optional[int] = None,
    act_bits: Optional[int] = None,
    float_bits: int = 16,
    example: Optional[tuple] = None,
    batch: int = 1,
) -> ModelCost:
    """Cost of one forward pass of ``model`` (see the module docstring).

    A quantized model (``diffquant.quantize``) reports its own bit-widths; for a floating-point model,
    ``config`` (a :class:`QuantConfig`) or ``weight_bits``/``act_bits`` (16/32 = float) say which
    bit-widths to count. ``example`` = (sample, timestep, cond) replaces the default example input."""
    from diffquant.nn.attention import QuantAttnProcessor
    from diffquant.nn.modules import QUANT_LAYER_TYPES, QuantMatMul
    from diffquant.quantize import float_mode

    if float_bits not in (8, 16, 32):
        raise ValueError(f"float_bits={float_bits!r} is not supported; allowed: 8, 16, 32")
    quantized = getattr(model, "_diffquant_config", None) is not None
    if config is not None and (weight_bits is not None or act_bits is not None):
        raise ValueError("give either config or weight_bits/act_bits, not both")
    if quantized and (config is not None or weight_bits is not None or act_bits is not None):
        raise ValueError("the model is already quantized: its own bit-widths are counted; "
                         "pass the floating-point model to cost another configuration")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig; got {type(config).__name__}")
    if config is None and not quantized and (weight_bits is not None or act_bits is not None):
        from diffquant.recipes import build_config

        config = build_config(16 if weight_bits is None else weight_bits, 16 if act_bits is None else act_bits)
    desc = (model._diffquant_config.describe() if quantized else config.describe() if config is not None else
            f"FP (float{float_bits})")

    splits: dict[str, int] = {}
    if config is not None and not quantized and config.split_shortcut and config.weight is not None:
        from diffquant.quantize import find_split_points

        splits = find_split_points(model, example)  # split layers keep two sets of weight ranges
    costs: dict[str, LayerCost] = {}
    seen_weights: dict[int, float] = {}  # id(weight) -> bytes

    def add(name: str, typ: str, macs: int, wb: Optional[int], ab: tuple[int, ...]) -> LayerCost:
        c = costs.get(name)
        if c is None:
            c = costs[name] = LayerCost(name, typ, 0, wb, ab)
        c.macs += int(macs)
        c.calls += 1
        return c

    def layer_schemes(name: str, m: nn.Module) -> tuple[Optional[QuantScheme], Optional[QuantScheme]]:
        if isinstance(m, QUANT_LAYER_TYPES):
            return m.weight_quantizers()[0].scheme, m.act_quantizer.scheme
        if config is not None:
            s = config.schemes_for(name)
            return (None, None) if s is None else s
        return None, None

    def layer_hook(name: str):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            ws, as_ = layer_schemes(name, m)
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                macs = out.numel() * (m.in_channels // m.groups) * kh * kw
                typ = "Conv2d"
            else:
                macs = out.numel() * m.in_features
                typ = "Linear"
            c = add(name, typ, macs, _bits_of(ws, float_bits), (_bits_of(as_, float_bits),))
            if id(m.weight) not in seen_weights:
                if ws is None:
                    nbytes = m.weight.numel() * float_bits / 8
                elif isinstance(m, QUANT_LAYER_TYPES):
                    nbytes = m.weight.numel() * ws.bits / 8 + sum(
                        _qparam_bytes(ws, q.scale.numel()) for q in m.weight_quantizers())
                else:
                    sp = splits.get(name)
                    ranges = (_num_ranges(ws, m.weight) if sp is None else
                              _num_ranges(ws, m.weight[:, :sp]) + _num_ranges(ws, m.weight[:, sp:]))
                    nbytes = m.weight.numel() * ws.bits / 8 + _qparam_bytes(ws, ranges)
                seen_weights[id(m.weight)] = nbytes
                c.params = m.weight.numel()
                c.param_bytes = nbytes
        return hook

    def matmul_hook(name: str):
        def hook(m: QuantMatMul, args: tuple, out: torch.Tensor) -> None:
            a = args[0]
            macs = out.numel() * a.shape[-1]
            add(name, "MatMul", macs, None, (_bits_of(m.quantizer_a.scheme, float_bits),
                                             _bits_of(m.quantizer_b.scheme, float_bits)))
        return hook

    def attention_hook(name: str):
        def hook(attn: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if isinstance(getattr(attn, "processor", None), QuantAttnProcessor):
                return  # its QuantMatMul modules are counted
            h = kwargs.get("hidden_states", args[0] if args else None)
            enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if h is None:
                return
            bsz = h.shape[0]
            lq = h.shape[2] * h.shape[3] if h.dim() == 4 else h.shape[1]
            lk = lq if enc is None else (enc.shape[2] * enc.shape[3] if enc.dim() == 4 else enc.shape[1])
            inner_q, inner_v = attn.to_q.out_features, attn.to_v.out_features
            qk_s = pv_s = sm_s = None
            if config is not None and not (config.override_for(name) is not None and config.override_for(name).skip):
                qk_s = pv_s = config.attention_scheme
                sm_s = None if config.softmax_bits >= 16 else QuantScheme(config.softmax_bits)
            fb = float_bits
            add(f"{name}.qk", "MatMul", bsz * lq * lk * inner_q, None, (_bits_of(qk_s, fb), _bits_of(qk_s, fb)))
            add(f"{name}.pv", "MatMul", bsz * lq * lk * inner_v, None, (_bits_of(sm_s, fb), _bits_of(pv_s, fb)))
        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook(name)))
        elif isinstance(m, QuantMatMul):
            handles.append(m.register_forward_hook(matmul_hook(name)))
        elif type(m).__name__ == "Attention" and hasattr(m, "to_q") and hasattr(m, "to_v"):
            handles.append(m.register_forward_hook(attention_hook(name), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        x, t, cond = example if example is not None else example_inputs(model, batch=batch)
        with torch.no_grad(), float_mode(model):  # shapes only: run the float path (no qparams needed)
            call_model(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = 0
    other = 0
    qbytes = sum(seen_weights.values())
    for p in model.parameters():
        total += p.numel()
        if id(p) not in seen_weights:
            other += p.numel()
    notes = []
    unused = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in costs]
    if unused:
        notes.append(f"{len(unused)} Conv2d/Linear layers not called by the example forward (e.g. {unused[:3]}); "
                     f"their weights count at float_bits")
    return ModelCost(list(costs.values()), float_bits, total, qbytes + other * float_bits / 8, other,
                     batch=int(x.shape[0]), description=desc, notes=notes)
