"""Triton GroupNorm (+ SiLU + the consumer's FP8 input quantization) over channels-last activations, for
``diffquant::group_norm_act``.

Why: under ``torch.compile`` a group norm over a channels-last tensor reads each group as a strided slice of every
pixel's channel row (4–40 channels of 128–2,560), and the norms took 4.2 of the CIFAR UNet's 5.4 ms of fused
elementwise time at batch 256 (H200, 2026-11-28). Here every read is a whole channel row:

1. ``_gn_stats_kernel``, one program per (pixel tile, image): per channel, the tile's mean and sum of squared
   deviations (centred in the tile, so no E[x²] - E[x]² cancellation);
2. ``_gn_finalize_kernel``, one program per (group, image): Chan's combination of the tiles' partials into the
   group's mean and 1/std (deterministic: no atomics);
3. ``_gn_apply_kernel``, one program per (pixel tile, image): normalise, affine, SiLU, and write e4m3 values of
   y / out_scale (or y in the output dtype).

The input may be two tensors concatenated along the channels (a UNet up block's ``cat([h, skip])``, read in place)
and may get a per-(image, channel) addend first (a ResNet block's time embedding). All arithmetic is fp32; the
result is :func:`.reference.group_norm_act_reference` up to summation order. Importing this module needs Triton.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from diffquant.kernels.triton_attention import _e4m3
from diffquant.kernels.triton_conv import _num_sms


@triton.jit
def _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, HW, C1, C, HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr):
    """The [pixels, channels] tile of cat(x, x2) (+ add[n]) in fp32; 0 outside the tensor."""
    p_ok = offs_p < HW
    c_ok = offs_c < C
    n64 = n.to(tl.int64)
    rows = offs_p.to(tl.int64)[:, None]
    x = tl.load(x_ptr + n64 * HW * C1 + rows * C1 + offs_c[None, :], mask=p_ok[:, None] & (offs_c < C1)[None, :],
                other=0.0).to(tl.float32)
    if HAS_X2:
        c2 = tl.maximum(offs_c - C1, 0)
        x += tl.load(x2_ptr + n64 * HW * (C - C1) + rows * (C - C1) + c2[None, :],
                     mask=p_ok[:, None] & ((offs_c >= C1) & c_ok)[None, :], other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + n * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(p_ok[:, None] & c_ok[None, :], x, 0.0)


@triton.jit
def _gn_stats_kernel(x_ptr, x2_ptr, add_ptr, mean_ptr, m2_ptr, HW, C1, C, T,
                     HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    cnt = tl.minimum(HW - t * BLOCK_P, BLOCK_P).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):  # channel chunks: whole rows of a pixel tile, partials stay small
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, HW, C1, C, HAS_X2, HAS_ADD)
        mean = tl.sum(x, axis=0) / cnt
        d = tl.where((offs_p < HW)[:, None], x - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        dst = (n * T + t).to(tl.int64) * C + offs_c
        tl.store(mean_ptr + dst, mean, mask=offs_c < C)
        tl.store(m2_ptr + dst, m2, mask=offs_c < C)


@triton.jit
def _gn_finalize_kernel(mean_ptr, m2_ptr, gmean_ptr, grstd_ptr, HW, C, T, CPG, G, eps, inv_total,
                        BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr):
    g = tl.program_id(0)
    n = tl.program_id(1)
    j = tl.arange(0, BLOCK_CG)
    cg_ok = j < CPG
    offs_c = g * CPG + j
    acc = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < T)[:, None] & cg_ok[None, :]
        cnt = tl.minimum(HW - offs_t * BLOCK_P, BLOCK_P).to(tl.float32)
        m = tl.load(mean_ptr + (n * T + offs_t).to(tl.int64)[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
        acc += tl.where(ok, m * cnt[:, None], 0.0)
    gmean = tl.sum(tl.sum(acc, axis=1), axis=0) * inv_total
    acc = tl.zeros((BLOCK_T, BLOCK_CG), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < T)[:, None] & cg_ok[None, :]
        cnt = tl.minimum(HW - offs_t * BLOCK_P, BLOCK_P).to(tl.float32)
        src = (n * T + offs_t).to(tl.int64)[:, None] * C + offs_c[None, :]
        m = tl.load(mean_ptr + src, mask=ok, other=0.0)
        m2 = tl.load(m2_ptr + src, mask=ok, other=0.0)
        d = m - gmean
        acc += tl.where(ok, m2 + cnt[:, None] * d * d, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) * inv_total
    tl.store(gmean_ptr + n * G + g, gmean)
    tl.store(grstd_ptr + n * G + g, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_apply_kernel(x_ptr, x2_ptr, add_ptr, gmean_ptr, grstd_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, HW, C1, C,
                     CPG, G, QMIN, QMAX, QOFF,
                     HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
                     INT8: tl.constexpr, SCALE_PER_CH: tl.constexpr, EMULATE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        x = _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, HW, C1, C, HAS_X2, HAS_ADD)
        gi = n * G + offs_c // CPG
        mu = tl.load(gmean_ptr + gi, mask=c_ok, other=0.0)
        rs = tl.load(grstd_ptr + gi, mask=c_ok, other=0.0)
        gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        y = (x - mu[None, :]) * (rs * gamma)[None, :] + beta[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        ptrs = out_ptr + n.to(tl.int64) * HW * C + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
        ok = (offs_p < HW)[:, None] & c_ok[None, :]
        if QUANT:  # the consumer's static input quantization (scales per channel: a split layer)
            if SCALE_PER_CH:
                so = tl.load(so_ptr + offs_c, mask=c_ok, other=1.0)[None, :]
            else:
                so = tl.load(so_ptr)
            if INT8:  # clamp(round(y * inverse scale) + zp, qmin, qmax) - offset, rounding half to even
                if SCALE_PER_CH:
                    zp = tl.load(zp_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
                else:
                    zp = tl.load(zp_ptr)
                v = y * so
                r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: to the nearest integer, ties to even (|v| < 2**22)
                q = tl.minimum(tl.maximum(r + zp, QMIN), QMAX) - QOFF
                tl.store(ptrs, q.to(tl.int8), mask=ok)
            else:  # e4m3 bytes of y / scale
                y8 = _e4m3(tl.clamp(y / so, -448.0, 448.0), EMULATE)
                tl.store(ptrs, y8.to(tl.uint8, bitcast=True), mask=ok)
        else:
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def group_norm_act_triton(x: torch.Tensor, x2: Optional[torch.Tensor], add_nc: Optional[torch.Tensor],
                          weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool,
                          out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                          out_zp: Optional[torch.Tensor] = None, qmin: int = 0, qmax: int = 0,
                          qoffset: int = 0) -> torch.Tensor:
    from diffquant.kernels.reference import out_like

    nb, c1, h, w = x.shape
    c = c1 + (x2.shape[1] if x2 is not None else 0)
    hw = h * w
    x = _channels_last(x)
    x2 = _channels_last(x2) if x2 is not None else None
    quant = out_scale is not None
    int8 = out_dtype == torch.int8
    out = out_like(x, c, h, w, out_dtype)
    if nb == 0 or hw == 0:
        return out
    block_c = max(16, min(128, triton.next_power_of_2(c)))  # a channel chunk; the kernels loop over the chunks
    # 64-512 pixels per tile (partials 1/64 of the input or less); fewer, down to 16, when the tiles would not fill
    # the GPU twice over (SD's 8x8 level at batch 8: 8 tiles of 64 pixels)
    block_p = 8192 // block_c
    while block_p > 16 and nb * triton.cdiv(hw, block_p) < 2 * _num_sms(x.device):
        block_p //= 2
    tiles = triton.cdiv(hw, block_p)
    warps = 8 if block_p * block_c >= 4096 else 4
    part_mean = torch.empty((nb, tiles, c), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    gmean = torch.empty((nb, num_groups), dtype=torch.float32, device=x.device)
    grstd = torch.empty_like(gmean)
    x2_arg = x2 if x2 is not None else x
    add_arg = add_nc.contiguous() if add_nc is not None else x
    _gn_stats_kernel[(tiles, nb)](x, x2_arg, add_arg, part_mean, part_m2, hw, c1, c, tiles,
                                  HAS_X2=x2 is not None, HAS_ADD=add_nc is not None, BLOCK_P=block_p,
                                  BLOCK_C=block_c, num_warps=warps)
    cpg = c // num_groups
    block_cg = max(2, triton.next_power_of_2(cpg))
    _gn_finalize_kernel[(num_groups, nb)](part_mean, part_m2, gmean, grstd, hw, c, tiles, cpg, num_groups, float(eps),
                                          1.0 / (hw * cpg),
                                          BLOCK_P=block_p, BLOCK_T=max(2, min(256, 2048 // block_cg)),
                                          BLOCK_CG=block_cg, num_warps=4)
    s_out = out_scale.float().reshape(-1).contiguous() if quant else gmean
    zp = out_zp.float().reshape(-1).contiguous() if int8 else gmean
    if int8 and s_out.numel() != zp.numel():  # one per channel for both when either is
        s_out, zp = s_out.expand(c).contiguous(), zp.expand(c).contiguous()
    _gn_apply_kernel[(tiles, nb)](x, x2_arg, add_arg, gmean, grstd, weight.contiguous(), bias.contiguous(), s_out, zp,
                                  out.view(torch.uint8) if quant and not int8 else out, hw, c1, c, cpg, num_groups,
                                  qmin, qmax, qoffset,
                                  HAS_X2=x2 is not None, HAS_ADD=add_nc is not None, SILU=silu, QUANT=quant,
                                  INT8=int8, SCALE_PER_CH=quant and s_out.numel() > 1, EMULATE=os.environ.get("TRITON_INTERPRET") == "1", BLOCK_P=block_p,
                                  BLOCK_C=block_c, num_warps=warps)
    return out
