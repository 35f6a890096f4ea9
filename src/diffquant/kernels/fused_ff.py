"""Feed-forward blocks of converted models with GEGLU in the projection's epilogue (``convert(..., fuse_ff=True)``).

A diffusers ``FeedForward`` with a GEGLU activation runs ``net[0].proj`` (Linear to 2I), splits the result into ``h``
and ``g``, computes ``h * gelu(g)`` and hands it to ``net[2]`` (Linear from I), which quantizes it again. When both
Linears are converted with static FP8 input scales, :class:`FusedGEGLUFeedForward` runs the projection, the GEGLU and
``net[2]``'s input quantization as one op (``diffquant::linear_geglu``) and gives ``net[2]`` its e4m3 input directly:
the [tokens, 2I] projection is never written. Same numbers as the unfused converted model up to rounding (the
projection is not rounded to the activation dtype before the GELU). Anything else is left alone, with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import linear_geglu
from diffquant.kernels.reference import quantize_act_fp8


def _unfusable(ff: nn.Module) -> Optional[str]:
    """Why the FeedForward ``ff`` cannot run as :class:`FusedGEGLUFeedForward` (None: it can)."""
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or len(net) < 3:
        return "not a diffusers FeedForward (net[0] activation, net[1] dropout, net[2] Linear)"
    act, out = net[0], net[2]
    if type(act).__name__ != "GEGLU" or not hasattr(act, "proj"):
        return f"activation {type(act).__name__}, not GEGLU"
    proj = act.proj
    for m, role in ((proj, "GEGLU.proj"), (out, "net[2]")):
        if not isinstance(m, LowBitLayer):
            return f"{role} is not a converted LowBitLayer ({type(m).__name__})"
        if m.kind != "linear" or len(m.parts) != 1 or m.act != "fp8":
            return f"{role}: needs a one-part Linear with a static FP8 input scale (got {m.kind}, {len(m.parts)} " \
                   f"parts, act {m.act})"
    p = proj.parts[0]
    if p.w.dtype != torch.float8_e4m3fn or p.a_scale is None or p.a_scale.numel() != 1 or \
            not bool((proj.act_scale == p.a_scale.reshape(-1)[0]).all()):
        return "GEGLU.proj: needs e4m3 weights and one input scale"
    if proj.in_channels % 16:
        return f"GEGLU.proj: {proj.in_channels} input channels, not a multiple of 16 (the kernel's TMA rows)"
    if out.act_scale.numel() not in (1, proj.out_channels // 2) or out.in_channels != proj.out_channels // 2:
        return "net[2]: its input is not GEGLU.proj's half width, or its input scale has an odd shape"
    return None


class FusedGEGLUFeedForward(nn.Module):
    """A diffusers ``FeedForward`` (GEGLU) whose projection, GELU gate and ``net[2]`` input quantization run as
    ``diffquant::linear_geglu``; ``net`` is the original module list (the same parameters and buffers). Training mode
    runs the original layers one by one."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        why = _unfusable(ff)
        if why is not None:
            raise ValueError(f"cannot fuse this feed-forward block: {why}")
        self.net = ff.net
        self.train(ff.training)

    def forward(self, hidden_states: torch.Tensor, *args, out_dtype: Optional[torch.dtype] = None,
                **kwargs) -> torch.Tensor:
        """``hidden_states`` in float, or already quantized for ``GEGLU.proj`` (e4m3 of ``/ proj.act_scale``, from
        ``diffquant::add_layer_norm``); then ``out_dtype`` is needed."""
        prequantized = hidden_states.dtype == torch.float8_e4m3fn
        if prequantized and out_dtype is None:
            raise ValueError("FusedGEGLUFeedForward: a quantized input needs the output dtype (out_dtype=...)")
        if self.training:
            if prequantized:
                raise ValueError("FusedGEGLUFeedForward: a quantized input in training mode")
            for module in self.net:
                hidden_states = module(hidden_states)
            return hidden_states
        proj, out = self.net[0].proj, self.net[2]
        p = proj.parts[0]
        lead, k = hidden_states.shape[:-1], hidden_states.shape[-1]
        if prequantized:
            xq = hidden_states.reshape(-1, k)
        else:
            xq = quantize_act_fp8(hidden_states.reshape(-1, k), p.a_scale.reshape(1, 1))  # = proj.act_scale everywhere
        i = proj.out_channels // 2
        y = linear_geglu(xq, p.w.view(2 * i, k), p.w_scale, p.a_scale, proj.bias, out.act_scale.reshape(-1),
                         torch.float8_e4m3fn)
        y = out(y.reshape(*lead, i), out_dtype=out_dtype or hidden_states.dtype)
        for module in list(self.net)[3:]:  # a final dropout
            y = module(y)
        return y


def fuse_feed_forward(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Replace, in place, every diffusers GEGLU ``FeedForward`` of ``model`` whose two Linears are converted with
    static FP8 input scales by :class:`FusedGEGLUFeedForward`: ``(fused names, {name: why it was left alone})``."""
    fused, left = [], {}
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "FeedForward"]
    for name, ff in targets:
        why = _unfusable(ff)
        if why is not None:
            left[name] = why
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FusedGEGLUFeedForward(ff))
        fused.append(name)
    return fused, left
