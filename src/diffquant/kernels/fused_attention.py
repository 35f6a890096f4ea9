"""Merged attention projections for converted models: one low-bit GEMM for Q, K and V.

A diffusers self-attention block runs ``to_q``, ``to_k`` and ``to_v`` on the same input; a cross-attention block runs
``to_k`` and ``to_v`` on the same context. Calibrated on that one input, the converted layers have the same input
quantization, so their weights can be stacked into one :class:`.modules.LowBitLayer` (``to_qkv`` / ``to_kv``): the
input is quantized once and read by one GEMM with N = 3C (or 2C) instead of three (two) with N = C. The block then
runs diffusers' own ``FusedAttnProcessor2_0`` (the processor behind diffusers' ``fuse_qkv_projections``), and the
separate layers are removed (their weights live on in the stacked layer, so the model's bytes do not grow).

Only blocks on diffusers' ``AttnProcessor2_0`` (float attention) or on diffquant's ``FP8AttnProcessor`` /
``FlashAttnProcessor`` (``attention="fp8"`` / ``"flash"``, which keep their processor and read the stacked layer)
whose layers are converted ``LowBitLayer`` Linears with identical input quantization are merged; every other block
is left alone, with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffquant.kernels.modules import LowBitLayer, _Part

_ACT_BUFFERS = ("act_scale", "act_inv_scale", "act_zp")


def _unmergeable(layers: list) -> Optional[str]:
    """Why ``layers`` cannot be stacked into one LowBitLayer (None: they can)."""
    if not all(isinstance(m, LowBitLayer) for m in layers):
        return "a projection is not a converted LowBitLayer: " + ", ".join(type(m).__name__ for m in layers)
    first = layers[0]
    for m in layers:
        if m.kind != "linear" or len(m.parts) != 1:
            return f"{m.layer_name}: a {m.kind} with {len(m.parts)} parts (needs a one-part Linear)"
        same = (m.backend, m.act, m.fp8_gemm, m.in_channels, m.qmin, m.qmax, m.offset) == (
            first.backend, first.act, first.fp8_gemm, first.in_channels, first.qmin, first.qmax, first.offset)
        if not same:
            return f"{m.layer_name} and {first.layer_name} differ in backend, input quantization or GEMM path"
        for key in _ACT_BUFFERS:
            a, b = getattr(m, key, None), getattr(first, key, None)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return f"{m.layer_name} and {first.layer_name} have different input quantization ({key})"
        p, p0 = m.parts[0], first.parts[0]
        if (p.a_zp, p.w4) != (p0.a_zp, p0.w4) or (p.a_scale is None) != (p0.a_scale is None) or (
                p.a_scale is not None and not torch.equal(p.a_scale, p0.a_scale)):
            return f"{m.layer_name} and {first.layer_name} have different activation qparams"
        for key in ("corr", "wzp"):
            if (getattr(p, key) is None) != (getattr(p0, key) is None):
                return f"{m.layer_name} and {first.layer_name} differ in {key}"
    return None


def stack_linears(layers: list, name: str) -> LowBitLayer:
    """One LowBitLayer computing ``torch.cat([m(x) for m in layers], -1)``: the layers' weights, scales, corrections
    and biases stacked along the output channels; the input quantization is the (shared) one of ``layers``."""
    why = _unmergeable(layers)
    if why is not None:
        raise ValueError(f"cannot stack {[m.layer_name for m in layers]}: {why}")
    first, p0 = layers[0], layers[0].parts[0]
    bias = None
    if any(m.bias is not None for m in layers):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_channels, device=p0.w.device)
                          for m in layers])
    out = LowBitLayer("linear", first.backend, first.in_channels, sum(m.out_channels for m in layers), bias=bias,
                      name=name)
    out.act, out.qmin, out.qmax, out.offset, out.fp8_gemm = first.act, first.qmin, first.qmax, first.offset, first.fp8_gemm
    for key in _ACT_BUFFERS:
        if getattr(first, key, None) is not None:
            out.register_buffer(key, getattr(first, key).clone())

    def cat(key):
        return None if getattr(p0, key) is None else torch.cat([getattr(m.parts[0], key) for m in layers])

    out.parts.append(_Part(0, first.in_channels, cat("w"), cat("w_scale"), p0.a_scale, cat("corr"), cat("wzp"),
                           p0.a_zp, p0.w4))
    return out


def fuse_qkv(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Stack the Q/K/V projections of every self-attention block (K/V of every cross-attention block) of ``model``
    that runs diffusers' ``AttnProcessor2_0`` into ``to_qkv`` (``to_kv``), in place, and switch the block to
    ``FusedAttnProcessor2_0``; a block on diffquant's ``FP8AttnProcessor`` or ``FlashAttnProcessor`` keeps it (it
    reads the stacked layer):
    ``(merged block names, {block name: why it was left alone})``."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    from diffquant.kernels.attention_processor import ATTENTION_PROCESSORS

    merged, left = [], {}
    for name, attn in model.named_modules():
        if not isinstance(attn, Attention):
            continue
        ours = type(attn.processor) in ATTENTION_PROCESSORS.values()  # diffquant's: it reads the stacked layer
        if type(attn.processor) is not AttnProcessor2_0 and not ours:
            left[name] = (f"processor {type(attn.processor).__name__} (needs AttnProcessor2_0, FP8AttnProcessor or "
                          f"FlashAttnProcessor: attention='float', 'fp8' or 'flash')")
            continue
        keys = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
        layers = [getattr(attn, k, None) for k in keys]
        why = _unmergeable(layers)
        if why is not None:
            left[name] = why
            continue
        fused_name = name + (".to_kv" if attn.is_cross_attention else ".to_qkv")
        setattr(attn, "to_kv" if attn.is_cross_attention else "to_qkv", stack_linears(layers, fused_name))
        for k in keys:  # the stacked layer holds their weights
            setattr(attn, k, None)
        attn.fused_projections = True
        if not ours:
            attn.set_processor(FusedAttnProcessor2_0())
        merged.append(name)
    return merged, left


def _norm_processor_class():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    if "norm" not in _PROCESSORS:
        class FusedNormQKVAttnProcessor(FusedAttnProcessor2_0):
            """diffusers' ``FusedAttnProcessor2_0`` whose input group norm (a UNet2DModel attention block's) runs as
            ``diffquant::group_norm_act`` over the channels-last input, writing ``to_qkv``'s quantized input: the
            tokens are a free view of its output. Anything else (a mask, a context, a spatial norm, Q/K norms,
            3-D input) takes diffusers' path."""

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                         *args, **kwargs):
                if (hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None
                        or args or kwargs or not _norm_fusable(attn)):
                    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args,
                                            **kwargs)
                from diffquant.kernels.fused_blocks import _norm_into

                nb, c, h, w = hidden_states.shape
                qkv = _norm_into(attn.group_norm, attn.to_qkv, hidden_states, None, False, as_tokens=True)
                query, key, value = qkv.split(qkv.shape[-1] // 3, dim=-1)
                head_dim = key.shape[-1] // attn.heads
                query, key, value = (v.view(nb, -1, attn.heads, head_dim).transpose(1, 2) for v in (query, key, value))
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0,
                                                                       is_causal=False)
                out = out.transpose(1, 2).reshape(nb, -1, attn.heads * head_dim).to(query.dtype)
                out = attn.to_out[1](attn.to_out[0](out))
                out = out.transpose(-1, -2).reshape(nb, c, h, w)
                if attn.residual_connection:
                    out = out + hidden_states
                return out / attn.rescale_output_factor

        _PROCESSORS["norm"] = FusedNormQKVAttnProcessor
    return _PROCESSORS["norm"]


_PROCESSORS: dict = {}


def _norm_fusable(attn) -> bool:
    return (isinstance(getattr(attn, "to_qkv", None), LowBitLayer) and type(attn.group_norm) is nn.GroupNorm
            and attn.group_norm.affine and attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None)


def fuse_attention_norms(model: nn.Module) -> list[str]:
    """Blocks merged by :func:`fuse_qkv` that have an input group norm (UNet2DModel's attention blocks) switch to a
    processor that runs it as ``diffquant::group_norm_act`` into ``to_qkv`` (in place); their names."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    done = []
    for name, attn in model.named_modules():
        if isinstance(attn, Attention) and type(attn.processor) is FusedAttnProcessor2_0 and _norm_fusable(attn):
            attn.set_processor(_norm_processor_class()())
            done.append(name)
    return done
