"""Triton kernel of ``diffquant::add_layer_norm``: a transformer block's residual add, LayerNorm and the next GEMM's
e4m3 input in one pass over token-major [T, C] activations.

Why: in a converted SD-1.5 UNet each ``BasicTransformerBlock`` runs three LayerNorms, and each of the last two
follows an output projection and a residual add. Under ``torch.compile`` Inductor fuses the projection's
dequantization (tensor-wise FP8 GEMM: per-channel scales and bias on the bf16 output), the residual add, the norm and
the next layer's e4m3 quantization into one kernel, but at SD's widths (320 / 640 / 1280 channels) it runs them as
padded persistent reductions (512 lanes for 320 channels) at an estimated 0.7-1.9 TB/s, against 2.5-3.2 TB/s for the
model's pointwise kernels: 12 such kernels took 0.963 ms of SD-1.5 b8 (H200, 2026-11-29,
``benchmarks/results/inductor_sd8_twq_kernels.txt``). Here a program holds ``BLOCK_M`` whole rows in registers as
(at most) two power-of-two column chunks (320 = 256 + 64, 640 = 512 + 128, 1280 = 1024 + 256: no padded lanes), so
every byte is read once and the statistics need no second pass over memory.

Per row, with the rounding steps of the unfused model (``reference.add_layer_norm_reference``):
``z = round16(y * y_scale + y_bias)`` (when a scale or bias is given), ``h = round16(z + residual)``,
``n = round16(LayerNorm(h) * weight + bias)`` in fp32 statistics, and the output ``clamp(n / out_scale)`` as e4m3
(or ``n`` itself). ``h`` is written when it differs from the input (a residual, scale or bias was given). Importing
this module needs Triton; it runs under the CPU interpreter (``TRITON_INTERPRET=1``), which is how its tests check
it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from diffquant.kernels._triton_common import interpreting
from diffquant.kernels.triton_attention import _e4m3


@triton.jit
def _round16(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest even) and back. ``EMULATE``: bf16 rounding by integer arithmetic
    for Triton's CPU interpreter, whose fp32 -> bf16 cast truncates (-1.1553 -> -1.1484 instead of -1.1563; Triton
    3.9, 2026-11-29); NaN and infinity are not special-cased there."""
    if EMULATE and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _mul_rn(a, b, EMULATE: tl.constexpr):
    """``a * b`` rounded on its own (``mul.rn.f32``, which ptxas does not contract into an FMA with the add that
    follows), as the eager model multiplies the GEMM output by the weight scales in one kernel and adds the bias in
    another; with a contracted FMA some bf16 values of h came out one step off the eager model's (H200, 2026-11-29)."""
    if EMULATE:
        return a * b
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _ln_load(y_ptr, ys_ptr, yb_ptr, r_ptr, rows64, r_ok, cols, sy, sr, C, HAS_YS: tl.constexpr, HAS_YB: tl.constexpr,
             HAS_R: tl.constexpr, MASK_C: tl.constexpr, EMULATE: tl.constexpr):
    """One column chunk of the rows: the projection's output dequantized (rounded to its dtype) plus the residual
    (rounded again), in fp32; masked columns are 0."""
    c_ok = cols < C
    ok = r_ok[:, None] & c_ok[None, :] if MASK_C else r_ok[:, None]
    y = tl.load(y_ptr + rows64[:, None] * sy + cols[None, :], mask=ok, other=0.0)
    z = y.to(tl.float32)
    if HAS_YS:
        z = _mul_rn(z, tl.load(ys_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :], EMULATE)
    if HAS_YB:
        z = z + tl.load(yb_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_YS or HAS_YB:
        z = _round16(z, y_ptr.dtype.element_ty, EMULATE)
    if HAS_R:
        r = tl.load(r_ptr + rows64[:, None] * sr + cols[None, :], mask=ok, other=0.0)
        z = _round16(z + r.to(tl.float32), y_ptr.dtype.element_ty, EMULATE)
    return z, ok, c_ok


@triton.jit
def _ln_store(z, mean, rstd, ok, c_ok, cols, rows64, y_ptr, w_ptr, b_ptr, os_ptr, h_ptr, o_ptr, C, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, WRITE_H: tl.constexpr, QUANT: tl.constexpr, OS_PER_CH: tl.constexpr,
              EMULATE: tl.constexpr):
    off = rows64[:, None] * C + cols[None, :]
    if WRITE_H:
        tl.store(h_ptr + off, z.to(h_ptr.dtype.element_ty), mask=ok)
    n = (z - mean[:, None]) * rstd[:, None]
    if HAS_W:
        n = n * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        n = n + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    n = _round16(n, y_ptr.dtype.element_ty, EMULATE)  # the norm's output in the activation dtype, as the model has it
    if QUANT:
        if OS_PER_CH:
            s = tl.load(os_ptr + cols, mask=c_ok, other=1.0)[None, :]
        else:
            s = tl.load(os_ptr)
        q = _e4m3(tl.clamp(tl.div_rn(n, s), -448.0, 448.0), EMULATE)
        tl.store(o_ptr + off, q.to(tl.uint8, bitcast=True), mask=ok)
    else:
        tl.store(o_ptr + off, n.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_ln_kernel(y_ptr, ys_ptr, yb_ptr, r_ptr, w_ptr, b_ptr, os_ptr, h_ptr, o_ptr, T, C, sy, sr, inv_c, eps,
                   HAS_YS: tl.constexpr, HAS_YB: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, WRITE_H: tl.constexpr, QUANT: tl.constexpr, OS_PER_CH: tl.constexpr,
                   EMULATE: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, MASK_C: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < T
    rows64 = rows.to(tl.int64)
    cols1 = tl.arange(0, C1)
    z1, ok1, c1_ok = _ln_load(y_ptr, ys_ptr, yb_ptr, r_ptr, rows64, r_ok, cols1, sy, sr, C, HAS_YS, HAS_YB, HAS_R,
                              MASK_C, EMULATE)
    s = tl.sum(z1, axis=1)
    if C2 > 0:
        cols2 = C1 + tl.arange(0, C2)
        z2, ok2, c2_ok = _ln_load(y_ptr, ys_ptr, yb_ptr, r_ptr, rows64, r_ok, cols2, sy, sr, C, HAS_YS, HAS_YB,
                                  HAS_R, False, EMULATE)
        s += tl.sum(z2, axis=1)
    mean = s * inv_c
    d1 = z1 - mean[:, None]
    if MASK_C:
        d1 = tl.where(c1_ok[None, :], d1, 0.0)
    v = tl.sum(d1 * d1, axis=1)
    if C2 > 0:
        d2 = z2 - mean[:, None]
        v += tl.sum(d2 * d2, axis=1)
    rstd = 1.0 / tl.sqrt_rn(v * inv_c + eps)
    _ln_store(z1, mean, rstd, ok1, c1_ok, cols1, rows64, y_ptr, w_ptr, b_ptr, os_ptr, h_ptr, o_ptr, C, HAS_W,
              HAS_B, WRITE_H, QUANT, OS_PER_CH, EMULATE)
    if C2 > 0:
        _ln_store(z2, mean, rstd, ok2, c2_ok, cols2, rows64, y_ptr, w_ptr, b_ptr, os_ptr, h_ptr, o_ptr, C, HAS_W,
                  HAS_B, WRITE_H, QUANT, OS_PER_CH, EMULATE)


def new_out(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer (a function, so that tests can poison it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def column_chunks(c: int) -> tuple[int, int, bool]:
    """``(C1, C2, mask)``: ``c`` as two powers of two ``C1 + C2`` (``C2`` may be 0), or one padded chunk of the next
    power of two with masked columns when it has more than two set bits."""
    if c < 1:
        raise ValueError(f"{c} channels")
    bits = [1 << i for i in range(c.bit_length()) if c >> i & 1]
    if len(bits) <= 2:
        return bits[-1], (bits[0] if len(bits) == 2 else 0), False
    return triton.next_power_of_2(c), 0, True


def ln_plan(c: int) -> dict:
    """Rows a program (``BLOCK_M``) and warps: about 4K values a program (``DIFFQUANT_LN_ELEMS``), 4 warps
    (``DIFFQUANT_LN_WARPS``); ``DIFFQUANT_LN_BLOCK_M`` overrides the rows. On SD-1.5 b8's norms the best of five
    plans was 8 rows at 320 channels, 2-4 at 640 and 1,280, all with 4 warps or fewer; 16 rows / 8 warps was
    2-50 % slower (H200, 2026-11-29, session 20 call 1, ``benchmarks/bench_layernorm.py``)."""
    c1, c2, _ = column_chunks(c)
    width = c1 + c2
    elems = int(os.environ.get("DIFFQUANT_LN_ELEMS", "4096"))
    block_m = int(os.environ.get("DIFFQUANT_LN_BLOCK_M", "0")) or max(1, min(64, 1 << max(0, (elems // width).bit_length() - 1)))
    if block_m & (block_m - 1):
        raise ValueError(f"DIFFQUANT_LN_BLOCK_M={block_m}: a power of two")
    return {"BLOCK_M": block_m, "num_warps": int(os.environ.get("DIFFQUANT_LN_WARPS", "4"))}


def add_layer_norm_triton(y: torch.Tensor, y_scale: Optional[torch.Tensor], y_bias: Optional[torch.Tensor],
                          residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          eps: float, out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                          plan: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`diffquant.kernels.ops.add_layer_norm` (arguments checked there)."""
    c = y.shape[-1]
    y2 = y.reshape(-1, c)
    t = y2.shape[0]
    if y2.stride(1) != 1:
        y2 = y2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, c)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
    write_h = residual is not None or y_scale is not None or y_bias is not None
    h = new_out((t, c), y.dtype, y.device) if write_h else y.new_empty(0)
    quant = out_dtype == torch.float8_e4m3fn
    emulate = interpreting()
    o = new_out((t, c), out_dtype, y.device)
    o_arg = o.view(torch.uint8) if quant else o
    c1, c2, mask_c = column_chunks(c)
    plan = plan or ln_plan(c)
    os_per_ch = out_scale is not None and out_scale.numel() > 1
    dummy = y2
    grid = (triton.cdiv(t, plan["BLOCK_M"]),)
    if t:
        _add_ln_kernel[grid](
            y2, y_scale if y_scale is not None else dummy, y_bias if y_bias is not None else dummy,
            r2 if r2 is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy,
            out_scale.reshape(-1).float() if out_scale is not None else dummy, h if write_h else dummy, o_arg,
            t, c, y2.stride(0), r2.stride(0) if r2 is not None else 0, 1.0 / c, float(eps),
            HAS_YS=y_scale is not None, HAS_YB=y_bias is not None, HAS_R=r2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, WRITE_H=write_h, QUANT=quant, OS_PER_CH=os_per_ch, EMULATE=emulate, C1=c1, C2=c2,
            MASK_C=mask_c, BLOCK_M=plan["BLOCK_M"], num_warps=plan["num_warps"])
    shape = y.shape
    return (h.view(shape) if write_h else h), o.view(shape)
