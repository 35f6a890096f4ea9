"""Triton FP8 (e4m3) attention forward, FlashAttention-style, for ``diffquant::fp8_attention``.

One program per (query block, batch x head). Q, K and V arrive in 16/32-bit and are quantized to e4m3 in
registers with one scale per (batch, head) each (computed by the caller from their absolute maxima); both
matmuls run on FP8 tensor cores: S = Q8·K8ᵀ (fp32 accumulate, then x the three scales), the running
softmax numerator P = exp(S - running max) in [0, 1] is quantized to e4m3 (scale 1) and O += P8·V8. The
row sum takes the quantized P, so the output is the FP8 attention of :func:`.reference.fp8_attention_reference`
(same block size) up to accumulation order. Keys beyond the sequence (cross-attention's 77 tokens) are masked.

Importing this module needs Triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3(x, EMULATE: tl.constexpr):
    """x (fp32, already within +-448) to e4m3. EMULATE: the same rounding in fp32 arithmetic (round to nearest
    even on the e4m3 grid), for Triton's CPU interpreter, whose fp32 -> fp8 cast mis-rounds at binade edges
    (7.85 -> 4.0; Triton 3.9, 2026-11-28)."""
    if EMULATE:
        a = tl.abs(x)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)
        step = tl.exp2(e - 3.0)  # 3 mantissa bits; subnormals share the 2**-9 grid of the lowest binade
        magic = step * 12582912.0  # 1.5 * 2**23 * step: adding it rounds to a multiple of step (RTNE)
        r = tl.minimum((a + magic) - magic, 448.0)
        return tl.where(x < 0, -r, r)
    else:
        return x.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["SQ", "SK"])
def _fp8_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, sq_ptr, sk_ptr, sv_ptr,
    SQ, SK, H, sm_scale,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < SQ
    s_q = tl.load(sq_ptr + bh)
    s_k = tl.load(sk_ptr + bh)
    s_v = tl.load(sv_ptr + bh)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q8 = _e4m3(tl.clamp(q / s_q, -448.0, 448.0), EMULATE)
    qk_scale = s_q * s_k * sm_scale
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    for start in range(0, SK, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        kt = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0).to(tl.float32)
        k8t = _e4m3(tl.clamp(kt / s_k, -448.0, 448.0), EMULATE)
        s = tl.dot(q8, k8t) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p8 = _e4m3(tl.exp(s - m_new[:, None]), EMULATE)
        l_i = l_i * alpha + tl.sum(p8.to(tl.float32), axis=1)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        v8 = _e4m3(tl.clamp(v / s_v, -448.0, 448.0), EMULATE)
        acc = acc * alpha[:, None] + tl.dot(p8, v8)
        m_i = m_new
    out = acc * (s_v / l_i)[:, None]
    tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def fp8_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                         scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor], block_m: int = 64,
                         block_n: int = 64) -> torch.Tensor:
    """q [B, H, Sq, D], k/v [B, H, Sk, D]; ``scales``: fp32 [B*H] each (absolute maximum / 448)."""
    bsz, heads, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty_like(q)
    block_d = max(32, triton.next_power_of_2(d))  # FP8 dots want K >= 32
    grid = (triton.cdiv(sq, block_m), bsz * heads)
    s_q, s_k, s_v = (s.contiguous().float() for s in scales)
    _fp8_attn_kernel[grid](
        q, k, v, out, s_q, s_k, s_v, sq, sk, heads, float(sm_scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EMULATE=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=4, num_stages=2,
    )
    return out
