"""Transformer blocks of converted models whose LayerNorms run as ``diffquant::add_layer_norm``
(``convert(..., fuse_ln=True)``).

A diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``, Stable Diffusion's) runs
``h = h + attn1(norm1(h))``, ``h = h + attn2(norm2(h), context)``, ``h = h + ff(norm3(h))``. In a converted model each
norm is followed by a Linear that quantizes its input to e4m3, and the two residual adds before ``norm2`` / ``norm3``
follow an output projection (``to_out[0]``) whose tensor-wise FP8 GEMM (``set_fp8_gemm``) leaves its per-channel
scales and bias to the next elementwise step. :class:`FusedLNBasicTransformerBlock` runs each norm as one
``diffquant::add_layer_norm``: the projection's dequantization, the residual add, the norm and the consumer's e4m3
input in one pass that writes the new residual and the quantized input (:meth:`.LowBitLayer.forward_raw` hands it the
raw GEMM output). The consumers (``to_qkv``, ``to_q``, the GEGLU feed-forward) take that input as it comes.

The first block of a fused-norm ``Transformer2DModel`` (``fuse_norms``) also takes ``proj_in``'s raw tensor-wise GEMM
output and dequantizes it in its first norm's pass (:meth:`.LowBitLayer.forward_raw`), so that it is not written
in a pass of its own.

The attention between them is what the block's processor computes: PyTorch's SDPA (diffusers'
``AttnProcessor2_0`` / ``FusedAttnProcessor2_0``, i.e. ``attention="float"``) or ``diffquant::flash_attention``
(``FlashAttnProcessor``, ``attention="flash"``). Same numbers as the unfused converted model in eager mode (the op
rounds where the model rounds; Inductor's own fusion of these steps skips the intermediate bf16 roundings, so
compiled unfused and fused models differ by rounding). A block in training mode, or called with a mask, GLIGEN
inputs or other cross-attention kwargs, runs diffusers' forward. Anything else is left alone, with the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.kernels.fused_ff import FusedGEGLUFeedForward
from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import add_layer_norm, flash_attention


def _fp8_linear(m: nn.Module) -> bool:
    """A converted one-part Linear with a static FP8 input scale (it takes e4m3 input)."""
    return isinstance(m, LowBitLayer) and m.kind == "linear" and len(m.parts) == 1 and m.act == "fp8"


def _processor_kind(attn) -> Optional[str]:
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    from diffquant.kernels.attention_processor import FlashAttnProcessor

    kinds = {AttnProcessor2_0: "sdpa", FusedAttnProcessor2_0: "sdpa", FlashAttnProcessor: "flash"}
    return kinds.get(type(attn.processor))


def _attn_unfusable(attn, cross: bool) -> Optional[str]:
    if _processor_kind(attn) is None:
        return f"processor {type(attn.processor).__name__} (needs AttnProcessor2_0, FusedAttnProcessor2_0 or " \
               f"FlashAttnProcessor)"
    for key in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, key, None) is not None:
            return f"has {key}"
    if attn.residual_connection or attn.rescale_output_factor != 1.0 or getattr(attn, "norm_cross", None):
        return "residual connection, output rescaling or a cross norm"
    if _processor_kind(attn) == "sdpa" and abs(attn.scale - (attn.inner_dim // attn.heads) ** -0.5) > 1e-9:
        # diffusers' SDPA processors use SDPA's default scale whatever attn.scale says; the fused block would not
        return f"scale {attn.scale} is not 1/sqrt(head dim) (diffusers' SDPA processors ignore it)"
    first = attn.to_q if cross else getattr(attn, "to_qkv", None)
    if not _fp8_linear(first):
        return ("to_q" if cross else "to_qkv (fuse_qkv)") + " is not a converted Linear with a static FP8 input scale"
    if cross and getattr(attn, "to_kv", None) is None and (attn.to_k is None or attn.to_v is None):
        return "no K/V projections"
    if not isinstance(attn.to_out[0], nn.Module) or len(attn.to_out) != 2:
        return "to_out is not (projection, dropout)"
    return None


def _norm_unfusable(norm: nn.Module, name: str) -> Optional[str]:
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        return f"{name} is {type(norm).__name__} (needs an nn.LayerNorm over the last dimension)"
    return None


def unfusable(block: nn.Module) -> Optional[str]:
    """Why ``block`` (a diffusers BasicTransformerBlock) keeps diffusers' forward (None: it can be fused)."""
    if block.norm_type != "layer_norm":
        return f"norm_type={block.norm_type!r} (needs 'layer_norm')"
    if block.pos_embed is not None or block.only_cross_attention or block._chunk_size is not None:
        return "positional embedding, only-cross-attention or a chunked feed-forward"
    if block.attn2 is None:
        return "no cross-attention block (attn2)"
    for norm, name in ((block.norm1, "norm1"), (block.norm2, "norm2"), (block.norm3, "norm3")):
        why = _norm_unfusable(norm, name)
        if why:
            return why
    for attn, name, cross in ((block.attn1, "attn1", False), (block.attn2, "attn2", True)):
        if attn.is_cross_attention != cross:
            return f"{name} is {'not ' if cross else ''}a cross-attention block"
        why = _attn_unfusable(attn, cross)
        if why:
            return f"{name}: {why}"
    return None


def _out_args(consumer: nn.Module, dtype: torch.dtype) -> tuple:
    """``(out_scale, out_dtype)`` of the norm whose output ``consumer`` takes: its e4m3 input where it is a converted
    Linear or a fused GEGLU feed-forward (``fuse_ff``) quantizing to e4m3 with a static scale, else the activations in
    ``dtype`` (any other feed-forward quantizes them itself)."""
    if isinstance(consumer, FusedGEGLUFeedForward):
        consumer = consumer.net[0].proj
    if _fp8_linear(consumer):
        return consumer.act_scale.reshape(-1), torch.float8_e4m3fn
    return None, dtype


def _call(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return layer(x, out_dtype=dtype) if x.dtype == torch.float8_e4m3fn else layer(x)


class _FusedLNMixin:
    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, timestep=None, cross_attention_kwargs=None,
                class_labels=None, added_cond_kwargs=None) -> torch.Tensor:
        dequant = self.input_dequant(hidden_states.dtype)
        if (self.training or attention_mask is not None or encoder_attention_mask is not None
                or cross_attention_kwargs or hidden_states.dim() != 3):
            if dequant is not None:  # proj_in's raw output: dequantized as proj_in would have
                hidden_states = (hidden_states.float() * dequant[0] + (0 if dequant[1] is None else dequant[1])).to(
                    hidden_states.dtype)
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        dtype = hidden_states.dtype
        n1, n2, n3 = self.norm1, self.norm2, self.norm3
        s, odt = _out_args(self.attn1.to_qkv, dtype)
        if dequant is None:
            h = hidden_states
            _, x = add_layer_norm(h, None, None, None, n1.weight, n1.bias, float(n1.eps), s, odt)
        else:  # the block's input dequantized (and written) in norm1's pass
            h, x = add_layer_norm(hidden_states, dequant[0], dequant[1], None, n1.weight, n1.bias, float(n1.eps), s,
                                  odt)
        y, ys, yb = self._attention(self.attn1, x, None, dtype)
        s, odt = _out_args(self.attn2.to_q, dtype)
        h, x = add_layer_norm(y, ys, yb, h, n2.weight, n2.bias, float(n2.eps), s, odt)
        y, ys, yb = self._attention(self.attn2, x, encoder_hidden_states, dtype)
        s, odt = _out_args(self.ff, dtype)
        h, x = add_layer_norm(y, ys, yb, h, n3.weight, n3.bias, float(n3.eps), s, odt)
        ff = self.ff(x, out_dtype=dtype) if x.dtype == torch.float8_e4m3fn else self.ff(x)
        return ff + h

    def input_dequant(self, dtype: torch.dtype) -> Optional[tuple]:
        """``(scale, bias)`` when the block's input is its Transformer2DModel's ``proj_in`` raw tensor-wise GEMM
        output (the first block of a fused-norm transformer, :func:`fuse_layer_norms`; the transformer's
        ``_operate_on_continuous_inputs`` decides the same way), else None."""
        src = getattr(self, "_raw_from", None)
        if src is not None and src[0].raw_output_ok(dtype):
            return src[0].parts[0].w_scale, src[0].bias
        return None

    @staticmethod
    def _attention(attn, x: torch.Tensor, context: Optional[torch.Tensor], dtype: torch.dtype) -> tuple:
        """The attention block on ``x`` (its first projection's input, e4m3 or float) up to the output projection's
        raw output: ``(y, y_scale, y_bias)`` (:meth:`.LowBitLayer.forward_raw`)."""
        b = x.shape[0]
        if context is None:
            query, key, value = _call(attn.to_qkv, x, dtype).chunk(3, dim=-1)
        else:
            query = _call(attn.to_q, x, dtype)
            if getattr(attn, "to_kv", None) is not None:
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if _processor_kind(attn) == "flash":
            o = flash_attention(query, key, value, float(attn.scale))
        else:
            o = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)
        o = o.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0]
        if isinstance(out, LowBitLayer):
            y, ys, yb = out.forward_raw(o, dtype)
        else:
            y, ys, yb = out(o), None, None
        return attn.to_out[1](y), ys, yb


_CLASSES: dict = {}


def fused_block_class():
    """The fused subclass of diffusers' ``BasicTransformerBlock`` (made on first use: diffusers is imported lazily)."""
    if "block" not in _CLASSES:
        from diffusers.models.attention import BasicTransformerBlock

        _CLASSES["block"] = type("FusedLNBasicTransformerBlock", (_FusedLNMixin, BasicTransformerBlock), {
            "__doc__": "A BasicTransformerBlock whose LayerNorms (with the residual adds and the output projections' "
                       "dequantization before them) run as diffquant::add_layer_norm."})
    return _CLASSES["block"]


def fuse_layer_norms(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Swap, in place, every diffusers ``BasicTransformerBlock`` of ``model`` that :func:`unfusable` accepts for
    :func:`fused_block_class` (the parameters and the state dict are unchanged): ``(fused names, {name: why it was
    left alone})``."""
    from diffusers.models.attention import BasicTransformerBlock

    from diffquant.kernels.fused_blocks import fused_class, swap_classes

    cls = fused_block_class()
    fused, left = [], {}
    swap_classes(model, [(BasicTransformerBlock, cls, unfusable)], fused, left)
    # a fused-norm Transformer2DModel (fuse_norms) hands its first block proj_in's raw output (where proj_in runs a
    # tensor-wise GEMM): the dequantization happens in norm1's pass, not in a pass of its own
    for m in model.modules():
        if (type(m) is fused_class("transformer") and len(m.transformer_blocks) and isinstance(m.proj_in, LowBitLayer)
                and type(m.transformer_blocks[0]) is cls):
            m._raw_into_block = True
            m.transformer_blocks[0]._raw_from = (m.proj_in,)  # a tuple: not registered as a submodule
    return fused, left
