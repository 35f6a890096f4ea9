"""Real int8 inference on x86 CPUs: convert a calibrated (fake-quant) diffquant model.

``convert_cpu(qmodel)`` replaces every convertible :class:`~diffquant.nn.modules.QuantConv2d` /
:class:`~diffquant.nn.modules.QuantLinear` by an :class:`Int8Conv2d` / :class:`Int8Linear` that runs
PyTorch's own oneDNN int8 kernels (``torch.ops.onednn.qconv_pointwise`` / ``qlinear_pointwise``:
uint8 activations x int8 weights, int32 accumulation, fp32 output with the per-channel dequantization
and the bias fused into the kernel). Everything else (GroupNorm, SiLU, residual adds, the time
embedding's sinusoids, softmax, the attention matmuls with their fake quantizers) stays as it was, in
fp32. The activation quantization is one pass over the fp32 input before the kernel (the fake quantizer's
formula, compiled by torch.compile/Inductor into one vectorised loop; ``quant="eager"`` runs the same
formula as plain ops); the dequantization, bias and per-channel weight scales are fused into the kernel.

Exactness and the one deliberate deviation
-----------------------------------------
The integer math equals the fake-quant simulation (up to the order of fp32 accumulation of the
dequantized result and rare ties in the activation rounding) *when the kernel does not saturate*.
x86 CPUs without AVX512-VNNI/AMX (e.g. AVX2-only AMD EPYC) multiply uint8 x int8 with
``vpmaddubsw``, which adds pairs of products into a *saturating int16*: 255 * 127 * 2 > 32767, so
8-bit activations with 8-bit weights give wrong sums (measured here: up to 60 output codes off).
PyTorch's own x86 qconfigs use ``reduce_range`` (7-bit activations) for this reason, and so does
this converter: with ``reduce_range=True`` the activation range the simulation calibrated
([qmin - z, qmax - z] * s) is re-gridded onto 128 levels (scale about 2x), pair sums stay below
127 * 128 * 2 = 32512, and the result is exact again -- but it is a 7-bit-activation model.
``reduce_range="auto"`` (default) turns it on exactly when ``torch.cpu._is_vnni_supported()`` is
false. :func:`simulate_cpu_int8` builds the fake-quant model with the same 7-bit grids: the int8
model matches *that* up to accumulation order (the test oracle); the cost of the 7-bit grid against
the 8-bit simulation is measured separately (benchmarks/bench_cpu_int8.py).

Weights: the simulation's integer codes ``q`` with per-channel zero point ``z`` (asymmetric weights,
the diffquant default) are stored as int8 ``q - o`` with a per-channel offset ``o`` (``o = z`` when
``q - z`` fits int8, else the grid's middle); oneDNN only takes symmetric weights, so the remainder
``-(z - o) * s_w * sum(x_hat over the receptive field)`` is added in fp32. The sum comes out of the
same int8 kernel: the packed weight gets one extra output channel of ones (1/C_out more work), and one
fused multiply-add applies the correction. Exact in integers.

Split-shortcut layers (two activation quantizers) run as two int8 kernels on the two input halves,
summed in fp32 (exact). Layers that cannot be converted are left as they were (fake-quant fp32) and
listed in the report with the reason: per-group or FP8 schemes, weights-only layers (no activation
quantizer), non-zero padding modes, grouped convs with asymmetric weights, AdaRound still soft,
quantizers not in mode "quant", uncalibrated activations.

The quantized tensor types (``torch.quantize_per_tensor``, deprecated in torch 2.13) are not used.
torchao's pt2e flow
(``X86InductorQuantizer``) is not used: it calibrates its own observers on an exported graph,
while this converter reuses diffquant's calibrated scales layer by layer in eager mode.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from diffquant.config import QuantScheme
from diffquant.nn.modules import QuantConv2d, QuantLinear
from diffquant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffquant.quant.affine import qparams_from_range, qrange

log = logging.getLogger(__name__)

__all__ = [
    "CpuInt8Report",
    "Int8Conv2d",
    "Int8Linear",
    "convert_cpu",
    "cpu_int8_available",
    "cpu_int8_report",
    "kernel_act_qparams",
    "needs_reduce_range",
    "simulate_cpu_int8",
]


# ---- capability ---------------------------------------------------------------------------------
def cpu_int8_available() -> Optional[str]:
    """None if the oneDNN int8 ops are usable here, else the reason."""
    try:
        torch.ops.onednn.qconv_pointwise.default  # noqa: B018
        torch.ops.onednn.qlinear_pointwise.default  # noqa: B018
    except (AttributeError, RuntimeError) as e:
        return f"this PyTorch build has no oneDNN int8 ops ({e}); CPU int8 inference needs an x86 build with mkldnn"
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this PyTorch build"
    return None


def needs_reduce_range() -> bool:
    """True where uint8 x int8 products are summed in saturating int16 pairs (x86 without VNNI/AMX)."""
    fn = getattr(torch.cpu, "_is_vnni_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    has = bool(fn()) if fn is not None else False
    has = has or (bool(amx()) if amx is not None else False)
    return not has


def _resolve_reduce_range(reduce_range: Union[bool, str]) -> bool:
    if reduce_range == "auto":
        return needs_reduce_range()
    if isinstance(reduce_range, bool):
        return reduce_range
    raise ValueError(f"reduce_range={reduce_range!r}; allowed: True, False, 'auto'")


# ---- qparams ------------------------------------------------------------------------------------
def kernel_act_qparams(aq: ActQuantizer, reduce_range: bool) -> tuple[float, int, int]:
    """(scale, zero_point, qmax) of the uint8 grid the kernel uses for this activation quantizer.

    Without reduce_range this is the simulation's grid shifted to unsigned (exact); with it, the
    simulation's representable range re-gridded onto [0, 127]."""
    s = aq.scheme
    qmin, qmax = qrange(s.bits, s.symmetric)
    scale = aq.scale.detach().float().reshape(())
    zp = aq.zero_point.detach().float().reshape(())
    if not reduce_range:
        shift = -qmin  # symmetric grids [-128, 127] -> [0, 255]; asymmetric ones are already unsigned
        return float(scale), int(zp) + shift, qmax + shift
    lo = (qmin - zp) * scale
    hi = (qmax - zp) * scale
    if s.bits <= 7:  # already fits into 7 bits: shift only, exact
        shift = -qmin
        return float(scale), int(zp) + shift, qmax + shift
    s7, z7 = qparams_from_range(lo, hi, 7, symmetric=False)
    return float(s7), int(z7), 127


def _weight_int8(wq: WeightQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes q - o, per-channel fp32 scale, per-channel residual zero point z - o as fp32)."""
    s = wq.scheme
    codes = wq.integer_codes(w).to(torch.int32)  # same shape as w, values on the simulation's grid
    oc = w.shape[0]
    scale = wq.scale.detach().float().reshape(-1)
    zp = wq.zero_point.detach().float().reshape(-1)
    if scale.numel() == 1:
        scale, zp = scale.expand(oc).clone(), zp.expand(oc).clone()
    zp_i = zp.round().to(torch.int32)
    flat = codes.reshape(oc, -1)
    lo = flat.min(1).values - zp_i
    hi = flat.max(1).values - zp_i
    fits = (lo >= -128) & (hi <= 127)
    qmin, qmax = qrange(s.bits, s.symmetric)
    mid = (qmin + qmax + 1) // 2
    off = torch.where(fits, zp_i, torch.full_like(zp_i, mid))
    q8 = (flat - off[:, None]).reshape(w.shape)
    assert int(q8.min()) >= -128 and int(q8.max()) <= 127
    return q8.to(torch.int8), scale.contiguous(), (zp_i - off).float()


def _quant_codes(x: torch.Tensor, inv_scale: float, zp: int, qmax: int) -> torch.Tensor:
    """uint8 codes clamp(round(x * inv_scale) + zp, 0, qmax): the fake quantizer's formula (multiply by
    the fp32 reciprocal, round half to even), so the codes are those of the simulation."""
    return torch.clamp(torch.round(x * inv_scale) + zp, 0, qmax).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _compiled_quant_codes():
    # one vectorised pass over x (Inductor's C++ backend) instead of four eager ones; called on flat
    # contiguous tensors with dynamic sizes and symbolic scalars: one compilation per process
    return torch.compile(_quant_codes, dynamic=True)


def _inv(scale: float) -> float:
    return float(torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32))


QUANT_MODES = ("compile", "eager")


def _codes_nhwc(fn, x: torch.Tensor, p: "_Int8Part") -> torch.Tensor:
    """uint8 codes of a 4-D input in channels-last layout (what oneDNN computes in). The elementwise
    function only ever sees a flat contiguous tensor: one compiled graph for every shape and layout
    (``detach()`` drops the view's base, on which Dynamo would otherwise guard and recompile)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        if x.is_contiguous():
            return fn(x.view(-1).detach(), p.x_inv, p.x_zp, p.x_qmax).view(x.shape).contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)  # e.g. one half of a split input
    xp = x.permute(0, 2, 3, 1)
    return fn(xp.reshape(-1).detach(), p.x_inv, p.x_zp, p.x_qmax).view(xp.shape).permute(0, 3, 1, 2)


def _quant_fn(mode: str):
    if mode not in QUANT_MODES:
        raise ValueError(f"quant={mode!r}; allowed: {', '.join(QUANT_MODES)}")
    return _compiled_quant_codes() if mode == "compile" else _quant_codes


# ---- modules ------------------------------------------------------------------------------------
class _Int8Part:
    """One int8 kernel call: an input slice with its activation grid and its weight slice."""

    def __init__(self, x_scale: float, x_zp: int, x_qmax: int, w_scale: torch.Tensor, w_rzp: torch.Tensor):
        self.x_scale, self.x_zp, self.x_qmax = x_scale, x_zp, x_qmax
        self.x_inv = _inv(x_scale)
        self.w_scale = w_scale
        self.w_zp0 = torch.zeros(w_scale.numel(), dtype=torch.int32)
        # fp32 compensation for asymmetric weights: -(z - o) * s_w per output channel (None if all 0)
        comp = -(w_rzp * w_scale)
        self.comp = comp if bool((w_rzp != 0).any()) else None
        self.comp_conv = comp.view(1, -1, 1, 1)
        self.comp_lin = comp.view(1, -1)


class Int8Conv2d(nn.Module):
    """A 2-D convolution computed by oneDNN int8 kernels from a calibrated QuantConv2d."""

    def __init__(self, q: QuantConv2d, reduce_range: bool, quant: str = "eager"):
        super().__init__()
        self._quant = _quant_fn(quant)
        self.layer_name = q.layer_name
        self.in_channels, self.out_channels = q.in_channels, q.out_channels
        self.kernel_size, self.stride, self.padding = q.kernel_size, list(q.stride), list(q.padding)
        self.dilation, self.groups = list(q.dilation), q.groups
        self.reduce_range = reduce_range
        self.split = q.split
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        w = q.weight.detach().float()
        slices = [(0, w.shape[1], q.weight_quantizer, q.act_quantizer)] if q.split is None else [
            (0, q.split, q.weight_quantizer, q.act_quantizer),
            (q.split, w.shape[1] - q.split, q.weight_quantizer_b, q.act_quantizer_b),
        ]
        self._parts: list[_Int8Part] = []
        self._packed: list[torch.Tensor] = []
        self._slices = []
        for i, (start, length, wq, aq) in enumerate(slices):
            q8, ws, rzp = _weight_int8(wq, w[:, start : start + length])
            xs, xz, xq = kernel_act_qparams(aq, reduce_range)
            part = _Int8Part(xs, xz, xq, ws, rzp)
            self.register_buffer(f"weight_int8_{i}", q8)
            self.register_buffer(f"weight_scale_{i}", ws)
            self._parts.append(part)
            if part.comp is not None:
                # one extra output channel of ones: the kernel itself returns sum(x_hat) over the
                # receptive field, exactly the factor the asymmetric-weight correction needs
                q8 = torch.cat([q8, torch.ones_like(q8[:1])])
                part.w_scale = torch.cat([ws, ws.new_ones(1)])
                part.w_zp0 = torch.zeros(part.w_scale.numel(), dtype=torch.int32)
            self._packed.append(torch.ops.onednn.qconv_prepack(
                q8, part.w_scale, xs, xz, self.stride, self.padding, self.dilation, self.groups, None))
            self._slices.append((start, length))
        self.bias_ext = None if self.bias is None else torch.cat([self.bias.detach(), self.bias.new_zeros(1)])

    def _part(self, i: int, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        p = self._parts[i]
        # oneDNN computes in NHWC: hand it uint8 codes in that layout (a cheap 1-byte copy if needed)
        xq = _codes_nhwc(self._quant, x, p)
        if p.comp is not None and bias is not None:
            bias = self.bias_ext
        y = torch.ops.onednn.qconv_pointwise(
            xq, p.x_scale, p.x_zp, self._packed[i], p.w_scale, p.w_zp0, bias, self.stride, self.padding,
            self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        if p.comp is not None:
            c = self.out_channels
            # y[:, c] = sum of x_hat over the receptive field (zero padding is real zero on both sides)
            y = torch.addcmul(y[:, :c], y[:, c:], p.comp_conv)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self.layer_name}: Int8Conv2d needs a 4-D (N, C, H, W) input; got shape {tuple(x.shape)}")
        x = x.float()
        if self.split is None:
            return self._part(0, x, self.bias)
        (a0, l0), (a1, l1) = self._slices
        y = self._part(0, x.narrow(1, a0, l0), self.bias)
        return y + self._part(1, x.narrow(1, a1, l1), None)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, split={self.split}, reduce_range={self.reduce_range}")


class Int8Linear(nn.Module):
    """A linear layer computed by oneDNN int8 kernels from a calibrated QuantLinear."""

    def __init__(self, q: QuantLinear, reduce_range: bool, quant: str = "eager"):
        super().__init__()
        self._quant = _quant_fn(quant)
        self.layer_name = q.layer_name
        self.in_features, self.out_features = q.in_features, q.out_features
        self.reduce_range = reduce_range
        self.split = q.split
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        w = q.weight.detach().float()
        slices = [(0, w.shape[1], q.weight_quantizer, q.act_quantizer)] if q.split is None else [
            (0, q.split, q.weight_quantizer, q.act_quantizer),
            (q.split, w.shape[1] - q.split, q.weight_quantizer_b, q.act_quantizer_b),
        ]
        self._parts: list[_Int8Part] = []
        self._packed: list[torch.Tensor] = []
        self._slices = []
        for i, (start, length, wq, aq) in enumerate(slices):
            q8, ws, rzp = _weight_int8(wq, w[:, start : start + length])
            xs, xz, xq = kernel_act_qparams(aq, reduce_range)
            self.register_buffer(f"weight_int8_{i}", q8)
            self.register_buffer(f"weight_scale_{i}", ws)
            part = _Int8Part(xs, xz, xq, ws, rzp)
            self._parts.append(part)
            if part.comp is not None:  # extra output row of ones: the kernel returns sum(x_hat) (see Int8Conv2d)
                q8 = torch.cat([q8, torch.ones_like(q8[:1])])
                part.w_scale = torch.cat([ws, ws.new_ones(1)])
                part.w_zp0 = torch.zeros(part.w_scale.numel(), dtype=torch.int32)
            self._packed.append(torch.ops.onednn.qlinear_prepack(q8, None))
            self._slices.append((start, length))
        self.bias_ext = None if self.bias is None else torch.cat([self.bias.detach(), self.bias.new_zeros(1)])

    def _part(self, i: int, x2: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        p = self._parts[i]
        xq = self._quant(x2.view(-1).detach(), p.x_inv, p.x_zp, p.x_qmax).view(x2.shape)
        if p.comp is not None and bias is not None:
            bias = self.bias_ext
        y = torch.ops.onednn.qlinear_pointwise(
            xq, p.x_scale, p.x_zp, self._packed[i], p.w_scale, p.w_zp0, bias, 1.0, 0, torch.float32, "none", [], "")
        if p.comp is not None:
            n = self.out_features
            y = torch.addcmul(y[:, :n], y[:, n:], p.comp_lin)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.float().reshape(-1, x.shape[-1]).contiguous()
        if self.split is None:
            y = self._part(0, x2, self.bias)
        else:
            (a0, l0), (a1, l1) = self._slices
            y = self._part(0, x2[:, a0 : a0 + l0].contiguous(), self.bias)
            y = y + self._part(1, x2[:, a1 : a1 + l1].contiguous(), None)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, split={self.split}, "
                f"reduce_range={self.reduce_range}")


# ---- conversion ---------------------------------------------------------------------------------
@dataclass
class CpuInt8Report:
    reduce_range: bool
    quant: str = "compile"
    converted: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # name -> reason (layer stays fake-quant fp32)
    fake_quant_matmuls: list[str] = field(default_factory=list)  # attention matmuls: no int8 kernel here

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"CPU int8: {len(self.converted)} layers converted (oneDNN, "
                 f"{'7-bit activations (reduce_range)' if self.reduce_range else '8-bit activations'}), "
                 f"{len(self.kept_float)} kept in fp32, {len(self.fake_quant_matmuls)} attention matmuls fake-quant fp32"]
        for n, why in self.kept_float.items():
            lines.append(f"  kept fp32: {n}: {why}")
        return "\n".join(lines)


def _why_not(m: nn.Module) -> Optional[str]:
    for wq in m.weight_quantizers():
        s: Optional[QuantScheme] = wq.scheme
        if s is None:
            return "weights not quantized"
        if s.dtype != "int":
            return f"weight dtype {s.dtype} (int8 kernels need an integer grid)"
        if s.granularity == "per_group":
            return "per-group weight scales (oneDNN takes per-tensor or per-channel)"
        if wq.rounding != "nearest":
            return f"AdaRound rounding {wq.rounding!r} still active (bake it first)"
        if wq.mode != "quant":
            return f"weight quantizer in mode {wq.mode!r}"
    for aq in m.act_quantizers():
        s = aq.scheme
        if s is None:
            return "weights-only layer (no activation quantizer: no static int8 input grid)"
        if s.dtype != "int":
            return f"activation dtype {s.dtype}"
        if aq.mode != "quant":
            return f"activation quantizer in mode {aq.mode!r}"
        if not aq._is_calibrated:
            return "activation quantizer not calibrated"
    if isinstance(m, QuantConv2d):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only zero padding)"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r} (explicit padding only)"
        if m.groups != 1 and any(wq.scheme.symmetric is False for wq in m.weight_quantizers()):
            return f"groups={m.groups} with asymmetric weights"
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def convert_cpu(qmodel: nn.Module, *, reduce_range: Union[bool, str] = "auto", quant: str = "compile",
                inplace: bool = False) -> nn.Module:
    """Calibrated diffquant model -> the same model with int8 oneDNN layers (CPU, fp32 elsewhere).

    Returns the converted model (a deep copy unless ``inplace``); its report is
    ``cpu_int8_report(model)``. ``reduce_range``: 7-bit activations so the AVX2 int16 pair sums cannot
    saturate ("auto": on where the CPU has no VNNI/AMX). ``quant``: how the fp32 input becomes uint8 codes:
    "compile" (one fused pass generated by torch.compile/Inductor, compiled on the first forward: needs a
    C++ compiler, ~20 s once per process) or "eager" (four plain ops, same values). Refuses models that are not quantized or
    tensors not on the CPU."""
    why = cpu_int8_available()
    if why is not None:
        raise RuntimeError(why)
    rr = _resolve_reduce_range(reduce_range)
    _quant_fn(quant)
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    if not layers:
        raise ValueError("convert_cpu needs a model quantized by diffquant.quantize (no QuantConv2d/QuantLinear found)")
    for n, m in layers:
        if m.weight.device.type != "cpu":
            raise ValueError(f"convert_cpu: layer {n} is on {m.weight.device}; move the model to the CPU first")
    model = qmodel if inplace else copy.deepcopy(qmodel)
    report = CpuInt8Report(reduce_range=rr, quant=quant)
    for name, m in [(n, model.get_submodule(n)) for n, _ in layers]:
        reason = _why_not(m)
        if reason is not None:
            report.kept_float[name] = reason
            continue
        new = Int8Conv2d(m, rr, quant) if isinstance(m, QuantConv2d) else Int8Linear(m, rr, quant)
        _set_submodule(model, name, new)
        report.converted.append(name)
    from diffquant.nn.modules import QuantMatMul

    report.fake_quant_matmuls = [n for n, m in model.named_modules()
                                 if isinstance(m, QuantMatMul) and any(q.enabled for q in m.act_quantizers())]
    model._diffquant_cpu_int8 = report  # type: ignore[attr-defined]
    if report.kept_float:
        log.warning("convert_cpu: %d layers kept in fp32: %s", len(report.kept_float),
                    "; ".join(f"{k} ({v})" for k, v in report.kept_float.items()))
    return model.eval()


def cpu_int8_report(model: nn.Module) -> CpuInt8Report:
    r = getattr(model, "_diffquant_cpu_int8", None)
    if r is None:
        raise ValueError("model was not converted by convert_cpu")
    return r


@torch.no_grad()
def simulate_cpu_int8(qmodel: nn.Module, *, reduce_range: Union[bool, str] = "auto") -> nn.Module:
    """The fake-quant model on the activation grids the int8 kernels use (7-bit with reduce_range).

    ``convert_cpu(qmodel)`` equals this model up to fp32 accumulation order (and rare rounding ties)
    on every converted layer: it is the oracle of the int8 path. Without reduce_range it is a copy."""
    rr = _resolve_reduce_range(reduce_range)
    model = copy.deepcopy(qmodel)
    if not rr:
        return model
    for m in model.modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)) or _why_not(m) is not None:
            continue
        for aq in m.act_quantizers():
            if aq.scheme.bits < 8:  # already on a grid of at most 128 levels: the kernel shifts it, exactly
                continue
            s, z, qmax = kernel_act_qparams(aq, True)
            aq.scheme = dataclasses.replace(aq.scheme, bits=7, symmetric=False)
            aq.scale.fill_(s)
            aq.zero_point.fill_(float(z))
    return model
