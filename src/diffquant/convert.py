"""Conversion of a calibrated fake-quant model into real low-bit modules, in one call.

    from diffquant.convert import convert
    fast = convert(qmodel, backend="int8")          # or a saved quantized folder: convert("w8a8/", ...)
    print(fast._diffquant_convert_report.summary())

Backends and the quantization schemes they need (checked per layer):

==========  =====================================  ======================================
backend     weights                                activations (layer inputs)
==========  =====================================  ======================================
``int8``    integer, 2..8 bits, per-channel/tensor integer, 2..8 bits, per-tensor (static)
``w4a8``    integer, 2..4 bits, per-channel/tensor integer, 2..8 bits, per-tensor (static)
``w4a16``   integer, 2..4 bits, per-channel/tensor none (weights-only model)
``fp8``     fp8_e4m3, per-channel/tensor           fp8_e4m3 per-tensor (static), or dynamic:
                                                   ``fp8_dynamic="tensor"`` (or True) one scale
                                                   per call (per part of a split layer),
                                                   ``"token"`` one per token (GEMM row) for
                                                   Linear / 1x1 convs, per call elsewhere
==========  =====================================  ======================================

The integer backends compute exactly what the fake-quant model computes (integer accumulation,
zero points folded into a per-channel correction), up to the order of the fp32 accumulation.
Layers that do not fit (per-group weights, grouped convs, 4-bit weights with an odd number of input
channels, a scheme of the wrong kind) are handled by ``unsupported``: ``"simulate"`` (default) keeps
the fake-quant layer (same numbers, float speed), ``"float"`` puts back a plain float layer with the
dequantized weight and no activation quantization, ``"error"`` raises. The attention matmuls are
left to ``attention``: ``"simulate"`` keeps the quantized attention processor, ``"float"`` installs
diffusers' SDPA processor (Q·Kᵀ and softmax·V in the model's float dtype), ``"fp8"`` installs
:class:`diffquant.kernels.attention_processor.FP8AttnProcessor` in every attention block (both matmuls in
FP8 e4m3, dynamic per-head scales; experimental: 2x slower than cuDNN's bf16 attention on an H200, BENCHMARKS.md
"Kernels, ninth measurement"), ``"flash"`` installs
:class:`diffquant.kernels.attention_processor.FlashAttnProcessor` in every attention block (flash attention in the
model's dtype through ``diffquant::flash_attention``: diffquant's Gluon kernel for bf16 / fp16 on Hopper with heads up
to 128 wide, PyTorch's SDPA on other CUDA cases, the fp32 reference elsewhere; masked calls through SDPA;
experimental: 0.93x of cuDNN's bf16 attention on an H200, BENCHMARKS.md "Kernels, seventeenth measurement"). Either way the report
(``model._diffquant_convert_report``) lists what was converted and what was not, and why.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from diffquant.kernels.modules import BACKENDS, LowBitLayer, scaled_mm_works
from diffquant.nn.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from diffquant.quant.affine import FP8_E4M3_MAX, group_view, qrange

log = logging.getLogger(__name__)
UNSUPPORTED = ("simulate", "float", "error")
ATTENTION = ("simulate", "float", "fp8", "flash")


@dataclass
class ConvertReport:
    backend: str
    converted: dict = field(default_factory=dict)  # name -> "conv3x3" / "conv1x1" / "linear" (+ " split")
    kept: dict = field(default_factory=dict)  # name -> reason (simulated or float)
    attention: str = ""
    norms: str = ""
    projections: str = ""
    feed_forward: str = ""
    layer_norms: str = ""

    def summary(self) -> str:
        lines = [f"convert(backend={self.backend!r}): {len(self.converted)} layers converted, {len(self.kept)} kept"]
        for name, why in self.kept.items():
            lines.append(f"  kept {name}: {why}")
        if self.attention:
            lines.append(f"  attention: {self.attention}")
        if self.norms:
            lines.append(f"  norms: {self.norms}")
        if self.projections:
            lines.append(f"  projections: {self.projections}")
        if self.feed_forward:
            lines.append(f"  feed-forward: {self.feed_forward}")
        if self.layer_norms:
            lines.append(f"  layer norms: {self.layer_norms}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "converted": dict(self.converted), "kept": dict(self.kept),
                "attention": self.attention, "norms": self.norms, "projections": self.projections,
                "feed_forward": self.feed_forward, "layer_norms": self.layer_norms}


class UnsupportedLayer(ValueError):
    pass


def _check(cond: bool, why: str) -> None:
    if not cond:
        raise UnsupportedLayer(why)


def _weight_parts(layer) -> list:
    if layer.split is None:
        return [(0, layer.weight.shape[1], layer.weight_quantizer, layer.act_quantizer)]
    s = layer.split
    return [(0, s, layer.weight_quantizer, layer.act_quantizer),
            (s, layer.weight.shape[1], layer.weight_quantizer_b, layer.act_quantizer_b)]


def _check_schemes(layer, backend: str, fp8_dynamic: bool) -> None:
    if isinstance(layer, QuantConv2d):
        _check(layer.groups == 1, f"grouped conv (groups={layer.groups}) is not supported")
        _check(layer.padding_mode == "zeros", f"padding_mode={layer.padding_mode!r} is not supported")
        _check(isinstance(layer.padding, tuple), f"padding={layer.padding!r} is not supported")
    for lo, hi, wq, aq in _weight_parts(layer):
        ws, as_ = wq.scheme, aq.scheme
        _check(ws is not None, "weights are not quantized")
        _check(ws.granularity in ("per_channel", "per_tensor"), f"weight granularity {ws.granularity!r} (needs per_channel/per_tensor)")
        _check(wq.mode == "quant" and wq.rounding == "nearest", "weight quantizer is not in plain quant mode")
        if backend == "fp8":
            _check(ws.dtype == "fp8_e4m3", f"weights are {ws.describe()}; backend 'fp8' needs fp8_e4m3 weights")
            if not fp8_dynamic:
                _check(as_ is not None and as_.dtype == "fp8_e4m3",
                       "backend 'fp8' needs fp8_e4m3 activations (or fp8_dynamic=True)")
        else:
            _check(ws.dtype == "int", f"weights are {ws.describe()}; backend {backend!r} needs integer weights")
            if backend in ("w4a8", "w4a16"):
                _check(ws.bits <= 4, f"{ws.bits}-bit weights do not fit backend {backend!r} (<= 4 bits)")
                _check((hi - lo) % 2 == 0, f"4-bit packing needs an even number of input channels; got {hi - lo}")
            if backend == "w4a16":
                _check(as_ is None, "backend 'w4a16' is weights-only; this layer quantizes its input")
            else:
                _check(as_ is not None and as_.dtype == "int", f"backend {backend!r} needs integer activations")
        if as_ is not None and not (backend == "fp8" and fp8_dynamic):
            _check(aq.mode == "quant" and aq._is_calibrated, "activation quantizer is not calibrated")


@torch.no_grad()
def _convert_layer(layer, backend: str, fp8_dynamic: bool, name: str) -> LowBitLayer:
    _check_schemes(layer, backend, fp8_dynamic)
    conv = isinstance(layer, QuantConv2d)
    dev = layer.weight.device
    if conv:
        out = LowBitLayer("conv", backend, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=layer.bias, name=name)
    else:
        out = LowBitLayer("linear", backend, layer.in_features, layer.out_features, bias=layer.bias, name=name)
    cin = layer.weight.shape[1]
    cout = layer.weight.shape[0]
    w4 = backend in ("w4a8", "w4a16")
    act_vecs = []
    for lo, hi, wq, aq in _weight_parts(layer):
        w = layer.weight[:, lo:hi].detach().float()
        ws = wq.scheme
        g = group_view(w, ws)
        rows = g.shape[0]
        w_scale = wq.scale.float().reshape(rows).expand(cout) if rows == 1 else wq.scale.float().reshape(cout)
        as_ = aq.scheme
        a_zp = 0
        a_scale = None
        if backend == "fp8":
            v = torch.clamp(g / wq.scale.float(), -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).reshape(w.shape)
            wzp = corr = None
            if not fp8_dynamic:
                a_scale = aq.scale.float().reshape(1)
                act_vecs.append(("fp8", hi - lo, aq.scale.float()))
        else:
            q = torch.clamp(torch.round(g * (1.0 / wq.scale.float())) + wq.zero_point.float(), *qrange(ws.bits, ws.symmetric))
            zp = wq.zero_point.float().reshape(rows).expand(cout) if rows == 1 else wq.zero_point.float().reshape(cout)
            woff = 0 if ws.symmetric else (8 if w4 else 128)
            v = (q.reshape(w.shape) - woff)
            wzp_v = (zp - woff).round().to(torch.int64)
            wzp = wzp_v if bool((wzp_v != 0).any()) else None
            if as_ is not None:
                aoff = 0 if as_.symmetric else 2 ** (as_.bits - 1)
                a_zp = int(round(float(aq.zero_point))) - aoff
                a_scale = aq.scale.float().reshape(1)
                qmin, qmax = qrange(as_.bits, as_.symmetric)
                act_vecs.append(("int", hi - lo, aq.scale.float(), aq.zero_point.float(), qmin, qmax, aoff))
            v = v.to(torch.int64)
            vk = v.reshape(cout, -1)
            k = vk.shape[1]
            corr = None
            if a_zp != 0:
                corr = -a_zp * vk.sum(dim=1) + (k * a_zp * wzp_v if wzp is not None else 0)
            v = v.to(torch.int8)
        # [Cout, Cin, KH, KW] -> [Cout, KH, KW, Cin]
        v = v.permute(0, 2, 3, 1) if conv else v.reshape(cout, 1, 1, hi - lo)
        if w4:
            from diffquant.kernels.reference import pack_w4

            v = pack_w4(v.to(torch.int16))
        from diffquant.kernels.modules import _Part

        out.parts.append(_Part(lo, hi, v.contiguous().to(dev), w_scale.contiguous().to(dev),
                               None if a_scale is None else a_scale.to(dev),
                               None if corr is None else corr.to(dev), None if wzp is None else wzp.to(dev), a_zp, w4))
    if act_vecs:
        if act_vecs[0][0] == "int":
            inv = torch.cat([(1.0 / a[2]).reshape(1).expand(a[1]) for a in act_vecs])
            zp = torch.cat([a[3].reshape(1).expand(a[1]) for a in act_vecs])
            _, _, _, _, qmin, qmax, aoff = act_vecs[0]
            _check(all(a[4:] == (qmin, qmax, aoff) for a in act_vecs), "split halves with different activation grids")
            out.set_act_int(inv.to(dev), zp.to(dev), qmin, qmax, aoff)
        else:
            out.set_act_fp8(torch.cat([a[2].reshape(1).expand(a[1]) for a in act_vecs]).to(dev))
    elif backend == "fp8" and fp8_dynamic:  # split layers: one dynamic scale per part
        token = fp8_dynamic == "token" and out._is_gemm() and len(out.parts) == 1
        out.set_act_fp8(None, "token" if token else "tensor")
    assert cin == sum(p.hi - p.lo for p in out.parts)
    if (backend == "fp8" and len(out.parts) == 1 and out.kernel_size == (1, 1) and out.stride == (1, 1)
            and out.padding == (0, 0) and cin % 16 == 0 and cout % 16 == 0 and scaled_mm_works(dev)):
        out.fp8_gemm = "scaled_mm"
    return out


def _float_layer(layer) -> nn.Module:
    """A plain float layer with the fake-quantized (dequantized) weight; no activation quantization."""
    if isinstance(layer, QuantConv2d):
        f = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    else:
        f = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    with torch.no_grad():
        f.weight = nn.Parameter(layer.quantized_weight().detach().clone(), requires_grad=False)
        f.bias = layer.bias
    return f


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(
    model: Union[nn.Module, str, Path],
    backend: str = "int8",
    *,
    unsupported: str = "simulate",
    attention: str = "simulate",
    fp8_dynamic: Union[bool, str] = False,
    min_channels: int = 0,
    fuse_norms: bool = False,
    fuse_qkv: bool = False,
    fuse_ff: bool = False,
    fuse_temb: bool = False,
    fuse_ln: bool = False,
    inplace: bool = False,
    device=None,
) -> nn.Module:
    """Replace every supported QuantConv2d / QuantLinear of a calibrated fake-quant model (or of a
    quantized folder written by :func:`diffquant.io.save_quantized`) by a real low-bit module.

    Returns the converted model; ``model._diffquant_convert_report`` says what was converted and
    what was kept, and why. ``device`` moves the model first (the FP8 ``torch._scaled_mm`` path is
    chosen only when the model sits on a GPU where it works). ``min_channels``: a layer with fewer input or output
    channels keeps its fake-quant module (the same numbers, computed by the float conv / matmul): the low-bit
    kernels' tensor-core tiles are mostly empty there (the CIFAR UNet's conv_in, 3 -> 128 channels at batch 256:
    0.257 ms in the FP8 kernel, 0.091 ms in cuDNN bf16; H200, 2026-11-28). ``fuse_norms``: the group norms of every
    plain diffusers ResNet block (+ SiLU) and Transformer2DModel input run as ``diffquant::group_norm_act``, which
    also writes a converted consumer's quantized input, and the up blocks (UpBlock2D, AttnUpBlock2D,
    CrossAttnUpBlock2D) no longer concatenate ``[h, skip]``: the norm reads both and a split shortcut conv takes its
    two pieces (:mod:`diffquant.kernels.fused_blocks`). ``fuse_qkv``: each attention block's Q/K/V projections
    (K/V in cross-attention) become one stacked low-bit GEMM on a once-quantized input, run by diffusers'
    ``FusedAttnProcessor2_0`` (with ``attention="fp8"`` / ``"flash"``: by the FP8 / flash processor, which reads the
    stacked layer) (:mod:`diffquant.kernels.fused_attention`); with ``fuse_norms`` too, an attention
    block's input group norm (UNet2DModel's) runs as ``diffquant::group_norm_act`` writing ``to_qkv``'s input: with
    ``attention="float"`` only, whose blocks then run ``FusedNormQKVAttnProcessor`` (SDPA); with ``"fp8"`` or
    ``"flash"`` those blocks keep their processor (the FP8 / flash op) and their group norm runs in PyTorch.
    ``fuse_ff``: each GEGLU feed-forward whose two Linears have static FP8 input scales runs its projection, GELU gate
    and the second Linear's input quantization as one op, ``diffquant::linear_geglu``
    (:mod:`diffquant.kernels.fused_ff`). ``fuse_temb`` (with ``fuse_norms``): the ResNet blocks' time projections
    become one stacked GEMM after the time embedding (:func:`diffquant.kernels.fused_blocks.stack_time_projections`).
    ``fuse_ln`` (with ``fuse_qkv``): each Stable-Diffusion-style ``BasicTransformerBlock`` runs its three LayerNorms,
    with the residual adds and the output projections' dequantization before them, as ``diffquant::add_layer_norm``,
    which writes the next Linear's e4m3 input (:mod:`diffquant.kernels.fused_transformer`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unsupported={unsupported!r}; allowed: {', '.join(UNSUPPORTED)}")
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; allowed: {', '.join(map(repr, ATTENTION))}")
    if fp8_dynamic not in (False, True, "tensor", "token"):
        raise ValueError(f"fp8_dynamic={fp8_dynamic!r}; allowed: False, True / 'tensor', 'token'")
    if fp8_dynamic and backend != "fp8":
        raise ValueError(f"fp8_dynamic={fp8_dynamic!r} applies to backend 'fp8' only; got backend={backend!r}")
    if isinstance(model, (str, Path)):
        from diffquant.io import load_quantized

        model = load_quantized(model).model
        inplace = True
    if getattr(model, "_diffquant_config", None) is None and not any(isinstance(m, QUANT_LAYER_TYPES) for m in model.modules()):
        raise ValueError("model has no quantized layers; quantize and calibrate it first (diffquant.quantize)")
    if not inplace:
        model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    if not isinstance(min_channels, int) or isinstance(min_channels, bool) or min_channels < 0:
        raise ValueError(f"min_channels={min_channels!r}; needs an integer >= 0")
    report = ConvertReport(backend)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for name, layer in targets:
        cin, cout = layer.weight.shape[1], layer.weight.shape[0]
        if min(cin, cout) < min_channels:
            report.kept[name] = (f"simulated (fake-quant): {cin} -> {cout} channels, fewer than "
                                 f"min_channels={min_channels}")
            continue
        try:
            new = _convert_layer(layer, backend, fp8_dynamic, name)
        except UnsupportedLayer as e:
            if unsupported == "error":
                raise ValueError(f"layer {name!r} cannot be converted to backend {backend!r}: {e}") from None
            if unsupported == "float":
                _set_submodule(model, name, _float_layer(layer))
                report.kept[name] = f"float (dequantized weight, input not quantized): {e}"
            else:
                report.kept[name] = f"simulated (fake-quant): {e}"
            continue
        kind = "linear" if new.kind == "linear" else f"conv{new.kernel_size[0]}x{new.kernel_size[1]}"
        report.converted[name] = kind + (" split" if len(new.parts) > 1 else "") + \
            {"fp8_token": ", dynamic FP8 per token", "fp8_dynamic": ", dynamic FP8 per tensor"}.get(new.act, "")
        _set_submodule(model, name, new)
    report.attention = _convert_attention(model, attention)
    if fuse_norms:
        from diffquant.kernels.fused_blocks import _FusedUpMixin, fuse_group_norms

        fused, left = fuse_group_norms(model)
        ups = [n for n in fused if isinstance(model.get_submodule(n), _FusedUpMixin)]
        blocks = [n for n in fused if n not in ups and n != "conv_norm_out"]
        report.norms = (f"{len(blocks)} blocks (ResNet norms + SiLU, transformer input norms) run their "
                        f"group norms as diffquant::group_norm_act (fuse_norms=True); {len(ups)} up blocks hand "
                        f"their ResNet steps (h, skip) unconcatenated"
                        + ("; the output norm runs with its SiLU as one op" if "conv_norm_out" in fused else "")
                        + "".join(f"; {n} left alone: {why}" for n, why in left.items()))
    if fuse_qkv:
        from diffquant.kernels.fused_attention import fuse_qkv as _fuse_qkv

        merged, left = _fuse_qkv(model)
        report.projections = (f"{len(merged)} attention blocks run Q/K/V (cross-attention: K/V) as one stacked GEMM "
                              f"(fuse_qkv=True)" + "".join(f"; {n} left alone: {why}" for n, why in left.items()))
        if fuse_norms:
            from diffquant.kernels.fused_attention import fuse_attention_norms

            normed = fuse_attention_norms(model)
            if normed:
                report.projections += (f"; {len(normed)} of them run their input group norm as "
                                       f"diffquant::group_norm_act into to_qkv")
    if fuse_temb:
        from diffquant.kernels.fused_blocks import stack_time_projections

        n, why = stack_time_projections(model)
        report.projections = "; ".join(p for p in (report.projections, (
            f"{n} ResNet blocks' time projections run as one stacked GEMM (fuse_temb=True)" if n else
            f"time projections not stacked (fuse_temb=True): {why}")) if p)
    if fuse_ff:
        from diffquant.kernels.fused_ff import fuse_feed_forward

        ffs, left = fuse_feed_forward(model)
        report.feed_forward = (f"{len(ffs)} GEGLU feed-forward blocks run as diffquant::linear_geglu (fuse_ff=True)"
                               + "".join(f"; {n} left alone: {why}" for n, why in left.items()))
    if fuse_ln:
        from diffquant.kernels.fused_transformer import fuse_layer_norms

        blocks, left = fuse_layer_norms(model)
        report.layer_norms = (f"{len(blocks)} transformer blocks run their LayerNorms as diffquant::add_layer_norm "
                              f"(fuse_ln=True)" + "".join(f"; {n} left alone: {why}" for n, why in left.items()))
    model._diffquant_convert_report = report  # type: ignore[attr-defined]
    model._diffquant_backend = backend  # type: ignore[attr-defined]
    log.info(report.summary())
    return model


def _convert_attention(model: nn.Module, attention: str) -> str:
    from diffquant.nn.attention import QuantAttnProcessor

    if attention in ("fp8", "flash"):  # every diffusers attention block, quantized in the config or not
        from diffusers.models.attention_processor import Attention

        from diffquant.kernels.attention_processor import ATTENTION_PROCESSORS

        op_blocks = [m for m in model.modules() if isinstance(m, Attention)]
        for m in op_blocks:
            m.set_processor(ATTENTION_PROCESSORS[attention]())
        if not op_blocks:
            return ""
        if attention == "fp8":
            return (f"{len(op_blocks)} attention blocks run Q·Kᵀ / softmax·V in FP8 e4m3 "
                    f"(diffquant::fp8_attention, attention='fp8')")
        return (f"{len(op_blocks)} attention blocks run Q·Kᵀ / softmax·V as flash attention in the model's dtype "
                f"(diffquant::flash_attention: the Gluon kernel for bf16/fp16 on Hopper, SDPA on other GPUs, the reference "
                f"elsewhere; "
                f"attention='flash')")
    blocks = [m for m in model.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    if not blocks:
        return ""
    if attention == "simulate":
        return f"{len(blocks)} attention blocks keep fake-quantized Q·Kᵀ / softmax·V (attention='simulate')"
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in blocks:
        m.set_processor(AttnProcessor2_0())
    return f"{len(blocks)} attention blocks run Q·Kᵀ / softmax·V in float through SDPA (attention='float')"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the layer weights as stored (packed/FP8/int8 + scales for converted layers, the
    parameters' own dtype otherwise). Norms, embeddings and biases of float layers included."""
    total = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, LowBitLayer):
            total += m.weight_bytes
            for t in m.buffers():
                seen.add(id(t))
    for p in model.parameters():
        if id(p) not in seen:
            total += p.numel() * p.element_size()
            seen.add(id(p))
    return total


def config_for_backend(backend: str, keep_float: Sequence[str] = ()):
    """The quantization config whose calibrated models ``convert(backend)`` converts completely:
    symmetric per-channel weights (8-bit int, FP8 e4m3, or 4-bit int), per-tensor activations
    (8-bit asymmetric int, FP8 e4m3, or none for W4A16); attention matmuls left in float.

    ``keep_float``: module-name globs left unquantized (they stay ordinary bf16/fp32 layers after
    conversion), e.g. ``("conv_out",)``: the UNet's 3-channel output convolution holds 0.1 % of the MACs
    of the reference DDPM but costs 9-15 dB of PSNR when quantized to INT8 or FP8 (BENCHMARKS.md)."""
    from diffquant.config import LayerOverride, QuantConfig, QuantScheme

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    if backend == "fp8":
        w = QuantScheme(8, dtype="fp8_e4m3", symmetric=True, granularity="per_channel")
        a = QuantScheme(8, dtype="fp8_e4m3", symmetric=True)
    else:
        w = QuantScheme(4 if backend.startswith("w4") else 8, symmetric=True, granularity="per_channel")
        a = None if backend == "w4a16" else QuantScheme(8)
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    overrides = tuple(LayerOverride(pat, skip=True) for pat in keep_float)
    return QuantConfig(weight=w, act=a, quantize_attention=False, overrides=overrides)
