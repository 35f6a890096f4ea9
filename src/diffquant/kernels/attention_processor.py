"""diffusers attention processors whose two matmuls run through diffquant's attention ops.

Both compute what diffusers' ``AttnProcessor2_0`` computes (spatial/group norm, heads, q/k norms, residual,
rescaling) and replace ``scaled_dot_product_attention`` by an op:

* :class:`FP8AttnProcessor` (``convert(..., attention="fp8")``): ``diffquant::fp8_attention``, both matmuls in FP8.
  When the output projection ``to_out[0]`` is a converted layer with a static FP8 input scale, the kernel writes its
  output already quantized with that scale (one pass fewer; counted in ``fused_out_calls``; set ``fuse_out=False`` to
  keep the separate quantization).
* :class:`FlashAttnProcessor` (``convert(..., attention="flash")``): ``diffquant::flash_attention``, flash attention
  in the model's dtype (the Gluon kernel for bf16 / fp16 on Hopper, SDPA on other GPUs, the fp32 reference on the
  CPU). Q, K and V reach it as [B, H, S, D] views of the projections' outputs (column slices of ``to_qkv`` /
  ``to_kv``'s when stacked), the layout the kernel reads without a copy, and its output merges the heads back by a
  free reshape.

Both read stacked projections (``fuse_qkv``) through :func:`diffquant.nn.attention.attention_inputs`. A call with an
attention mask goes to SDPA in the input dtype instead (the kernels have no mask) and is counted in ``float_calls``,
so nothing is skipped silently. The counters count eager calls only: a Python counter that changes at every call would
be guarded on by ``torch.compile`` and force a recompile per call (measured on the H200, 2026-11-28: after 8
recompiles the SD-1.5 UNet fell back to eager, 130 ms per call). ``path`` holds the path of the last call, compiled or
not.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import flash_attention, fp8_attention
from diffquant.nn.attention import attention_inputs, attention_output


class _OpAttnProcessor:
    """What the op-backed processors share: the counters, the inputs split into heads, the masked path."""

    float_calls: int
    path: Optional[str]

    def _taken(self, path: str, *counters: str) -> None:
        self.path = path
        if not torch.compiler.is_compiling():
            for c in counters:
                setattr(self, c, getattr(self, c) + 1)

    @staticmethod
    def _heads(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        """``(query, key, value, attention_mask, ctx, head_dim)``: Q/K/V as [B, H, S, D] views of the projections'
        outputs (after the q/k norms if the block has them), the mask prepared for SDPA ([B, H, Sq, Sk]) or None."""
        query, key, value, ctx = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        batch_size = ctx["batch_size"]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, ctx["sequence_length"], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value, attention_mask, ctx, head_dim

    def _masked(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        self._taken("float_masked", "float_calls")
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

    @staticmethod
    def _merge_heads(attn, hidden_states, ctx, head_dim, dtype) -> torch.Tensor:
        return hidden_states.transpose(1, 2).reshape(ctx["batch_size"], -1, attn.heads * head_dim).to(dtype)

    def _attend(self, op, path: str, counter: str, attn, query, key, value, attention_mask, ctx, head_dim):
        """``op(q, k, v, scale)`` (taking ``path``, counted in ``counter``), or SDPA for a masked call; then the heads
        merged and diffusers' output steps."""
        if attention_mask is None:
            self._taken(path, counter)
            hidden_states = op(query, key, value, float(attn.scale))
        else:
            hidden_states = self._masked(attn, query, key, value, attention_mask)
        return attention_output(attn, self._merge_heads(attn, hidden_states, ctx, head_dim, query.dtype), ctx)


class FP8AttnProcessor(_OpAttnProcessor):
    def __init__(self, fuse_out: bool = True) -> None:
        self.fp8_calls = 0
        self.float_calls = 0
        self.fused_out_calls = 0
        self.fuse_out = fuse_out
        self.path = None  # "fp8_fused_out" | "fp8" | "float_masked": the last call's

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        query, key, value, attention_mask, ctx, head_dim = self._heads(attn, hidden_states, encoder_hidden_states,
                                                                       attention_mask, temb)
        out_layer = attn.to_out[0]
        fused = (attention_mask is None and self.fuse_out and isinstance(out_layer, LowBitLayer) and out_layer.act == "fp8"
                 and len(out_layer.parts) == 1 and out_layer.kind == "linear")
        if fused:  # the output projection's input quantization, done by the attention kernel
            self._taken("fp8_fused_out", "fp8_calls", "fused_out_calls")
            h8 = fp8_attention(query, key, value, float(attn.scale), out_scale=out_layer.parts[0].a_scale)
            h8 = h8.transpose(1, 2).reshape(ctx["batch_size"], -1, attn.heads * head_dim)
            return attention_output(attn, out_layer(h8, out_dtype=query.dtype), ctx, projected=True)
        return self._attend(fp8_attention, "fp8", "fp8_calls", attn, query, key, value, attention_mask, ctx, head_dim)


class FlashAttnProcessor(_OpAttnProcessor):
    """Attention through ``diffquant::flash_attention`` (counted in ``flash_calls``); masked calls through SDPA."""

    def __init__(self) -> None:
        self.flash_calls = 0
        self.float_calls = 0
        self.path = None  # "flash" | "float_masked": the last call's

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        query, key, value, attention_mask, ctx, head_dim = self._heads(attn, hidden_states, encoder_hidden_states,
                                                                       attention_mask, temb)
        return self._attend(flash_attention, "flash", "flash_calls", attn, query, key, value, attention_mask, ctx,
                            head_dim)


ATTENTION_PROCESSORS = {"fp8": FP8AttnProcessor, "flash": FlashAttnProcessor}  # convert's attention= -> processor
