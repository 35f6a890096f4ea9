"""Block-level fusion for inference: a diffusers ``ResnetBlock2D`` whose group norms run as ``diffquant::group_norm_act``.

In a ResNet block each group norm is followed by SiLU and a 3x3 conv. :func:`fuse_resnet_norms` swaps the class of
every block that has this plain form for :class:`FusedNormResnetBlock2D`. That subclass computes norm + SiLU (+ the
time embedding added before ``norm2``) in one op over channels-last activations. When the conv is a converted
layer with a static input quantization (FP8, or integer with a zero point), the op also writes the conv's
quantized input. The parameters and the state dict
are unchanged; a block in training mode, or called with extra arguments, runs diffusers' own forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import group_norm_act


def _fp8_input_scale(conv: nn.Module) -> Optional[torch.Tensor]:
    """The static FP8 input scales (fp32 [C], one per input channel: a split conv has two values) of a converted
    conv that takes e4m3 input, else None."""
    if isinstance(conv, LowBitLayer) and conv.kind == "conv" and conv.act == "fp8":
        return conv.act_scale.reshape(-1)
    return None


def _unfusable(block) -> Optional[str]:
    """Why ``block`` keeps diffusers' forward (None: it can be fused)."""
    if block.time_embedding_norm != "default":
        return f"time_embedding_norm={block.time_embedding_norm!r}"
    if block.upsample is not None or block.downsample is not None:
        return "up/down-sampling inside the block"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm or not norm.affine:
            return f"{name} is {type(norm).__name__} (needs an affine nn.GroupNorm)"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity is {type(block.nonlinearity).__name__} (needs SiLU)"
    # any conv takes the float output (a converted or fake-quant conv quantizes it itself); a converted conv with a
    # static FP8 input scale gets its e4m3 input straight from the norm
    return None


def _resnet_block_class():
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D


def _input_quantization(conv: nn.Module, dtype: torch.dtype) -> tuple:
    """What the norm writes for ``conv``: ``(out_dtype, scale, zero point, qmin, qmax, offset)``: e4m3 for a converted
    conv with static FP8 input scales, its int8 codes for one with a static integer input quantization, else the
    float activations (a converted conv with dynamic scales, or a float / fake-quant conv, quantizes them itself)."""
    scale = _fp8_input_scale(conv)
    if scale is not None:
        return torch.float8_e4m3fn, scale, None, 0, 0, 0
    if isinstance(conv, LowBitLayer) and conv.kind == "conv" and conv.act == "int":
        return (torch.int8, conv.act_inv_scale.reshape(-1), conv.act_zp.reshape(-1), conv.qmin, conv.qmax,
                conv.offset)
    return dtype, None, None, 0, 0, 0


class _FusedNormMixin:
    def _norm_act(self, norm: nn.GroupNorm, conv: nn.Module, x: torch.Tensor, add_nc: Optional[torch.Tensor]):
        out_dtype, scale, zp, qmin, qmax, offset = _input_quantization(conv, x.dtype)
        h = group_norm_act(x, None, add_nc, norm.weight, norm.bias, norm.num_groups, float(norm.eps), True, scale,
                           out_dtype, zp, qmin, qmax, offset)
        return conv(h, out_dtype=x.dtype) if scale is not None else conv(h)

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if self.training or args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)
        h = self._norm_act(self.norm1, self.conv1, input_tensor, None)
        t = None
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            t = self.time_emb_proj(temb)
        h = self._norm_act(self.norm2, self.conv2, h, t)  # dropout: identity in eval
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (x + h) / self.output_scale_factor


_FUSED_CLASS = None


def fused_class():
    """:class:`FusedNormResnetBlock2D`, made on first use (diffusers is imported lazily)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        _FUSED_CLASS = type("FusedNormResnetBlock2D", (_FusedNormMixin, _resnet_block_class()), {
            "__doc__": "A ResnetBlock2D whose norm + SiLU (+ time embedding) run as diffquant::group_norm_act."})
    return _FUSED_CLASS


def fuse_resnet_norms(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Swap every plain ``ResnetBlock2D`` of ``model`` for the fused-norm subclass, in place: ``(fused block names,
    {block name: why it was left alone})``."""
    base, cls = _resnet_block_class(), fused_class()
    fused, left = [], {}
    for name, m in model.named_modules():
        if isinstance(m, base) and type(m) is base:
            why = _unfusable(m)
            if why is None:
                m.__class__ = cls
                fused.append(name)
            else:
                left[name] = why
    return fused, left
