"""A diffusers attention processor whose two matmuls run in FP8 through ``diffquant::fp8_attention``.

It computes what diffusers' ``AttnProcessor2_0`` computes (spatial/group norm, heads, q/k norms, residual,
rescaling) and replaces ``scaled_dot_product_attention`` by the FP8 op. A call with an attention mask goes to SDPA
in the input dtype instead (the FP8 kernel has no mask) and is counted in ``float_calls``, so nothing is skipped
silently. The counters count eager calls only: a Python counter that changes at every call would be guarded on by
``torch.compile`` and force a recompile per call (measured on the H200, 2026-11-28: after 8 recompiles the SD-1.5
UNet fell back to eager, 130 ms per call). ``path`` holds the path of the last call, compiled or not. When the output projection ``to_out[0]`` is a converted layer with a static FP8 input scale, the kernel
writes its output already quantized with that scale (one pass fewer; counted in ``fused_out_calls``; set
``fuse_out=False`` to keep the separate quantization). Installed by ``convert(..., attention="fp8")``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import fp8_attention
from diffquant.nn.attention import attention_inputs, attention_output


class FP8AttnProcessor:
    def __init__(self, fuse_out: bool = True) -> None:
        self.fp8_calls = 0
        self.float_calls = 0
        self.fused_out_calls = 0
        self.fuse_out = fuse_out
        self.path = None  # "fp8_fused_out" | "fp8" | "float_masked": the last call's

    def _taken(self, path: str, *counters: str) -> None:
        self.path = path
        if not torch.compiler.is_compiling():
            for c in counters:
                setattr(self, c, getattr(self, c) + 1)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
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
        out_layer = attn.to_out[0]
        fused = (attention_mask is None and self.fuse_out and isinstance(out_layer, LowBitLayer) and out_layer.act == "fp8"
                 and len(out_layer.parts) == 1 and out_layer.kind == "linear")
        if fused:  # the output projection's input quantization, done by the attention kernel
            self._taken("fp8_fused_out", "fp8_calls", "fused_out_calls")
            h8 = fp8_attention(query, key, value, float(attn.scale), out_scale=out_layer.parts[0].a_scale)
            h8 = h8.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            return attention_output(attn, out_layer(h8, out_dtype=query.dtype), ctx, projected=True)
        if attention_mask is None:
            self._taken("fp8", "fp8_calls")
            hidden_states = fp8_attention(query, key, value, float(attn.scale))
        else:
            self._taken("float_masked", "float_calls")
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        return attention_output(attn, hidden_states, ctx)
