"""Triton FP8 (e4m3) attention forward, FlashAttention-style, for ``diffquant::fp8_attention_fp8``.

Q, K and V arrive already in e4m3 with one fp32 scale per (batch, head) each (quantized once by plain tensor ops
that ``torch.compile`` fuses into their producers: :func:`.reference.fp8_attention_quantize`), so the kernel reads
one byte per element and converts nothing in its loop. One program per (query block, batch x head); both matmuls
run on FP8 tensor cores: S = Q8·K8ᵀ (fp32 accumulate, x the three scales), the running softmax numerator
P = exp(S - running max) in [0, 1] is quantized to e4m3 (scale 1) and O += P8·V8. The row sum takes the quantized
P, so the output is :func:`.reference.fp8_attention_fp8_reference` (same key block) up to accumulation order.
Keys beyond the sequence (cross-attention's 77 tokens) are masked; a head dimension that is not a power of two
(SD-1.5: 40, 80, 160) is zero-padded in the tile.

The softmax's per-score work is kept small, because at SD-1.5's head widths it, not the matmuls, bounds attention
(BENCHMARKS.md, "What bounds SD-1.5 b8"): scores stay in the log2 domain (one FMA and one ``ex2`` per score, the
scale and log2(e) folded into one factor); the row sums of the quantized P come from the tensor cores (P8 times a
ones tile) instead of an fp8-to-fp32 conversion and an add per score; and the key mask is compiled in only when
the keys do not fill whole blocks (``EVEN_K``). Compiled for sm_90 (Triton 3.6), the default configs of head
widths 40, 80 and 160 use 254, 247 and 245 registers per thread without spills (``benchmarks/ptxas_report.py``,
2026-11-28). A loop peeled into unmasked blocks and a masked tail spilled at 80 and 160, so it is one loop, masked
or not. None of this is timed yet: ``benchmarks/bench_attention.py`` times it against bf16 SDPA.

Block config: BLOCK_N (keys per softmax block) is fixed by the op (it decides where P is rounded); BLOCK_M,
warps and stages come from :func:`pick_attn_config` or ``DIFFQUANT_ATTN_CONFIG=BLOCK_M,WARPS,STAGES``.

Importing this module needs Triton.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from diffquant.kernels._triton_common import fp8_acc, interpreting


@triton.jit
def _e4m3(x, EMULATE: tl.constexpr):
    """x (fp32, in [0, 448]) to e4m3. EMULATE: round on the e4m3 grid in fp32 arithmetic first (to nearest even),
    for Triton's CPU interpreter, whose fp32 -> fp8 cast mis-rounds at binade edges (7.85 -> 4.0; Triton 3.9,
    2026-11-28); the cast of a value on the grid is exact."""
    if EMULATE:
        a = tl.abs(x)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)
        step = tl.exp2(e - 3.0)  # 3 mantissa bits; subnormals share the 2**-9 grid of the lowest binade
        magic = step * 12582912.0  # 1.5 * 2**23 * step: adding it rounds to a multiple of step (RTNE)
        r = tl.minimum((a + magic) - magic, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _attn_block(q, k_base, v_base, start, SK, sks, skd, svs, svd, offs_d, d_ok, c, ones, m_i, l16, acc,
                BLOCK_N: tl.constexpr, MASK: tl.constexpr, EMULATE: tl.constexpr, ACC_QK: tl.constexpr,
                ACC_PV: tl.constexpr):
    """One key block of the online softmax, in the log2 domain (``c`` = the three scales x sm_scale x log2(e), so
    that each score costs one FMA and one ex2). MASK: keys past SK (the last block only). The row sums of the
    quantized P come from the tensor cores, ``P8 · ones`` into the [BLOCK_M, 16] ``l16`` (its 16 columns equal),
    instead of converting every element of P8 back to fp32 and adding it up."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASK:
        n_ok = offs_n < SK
        kt = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                     other=0).to(tl.float8e4nv, bitcast=True)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0).to(tl.float8e4nv, bitcast=True)
    else:
        kt = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None],
                     other=0).to(tl.float8e4nv, bitcast=True)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :],
                    other=0).to(tl.float8e4nv, bitcast=True)
    s = tl.dot(q, kt, max_num_imprecise_acc=ACC_QK)
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * c)
    alpha = tl.exp2(m_i - m_new)
    p8 = _e4m3(tl.exp2(s * c - m_new[:, None]), EMULATE)
    l16 = l16 * alpha[:, None] + tl.dot(p8, ones, max_num_imprecise_acc=ACC_PV)
    acc = acc * alpha[:, None] + tl.dot(p8, v, max_num_imprecise_acc=ACC_PV)
    return m_new, l16, acc


@triton.jit(do_not_specialize=["SQ", "SK"])
def _fp8_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, sq_ptr, sk_ptr, sv_ptr, so_ptr,
    SQ, SK, H, sm_scale,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr,
    QUANT_OUT: tl.constexpr, EVEN_K: tl.constexpr, ACC_QK: tl.constexpr = None, ACC_PV: tl.constexpr = None,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh - b * H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < SQ
    c = tl.load(sq_ptr + bh) * tl.load(sk_ptr + bh) * sm_scale * 1.4426950408889634  # log2(e)
    s_v = tl.load(sv_ptr + bh)
    # e4m3 travels as its bytes (0x00 = 0.0 for masked elements) and is bitcast after the load
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0).to(tl.float8e4nv, bitcast=True)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l16 = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ones = tl.full((BLOCK_N, 16), 1.0, dtype=tl.float32).to(tl.float8e4nv)
    k_base = k_ptr + b.to(tl.int64) * skb + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h * svh
    # EVEN_K: the keys fill whole blocks (self-attention at every SD-1.5 level), so no block needs the key mask;
    # else every block takes it (cross-attention's 77 tokens: two blocks). One loop either way, one copy of its body.
    for start in range(0, SK, BLOCK_N):
        m_i, l16, acc = _attn_block(q, k_base, v_base, start, SK, sks, skd, svs, svd, offs_d, d_ok, c, ones, m_i, l16,
                                    acc, BLOCK_N, not EVEN_K, EMULATE, ACC_QK, ACC_PV)
    l_i = tl.max(l16, axis=1)
    out = acc * (s_v / l_i)[:, None]
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod
    if QUANT_OUT:  # the consumer's static input quantization: e4m3 bytes of out / its scale
        o8 = _e4m3(tl.clamp(out / tl.load(so_ptr), -448.0, 448.0), EMULATE)
        tl.store(o_ptrs, o8.to(tl.uint8, bitcast=True), mask=m_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def pick_attn_config(sq: int, block_d: int) -> dict:
    """BLOCK_M, warps and stages (not yet tuned on a GPU); DIFFQUANT_ATTN_CONFIG=BLOCK_M,WARPS,STAGES overrides."""
    env = os.environ.get("DIFFQUANT_ATTN_CONFIG")
    if env:
        bm, nw, ns = (int(v) for v in env.split(","))
        return dict(BLOCK_M=bm, num_warps=nw, num_stages=ns)
    # a 128 x 256 fp32 accumulator (head dim 160 padded to 256) spills registers: 64 query rows there
    bm = 128 if sq >= 128 and block_d <= 128 else 64
    return dict(BLOCK_M=bm, num_warps=8 if bm * block_d >= 128 * 128 else 4, num_stages=3 if block_d <= 128 else 2)


def fp8_attention_triton(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, s_q: torch.Tensor, s_k: torch.Tensor,
                         s_v: torch.Tensor, sm_scale: float, out_dtype: torch.dtype, block_n: int = 64,
                         out_scale=None, config: Optional[dict] = None) -> torch.Tensor:
    """q8 [B, H, Sq, D], k8/v8 [B, H, Sk, D] in float8_e4m3fn; scales fp32 [B*H]; output [B, H, Sq, D] of
    ``out_dtype`` (stored as [B, Sq, H, D]); with ``out_scale`` (fp32 [1]) e4m3 values of output / out_scale.
    ``config``: BLOCK_M, num_warps, num_stages instead of :func:`pick_attn_config`'s (the benchmark's sweep)."""
    from diffquant.kernels.reference import attention_out_like

    bsz, heads, sq, d = q8.shape
    sk = k8.shape[2]
    out = attention_out_like(q8, out_dtype)
    block_d = max(32, triton.next_power_of_2(d))  # FP8 dots want K >= 32
    cfg = dict(config) if config is not None else pick_attn_config(sq, block_d)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), bsz * heads)
    qb, kb, vb = (t.view(torch.uint8) for t in (q8, k8, v8))
    quant = out_scale is not None
    s_o = out_scale.float().reshape(1).contiguous() if quant else s_q
    _fp8_attn_kernel[grid](
        qb, kb, vb, out.view(torch.uint8) if quant else out, *(s.contiguous().float() for s in (s_q, s_k, s_v)), s_o,
        sq, sk, heads, float(sm_scale),
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(),
        D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_D=block_d,
        EMULATE=interpreting(), QUANT_OUT=quant, EVEN_K=sk % block_n == 0, ACC_QK=fp8_acc(block_d),
        ACC_PV=fp8_acc(block_n),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
