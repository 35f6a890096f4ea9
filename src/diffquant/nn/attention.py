"""An attention processor for diffusers ``Attention`` whose two matmuls are quantized.

It computes what diffusers' ``AttnProcessor`` computes (spatial/group norm, heads, mask,
residual, rescaling), but routes Q·Kᵀ and softmax·V through :class:`QuantMatMul` modules. It is
an ``nn.Module``, so diffusers registers it as the ``processor`` submodule of the attention
block and its quantizer qparams appear in the model's state dict.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffquant.config import QuantScheme
from diffquant.nn.modules import QuantMatMul


class QuantAttnProcessor(nn.Module):
    def __init__(self, qk_scheme: Optional[QuantScheme], softmax_scheme: Optional[QuantScheme], name: str = ""):
        super().__init__()
        self.layer_name = name
        self.qk = QuantMatMul(qk_scheme, qk_scheme, name=f"{name}.qk")
        self.pv = QuantMatMul(softmax_scheme, qk_scheme, name=f"{name}.pv")

    # diffusers calls ``processor(attn, hidden_states, ...)`` and inspects ``__call__``'s signature
    # to filter keyword arguments, so this processor defines ``__call__`` directly.
    def __call__(  # type: ignore[override]
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        query, key, value, ctx = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        attention_mask = attn.prepare_attention_mask(attention_mask, ctx["sequence_length"], ctx["batch_size"])
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = self.qk(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        hidden_states = self.pv(probs, value)
        return attention_output(attn, attn.batch_to_head_dim(hidden_states), ctx)


def attention_inputs(attn, hidden_states, encoder_hidden_states, temb):
    """What every diffusers attention processor does before the two matmuls: spatial/group norm, the 4-D to
    sequence reshape and the Q/K/V projections. Returns ``(query, key, value, ctx)`` with Q/K/V
    as ``[B, S, inner]`` and ``ctx`` for :func:`attention_output`."""
    ctx = {"residual": hidden_states, "input_ndim": None}
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ctx["input_ndim"] = hidden_states.ndim
    if hidden_states.ndim == 4:
        ctx["shape"] = hidden_states.shape
        b, ch, hgt, wid = hidden_states.shape
        hidden_states = hidden_states.view(b, ch, hgt * wid).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    ctx.update(batch_size=batch_size, sequence_length=sequence_length)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    # diffquant's fuse_qkv stacks the projections and removes the separate ones (diffusers' own fusion keeps them)
    if attn.to_q is None and getattr(attn, "to_qkv", None) is not None and encoder_hidden_states is None:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return query, key, value, ctx
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    if attn.to_k is None and getattr(attn, "to_kv", None) is not None:  # a cross-attention block's K/V stacked
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        return query, key, value, ctx
    return query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), ctx


def attention_output(attn, hidden_states, ctx: dict, projected: bool = False):
    """What every diffusers attention processor does after the matmuls (``hidden_states`` as ``[B, S, inner]``):
    the output projection (unless ``projected``), the reshape back to 4-D, the residual and the output rescaling."""
    if not projected:
        hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if ctx["input_ndim"] == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*ctx["shape"])
    if attn.residual_connection:
        hidden_states = hidden_states + ctx["residual"]
    return hidden_states / attn.rescale_output_factor
