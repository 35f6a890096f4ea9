"""Triton GroupNorm (+ SiLU + the consumer's FP8 input quantization) over channels-last activations, for
``diffquant::group_norm_act``.

Why: under ``torch.compile`` a group norm over a channels-last tensor reads each group as a strided slice of every
pixel's channel row (4–40 channels of 128–2,560), and the norms took 4.2 of the CIFAR UNet's 5.4 ms of fused
elementwise time at batch 256 (H200, 2026-11-28). Here every read is a contiguous run of a pixel's channels, and
each program covers one segment of an image's pixels for one chunk of channels (grid: segments x images x chunks,
about four programs per SM):

1. ``_gn_stats_kernel``: per channel, the segment's mean and sum of squared deviations, by a running Welford update
   per (row lane, channel) and Chan's combination of the lanes at the end (no E[x²] - E[x]² cancellation);
2. ``_gn_finalize_kernel``, one program per image and block of groups: Chan's combination of the segments'
   partials into each group's mean and 1/std (deterministic: no atomics);
3. ``_gn_apply_kernel``: normalise, affine, SiLU, and write e4m3 values of y / out_scale (or int8 codes, or y in the
   output dtype).

The first layout (one program per 64-pixel tile, one per group and image to finalize) moved 1 TB/s alone and lost
to Inductor inside the CIFAR UNet (finalize alone 26 µs a call; H200, 2026-11-28).

The input may be two tensors concatenated along the channels (a UNet up block's ``cat([h, skip])``, read in place)
and may get a per-(image, channel) addend first (a ResNet block's time embedding). All arithmetic is fp32; the
result is :func:`.reference.group_norm_act_reference` up to summation order. Importing this module needs Triton.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from diffquant.kernels._triton_common import fast_ex2, fast_rcp, interpreting
from diffquant.kernels.triton_attention import _e4m3
from diffquant.kernels.triton_conv import _num_sms


@triton.jit
def _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, c0, P_END, HW, C1, C, HAS_X2: tl.constexpr,
               HAS_ADD: tl.constexpr, PURE: tl.constexpr):
    """The [pixels, channels] tile of cat(x, x2) (+ add[n]) in fp32; outside the tensor or past ``P_END`` 0, or
    add[n] where there is one (the callers mask: the statistics by their row weights, the apply step by its
    stores).
    ``PURE``: the chunk starting at channel ``c0`` lies wholly in x or wholly in x2 (the plan's chunk divides C1),
    so one plain load of one tensor; else two masked loads per element (both issued: 2x slower in the SD and CIFAR
    UNets' up blocks, H200, 2026-11-28)."""
    p_ok = offs_p < P_END
    c_ok = offs_c < C
    n64 = n.to(tl.int64)
    rows = offs_p[:, None]  # 32-bit offsets within one image (the host checks HW * C < 2**31), 64-bit image bases
    if HAS_X2 and PURE:
        if c0 < C1:
            x = tl.load((x_ptr + n64 * HW * C1) + (rows * C1 + offs_c[None, :]), mask=p_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
        else:
            C2 = C - C1
            x = tl.load((x2_ptr + n64 * HW * C2) + (rows * C2 + (offs_c - C1)[None, :]),
                        mask=p_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    else:
        x = tl.load((x_ptr + n64 * HW * C1) + (rows * C1 + offs_c[None, :]),
                    mask=p_ok[:, None] & (offs_c < C1)[None, :], other=0.0).to(tl.float32)
        if HAS_X2:
            c2 = tl.maximum(offs_c - C1, 0)
            x += tl.load((x2_ptr + n64 * HW * (C - C1)) + (rows * (C - C1) + c2[None, :]),
                         mask=p_ok[:, None] & ((offs_c >= C1) & c_ok)[None, :], other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + n * C + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return x


@triton.jit
def _channel_stats(x_ptr, x2_ptr, add_ptr, n, offs_c, c0, p0, p_end, HW, C1, C, HAS_X2: tl.constexpr,
                   HAS_ADD: tl.constexpr, PURE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   LOAD_STAGES: tl.constexpr):
    """Per channel of ``offs_c``, the mean and sum of squared deviations of image ``n``'s pixels [p0, p_end): a
    running Welford update per (row lane, channel), no reduction inside the loop; Chan's combination of the lanes.
    ``LOAD_STAGES`` > 1: the loop's loads are software-pipelined (asynchronous copies, that many tiles in flight)."""
    mean = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p in tl.range(p0, p_end, BLOCK_P, num_stages=LOAD_STAGES):
        offs_p = p + tl.arange(0, BLOCK_P)
        okf = (offs_p < p_end).to(tl.float32)
        x = _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, c0, p_end, HW, C1, C, HAS_X2, HAS_ADD, PURE)
        cnt += okf
        d = x - mean
        mean += d * (okf / tl.maximum(cnt, 1.0))[:, None]
        m2 += d * (x - mean) * okf[:, None]
    tot = tl.sum(cnt, axis=0)
    mc = tl.sum(mean * cnt[:, None], axis=0) / tot
    dd = mean - mc[None, :]
    return mc, tl.sum(m2 + cnt[:, None] * dd * dd, axis=0)


@triton.jit
def _gn_stats_kernel(x_ptr, x2_ptr, add_ptr, mean_ptr, m2_ptr, HW, C1, C, S, SEG_P,
                     HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, PURE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, LOAD_STAGES: tl.constexpr = 1):
    """Per channel of one chunk, the mean and sum of squared deviations of one segment of an image's pixels."""
    s = tl.program_id(0)
    n = tl.program_id(1)
    c0 = tl.program_id(2) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    p0 = s * SEG_P
    mc, m2c = _channel_stats(x_ptr, x2_ptr, add_ptr, n, offs_c, c0, p0, tl.minimum(p0 + SEG_P, HW), HW, C1, C,
                             HAS_X2, HAS_ADD, PURE, BLOCK_P, BLOCK_C, LOAD_STAGES)
    dst = (n * S + s).to(tl.int64) * C + offs_c
    tl.store(mean_ptr + dst, mc, mask=offs_c < C)
    tl.store(m2_ptr + dst, m2c, mask=offs_c < C)


@triton.jit
def _group_stats(mean_ptr, m2_ptr, n, g0, HW, C, S, SEG_P, CPG, G, inv_total, BLOCK_S: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, add_ptr=None, SHIFT: tl.constexpr = False):
    """Chan's combination of the segments' per-channel partials into the mean and variance of groups g0 ..
    g0 + BLOCK_G - 1 of image ``n`` (deterministic: no atomics). Columns are (group, channel in group) pairs.
    ``SHIFT``: the partials are of the input without its per-(image, channel) addend ``add_ptr`` [N, C] (a conv
    epilogue's statistics, taken before the time embedding is added): every channel's means move by it, the
    deviations do not."""
    j = tl.arange(0, BLOCK_G * BLOCK_CG)
    k = j % BLOCK_CG
    g = g0 + j // BLOCK_CG
    col_ok = (k < CPG) & (g < G)
    offs_c = g * CPG + k
    shift = 0.0
    if SHIFT:
        shift = tl.load(add_ptr + n * C + offs_c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_G * BLOCK_CG), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = (offs_s < S)[:, None] & col_ok[None, :]
        cnt = tl.minimum(HW - offs_s * SEG_P, SEG_P).to(tl.float32)
        m = tl.load(mean_ptr + (n * S + offs_s).to(tl.int64)[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
        acc += tl.where(ok, (m + shift) * cnt[:, None], 0.0)
    gmean = tl.sum(tl.reshape(tl.sum(acc, axis=0), (BLOCK_G, BLOCK_CG)), axis=1) * inv_total
    gmean_col = tl.reshape(tl.broadcast_to(gmean[:, None], (BLOCK_G, BLOCK_CG)), (BLOCK_G * BLOCK_CG,))
    acc = tl.zeros((BLOCK_S, BLOCK_G * BLOCK_CG), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = (offs_s < S)[:, None] & col_ok[None, :]
        cnt = tl.minimum(HW - offs_s * SEG_P, SEG_P).to(tl.float32)
        src = (n * S + offs_s).to(tl.int64)[:, None] * C + offs_c[None, :]
        m = tl.load(mean_ptr + src, mask=ok, other=0.0)
        m2 = tl.load(m2_ptr + src, mask=ok, other=0.0)
        d = m + shift - gmean_col[None, :]
        acc += tl.where(ok, m2 + cnt[:, None] * d * d, 0.0)
    return gmean, tl.sum(tl.reshape(tl.sum(acc, axis=0), (BLOCK_G, BLOCK_CG)), axis=1) * inv_total


@triton.jit
def _gn_finalize_kernel(mean_ptr, m2_ptr, gmean_ptr, grstd_ptr, HW, C, S, SEG_P, CPG, G, eps, inv_total,
                        BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, add_ptr=None,
                        SHIFT: tl.constexpr = False):
    """BLOCK_G groups' mean and 1/std of one image (:func:`_group_stats`; ``SHIFT``: see there)."""
    n = tl.program_id(0)
    g0 = tl.program_id(1) * BLOCK_G
    gmean, var = _group_stats(mean_ptr, m2_ptr, n, g0, HW, C, S, SEG_P, CPG, G, inv_total, BLOCK_S, BLOCK_G,
                              BLOCK_CG, add_ptr, SHIFT)
    offs_g = g0 + tl.arange(0, BLOCK_G)
    tl.store(gmean_ptr + n * G + offs_g, gmean, mask=offs_g < G)
    tl.store(grstd_ptr + n * G + offs_g, 1.0 / tl.sqrt(var + eps), mask=offs_g < G)


@triton.jit
def _qparams(so_ptr, zp_ptr, offs_c, c_ok, INT8: tl.constexpr, PER_CH: tl.constexpr):
    """A consumer's static input quantization: the factor that takes a value to its grid (e4m3: 1 / the scale,
    taken here once a program, so that the pixel loop multiplies instead of dividing; int8: the inverse scale as
    passed) and the zero point, per channel (a split layer) or one value; shaped to broadcast over [pixels,
    channels]."""
    if PER_CH:
        so = tl.load(so_ptr + offs_c, mask=c_ok, other=1.0)[None, :]
    else:
        so = tl.load(so_ptr)
    if not INT8:
        so = 1.0 / so
    zp = 0.0
    if INT8:
        if PER_CH:
            zp = tl.load(zp_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        else:
            zp = tl.load(zp_ptr)
    return so, zp


@triton.jit
def _store_q(ptrs, y, ok, so, zp, QMIN, QMAX, QOFF, QUANT: tl.constexpr, INT8: tl.constexpr, EMULATE: tl.constexpr,
             out_ptr):
    if QUANT:
        if INT8:  # clamp(round(y * inverse scale) + zp, qmin, qmax) - offset, rounding half to even
            v = y * so
            r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: to the nearest integer, ties to even (|v| < 2**22)
            q = tl.minimum(tl.maximum(r + zp, QMIN), QMAX) - QOFF
            tl.store(ptrs, q.to(tl.int8), mask=ok)
        else:  # e4m3 bytes of y / scale (``so``: 1 / scale, from _qparams)
            y8 = _e4m3(tl.clamp(y * so, -448.0, 448.0), EMULATE)
            tl.store(ptrs, y8.to(tl.uint8, bitcast=True), mask=ok)
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _apply_rows(x_ptr, x2_ptr, add_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, n, offs_c, c0, c_ok, mu, rs, p0, p_end,
                HW, C1, C, QMIN, QMAX, QOFF, raw_ptr, rso_ptr, rzp_ptr, RQMIN, RQMAX, RQOFF,
                HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
                INT8: tl.constexpr, SCALE_PER_CH: tl.constexpr, RAW: tl.constexpr, RAW_INT8: tl.constexpr,
                RAW_PER_CH: tl.constexpr, EMULATE: tl.constexpr, PURE: tl.constexpr, BLOCK_P: tl.constexpr,
                LOAD_STAGES: tl.constexpr):
    """Normalise (per-channel ``mu``, ``rs``), affine, SiLU and the consumer's quantization of image ``n``'s pixels
    [p0, p_end) in channels ``offs_c``; with ``RAW``, also the input itself quantized for a second consumer (into
    ``raw_ptr``). The per-channel constants are loaded once. ``LOAD_STAGES``: as in :func:`_channel_stats`."""
    gamma = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    a = (rs * gamma)[None, :]
    beta = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    so, zp = 1.0, 0.0
    if QUANT:
        so, zp = _qparams(so_ptr, zp_ptr, offs_c, c_ok, INT8, SCALE_PER_CH)
    if RAW:
        rso, rzp = _qparams(rso_ptr, rzp_ptr, offs_c, c_ok, RAW_INT8, RAW_PER_CH)
    img = n.to(tl.int64) * HW * C  # the image's first element in the outputs (64-bit; offsets within it 32-bit)
    for p in tl.range(p0, p_end, BLOCK_P, num_stages=LOAD_STAGES):
        offs_p = p + tl.arange(0, BLOCK_P)
        x = _load_rows(x_ptr, x2_ptr, add_ptr, n, offs_p, offs_c, c0, p_end, HW, C1, C, HAS_X2, HAS_ADD, PURE)
        off = offs_p[:, None] * C + offs_c[None, :]
        ok = (offs_p < p_end)[:, None] & c_ok[None, :]
        if RAW:
            _store_q((raw_ptr + img) + off, x, ok, rso, rzp, RQMIN, RQMAX, RQOFF, True, RAW_INT8, EMULATE, raw_ptr)
        y = (x - mu[None, :]) * a + beta
        if SILU:  # y * sigmoid(y): two MUFU instructions and three others (a division and tl.exp took about 11)
            y = y * fast_rcp(1.0 + fast_ex2(y * -1.4426950408889634, EMULATE), EMULATE)
        _store_q((out_ptr + img) + off, y, ok, so, zp, QMIN, QMAX, QOFF, QUANT, INT8, EMULATE, out_ptr)


@triton.jit
def _gn_apply_kernel(x_ptr, x2_ptr, add_ptr, gmean_ptr, grstd_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, HW, C1, C,
                     CPG, G, SEG_P, QMIN, QMAX, QOFF, raw_ptr, rso_ptr, rzp_ptr, RQMIN, RQMAX, RQOFF,
                     mean_ptr, m2_ptr, S, eps, inv_total,
                     HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
                     INT8: tl.constexpr, SCALE_PER_CH: tl.constexpr, RAW: tl.constexpr, RAW_INT8: tl.constexpr,
                     RAW_PER_CH: tl.constexpr, EMULATE: tl.constexpr, PURE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, LOAD_STAGES: tl.constexpr = 1, FOLD: tl.constexpr = False,
                     FBLOCK_S: tl.constexpr = 2, FBLOCK_G: tl.constexpr = 1, FBLOCK_CG: tl.constexpr = 2):
    """The apply step over one segment of one image's pixels, one chunk of channels. ``FOLD``: the chunk's groups'
    statistics are combined here from the segments' partials (``mean_ptr``, ``m2_ptr``: the FBLOCK_G groups from
    the chunk's first, :func:`_group_stats`) instead of read from the finalize kernel's output: one launch fewer
    per norm, each program re-reading its groups' partials."""
    s = tl.program_id(0)
    n = tl.program_id(1)
    c0 = tl.program_id(2) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    if FOLD:
        g_first = c0 // CPG
        gmean, var = _group_stats(mean_ptr, m2_ptr, n, g_first, HW, C, S, SEG_P, CPG, G, inv_total, FBLOCK_S,
                                  FBLOCK_G, FBLOCK_CG)
        onehot = ((offs_c // CPG - g_first)[:, None] == tl.arange(0, FBLOCK_G)[None, :]).to(tl.float32)
        mu = tl.sum(onehot * gmean[None, :], axis=1)
        rs = tl.sum(onehot * (1.0 / tl.sqrt(var + eps))[None, :], axis=1)
    else:
        gi = n * G + offs_c // CPG
        mu = tl.load(gmean_ptr + gi, mask=c_ok, other=0.0)
        rs = tl.load(grstd_ptr + gi, mask=c_ok, other=0.0)
    p0 = s * SEG_P
    _apply_rows(x_ptr, x2_ptr, add_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, n, offs_c, c0, c_ok, mu, rs, p0,
                tl.minimum(p0 + SEG_P, HW), HW, C1, C, QMIN, QMAX, QOFF, raw_ptr, rso_ptr, rzp_ptr, RQMIN, RQMAX,
                RQOFF, HAS_X2, HAS_ADD, SILU, QUANT, INT8, SCALE_PER_CH, RAW, RAW_INT8, RAW_PER_CH, EMULATE, PURE,
                BLOCK_P, LOAD_STAGES)


@triton.jit
def _gn_whole_kernel(x_ptr, x2_ptr, add_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, HW, C1, C, CPG, GPP, eps,
                     QMIN, QMAX, QOFF, raw_ptr, rso_ptr, rzp_ptr, RQMIN, RQMAX, RQOFF,
                     HAS_X2: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr, QUANT: tl.constexpr,
                     INT8: tl.constexpr, SCALE_PER_CH: tl.constexpr, RAW: tl.constexpr, RAW_INT8: tl.constexpr,
                     RAW_PER_CH: tl.constexpr, EMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_G: tl.constexpr, LOAD_STAGES: tl.constexpr = 1):
    """Small images in one launch: one program per (image, block of GPP whole groups) reads all the image's pixels
    of those channels twice (statistics, then apply; the second read mostly from L2). Groups combine in registers
    through a (channel, group) one-hot matrix, so the channels per group need not be a power of two."""
    n = tl.program_id(0)
    c_lo = tl.program_id(1) * GPP * CPG
    j = tl.arange(0, BLOCK_C)
    offs_c = c_lo + j
    c_ok = (j < GPP * CPG) & (offs_c < C)
    mc, m2c = _channel_stats(x_ptr, x2_ptr, add_ptr, n, offs_c, c_lo, 0, HW, HW, C1, C, HAS_X2, HAS_ADD, False,
                             BLOCK_P, BLOCK_C, LOAD_STAGES)
    onehot = ((j // CPG)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & c_ok[:, None]
    oh = onehot.to(tl.float32)
    gmean = tl.sum(oh * mc[:, None], axis=0) / CPG  # every channel has HW pixels
    mu = tl.sum(oh * gmean[None, :], axis=1)
    d = mc - mu
    gvar = tl.sum(oh * (m2c + HW * d * d)[:, None], axis=0) / (HW * CPG)
    rs = tl.sum(oh * (1.0 / tl.sqrt(gvar + eps))[None, :], axis=1)
    _apply_rows(x_ptr, x2_ptr, add_ptr, w_ptr, b_ptr, so_ptr, zp_ptr, out_ptr, n, offs_c, c_lo, c_ok, mu, rs, 0, HW,
                HW, C1, C, QMIN, QMAX, QOFF, raw_ptr, rso_ptr, rzp_ptr, RQMIN, RQMAX, RQOFF, HAS_X2, HAS_ADD, SILU,
                QUANT, INT8, SCALE_PER_CH, RAW, RAW_INT8, RAW_PER_CH, EMULATE, False, BLOCK_P, LOAD_STAGES)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous(memory_format=torch.channels_last)


def _env_flag(name: str) -> bool:
    """A 0/1 switch from the environment (unset: 0)."""
    v = os.environ.get(name, "0")
    if v not in ("0", "1"):
        raise ValueError(f"{name}={v!r}: 0 or 1")
    return v == "1"


def load_stages(stages: Optional[int] = None) -> int:
    """Tiles in flight in the norm kernels' pixel loops: 1 (the default) issues each tile's loads and waits for them;
    2 or 3 software-pipeline the loads (asynchronous copies through shared memory). Compiled for sm_90 without the
    knob, the loops had no prefetch at all (plain vector loads; ``tl.range(..., num_stages=...)`` is what turns the
    pipeliner on for a loop without a dot), and the norms ran at about half of the H200's bandwidth (BENCHMARKS.md,
    ninth measurement). ``DIFFQUANT_GN_LOAD_STAGES`` sets the default."""
    if stages is None:
        env = os.environ.get("DIFFQUANT_GN_LOAD_STAGES", "1")
        try:
            stages = int(env)
        except ValueError:
            raise ValueError(f"DIFFQUANT_GN_LOAD_STAGES={env!r}: an integer from 1 to 4") from None
    if not 1 <= stages <= 4:
        raise ValueError(f"norm load stages must be 1 to 4; got {stages}")
    return stages


def norm_plan(nb: int, c: int, hw: int, device: torch.device, block_c: Optional[int] = None,
              block_p: Optional[int] = None, programs: Optional[int] = None, warps: Optional[int] = None,
              c1: Optional[int] = None, stages: Optional[int] = None, fold: Optional[bool] = None) -> dict:
    """Launch shape: channel chunks of ``block_c`` (the largest power of two up to 128 that divides C, and C1 where
    the input is two tensors of C1 and C - C1 channels, so that a chunk reads one of them), pixel blocks of
    ``block_p`` rows per loop step (4,096 elements a step), and each image's pixels cut into segments so that
    there are at most ``programs`` (4 per SM: one wave) programs, or one segment per image and chunk when even
    that is more; keyword overrides are for the benchmark's sweep. ``stages``: tiles in flight in the pixel loops
    (:func:`load_stages`). ``fold``: the apply kernel combines its groups' statistics itself, no finalize launch
    (default: on where ``DIFFQUANT_GN_FOLD=1``, else off; each apply program then re-reads ``segs`` partials of its
    groups, cheap where an image has few segments, as at batch 8 and up, and not at batch 1)."""
    if block_c is None:
        div = math.gcd(c, c1) if c1 else c
        block_c = 128
        while block_c > 16 and div % block_c:
            block_c //= 2
        if div % block_c:
            block_c = max(16, min(128, triton.next_power_of_2(c)))
    if block_p is None:
        block_p = max(16, min(256, 4096 // block_c, triton.next_power_of_2(hw)))
    nch = triton.cdiv(c, block_c)
    target = programs if programs is not None else 4 * _num_sms(device)
    # at most ``target`` programs: one more segment than fits would start a second, mostly idle wave (the CIFAR
    # UNet's 32x32 norm at batch 256: 768 programs took 0.089 ms, 512 took 0.077; H200, 2026-11-28)
    segs = max(1, min(target // (nb * nch), triton.cdiv(hw, block_p)))
    seg_p = triton.cdiv(triton.cdiv(hw, segs), block_p) * block_p
    return {"block_c": block_c, "block_p": block_p, "nch": nch, "segs": triton.cdiv(hw, seg_p), "seg_p": seg_p,
            "warps": warps if warps is not None else 4, "stages": load_stages(stages),
            "fold": fold if fold is not None else _env_flag("DIFFQUANT_GN_FOLD")}


def finalize_block_g(nb: int, num_groups: int, block_cg: int, target: int) -> int:
    """Groups per finalize program: up to 256 columns of (group, channel) pairs, fewer while that leaves under
    ``target`` programs (one per SM). At batch 1 the SD-1.5 UNet's finalize ran as 2 programs of 16 groups, each
    walking ~100 segments' partials: 6.1 us a norm, more than the statistics (4.1) or the apply step (4.2) (H200,
    2026-11-28, eighth measurement); one group per program makes 32 programs with one pass over the partials."""
    block_g = max(1, min(triton.next_power_of_2(num_groups), 256 // block_cg))
    while block_g > 1 and nb * triton.cdiv(num_groups, block_g) < target:
        block_g //= 2
    return block_g


def whole_plan(c: int, hw: int, num_groups: int, warps: Optional[int] = None, gpp: Optional[int] = None,
               stages: Optional[int] = None) -> dict:
    """The one-launch plan for small images (:func:`_gn_whole_kernel`): blocks of whole groups of about 64 channels
    (one group when a group has more; ``gpp`` groups per program instead, for the benchmark's sweep), pixel blocks
    of up to 4,096 elements."""
    cpg = c // num_groups
    gpp = max(1, min(num_groups, gpp if gpp is not None else 64 // cpg))
    block_c = max(16, triton.next_power_of_2(gpp * cpg))
    return {"kind": "whole", "gpp": gpp, "block_c": block_c, "block_g": max(2, triton.next_power_of_2(gpp)),
            "block_p": max(16, min(triton.next_power_of_2(hw), 4096 // block_c)), "warps": warps or 4,
            "stages": load_stages(stages)}


def _default_plan(nb: int, c: int, hw: int, num_groups: int, device: torch.device, c1: Optional[int] = None) -> dict:
    # DIFFQUANT_GN_WHOLE_MAX_HW=N: images of at most N pixels take the one-launch kernel (default 0: never; it won
    # only on SD-1.5 b8's 8x8 and 16x16 shapes, by 1-4 us, and lost by up to 2.5x on CIFAR b256's:
    # benchmarks/results/groupnorm.json, first of earlier_runs, H200, 2026-11-28)
    if hw <= int(os.environ.get("DIFFQUANT_GN_WHOLE_MAX_HW", "0")):
        return whole_plan(c, hw, num_groups)
    return norm_plan(nb, c, hw, device, c1=c1)


def group_norm_act_triton(x: torch.Tensor, x2: Optional[torch.Tensor], add_nc: Optional[torch.Tensor],
                          weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool,
                          out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                          out_zp: Optional[torch.Tensor] = None, qmin: int = 0, qmax: int = 0,
                          qoffset: int = 0, plan: Optional[dict] = None,
                          stages: tuple = ("stats", "finalize", "apply"), raw: Optional[tuple] = None,
                          rows: Optional[tuple] = None):
    """``plan``: :func:`norm_plan`'s or :func:`whole_plan`'s dict (default: the segmented plan); ``stages``: the
    segmented path's kernels to launch (the benchmark times them one by one); ``raw``: ``(scale, dtype, zp, qmin,
    qmax, offset)`` of a second consumer of the input itself (no addend then): the result is ``(out, raw codes)``.
    ``rows``: ``(mean, m2)``, x's per-row partials without the addend ([N, H, C] fp32, ``diffquant::qconv_stats``):
    no statistics step, the finalize step combines them (one segment per row) and adds the addend to the means."""
    from diffquant.kernels.reference import out_like

    nb, c1, h, w = x.shape
    c = c1 + (x2.shape[1] if x2 is not None else 0)
    hw = h * w
    x = _channels_last(x)
    x2 = _channels_last(x2) if x2 is not None else None
    quant = out_scale is not None
    int8 = out_dtype == torch.int8
    out = out_like(x, c, h, w, out_dtype)
    raw_out = None if raw is None else out_like(x, c, h, w, raw[1])
    if nb == 0 or hw == 0:
        return out if raw is None else (out, raw_out)
    if hw * c >= 2**31:
        raise ValueError(f"group_norm_act: an image of {hw * c} elements ({c} channels x {h} x {w}); the kernels "
                         "index within an image in 32 bits (under 2**31 elements)")
    pl = plan if plan is not None else _default_plan(nb, c, hw, num_groups, x.device, c1 if x2 is not None else None)
    if rows is not None:
        if x2 is not None or raw is not None or pl.get("kind") == "whole" or pl.get("fold"):
            raise ValueError("group_norm_act: row partials take one input tensor and the segmented plan, unfolded")
    x2_arg = x2 if x2 is not None else x
    add_arg = add_nc.contiguous() if add_nc is not None else x
    s_out = out_scale.float().reshape(-1).contiguous() if quant else x
    zp = out_zp.float().reshape(-1).contiguous() if int8 else x
    if int8 and s_out.numel() != zp.numel():  # one per channel for both when either is
        s_out, zp = s_out.expand(c).contiguous(), zp.expand(c).contiguous()
    flags = dict(HAS_X2=x2 is not None, HAS_ADD=add_nc is not None, SILU=silu, QUANT=quant, INT8=int8,
                 SCALE_PER_CH=quant and s_out.numel() > 1, EMULATE=interpreting())
    out_arg = out.view(torch.uint8) if quant and not int8 else out
    raw_args, result = _raw_args(raw, raw_out, c, x, flags), out if raw is None else (out, raw_out)
    if pl.get("kind") == "whole":
        cpg = c // num_groups
        _gn_whole_kernel[(nb, triton.cdiv(num_groups, pl["gpp"]))](
            x, x2_arg, add_arg, weight.contiguous(), bias.contiguous(), s_out, zp, out_arg, hw, c1, c, cpg, pl["gpp"],
            float(eps), qmin, qmax, qoffset, *raw_args, **flags, BLOCK_P=pl["block_p"], BLOCK_C=pl["block_c"],
            BLOCK_G=pl["block_g"], LOAD_STAGES=pl.get("stages", 1), num_warps=pl["warps"])
        return result
    block_c, block_p, segs, seg_p, warps = pl["block_c"], pl["block_p"], pl["segs"], pl["seg_p"], pl["warps"]
    pure = x2 is not None and c1 % block_c == 0 and c % block_c == 0  # each chunk reads one of x, x2
    grid = (segs, nb, triton.cdiv(c, block_c))
    part_mean = torch.empty((nb, segs, c), dtype=torch.float32, device=x.device) if rows is None else rows[0]
    part_m2 = torch.empty_like(part_mean) if rows is None else rows[1]
    fsegs, fseg_p = (segs, seg_p) if rows is None else (h, w)  # the partials' segments: one per row
    gmean = torch.empty((nb, num_groups), dtype=torch.float32, device=x.device)
    grstd = torch.empty_like(gmean)
    if "stats" in stages and rows is None:
        _gn_stats_kernel[grid](x, x2_arg, add_arg, part_mean, part_m2, hw, c1, c, segs, seg_p,
                               HAS_X2=x2 is not None, HAS_ADD=add_nc is not None, PURE=pure, BLOCK_P=block_p,
                               BLOCK_C=block_c, LOAD_STAGES=pl.get("stages", 1), num_warps=warps)
    cpg = c // num_groups
    block_cg = max(2, triton.next_power_of_2(cpg))
    fold = bool(pl.get("fold"))
    block_g = pl.get("block_g") or finalize_block_g(nb, num_groups, block_cg, _num_sms(x.device))
    if "finalize" in stages and not fold:
        _gn_finalize_kernel[(nb, triton.cdiv(num_groups, block_g))](
            part_mean, part_m2, gmean, grstd, hw, c, fsegs, fseg_p, cpg, num_groups, float(eps), 1.0 / (hw * cpg),
            BLOCK_S=max(2, min(triton.next_power_of_2(fsegs), 4096 // (block_g * block_cg))), BLOCK_G=block_g,
            BLOCK_CG=block_cg, add_ptr=add_arg, SHIFT=rows is not None and add_nc is not None, num_warps=4)
    if "apply" not in stages:
        return result
    fblock_g = triton.next_power_of_2((block_c - 1) // cpg + 2)  # the groups a chunk of block_c channels touches
    _gn_apply_kernel[grid](x, x2_arg, add_arg, gmean, grstd, weight.contiguous(), bias.contiguous(), s_out, zp,
                           out_arg, hw, c1, c, cpg, num_groups, seg_p, qmin, qmax, qoffset, *raw_args,
                           part_mean, part_m2, segs, float(eps), 1.0 / (hw * cpg), **flags,
                           PURE=pure, BLOCK_P=block_p, BLOCK_C=block_c, LOAD_STAGES=pl.get("stages", 1),
                           FOLD=fold, FBLOCK_S=max(2, min(triton.next_power_of_2(segs), 4096 // (fblock_g * block_cg))),
                           FBLOCK_G=fblock_g, FBLOCK_CG=block_cg, num_warps=warps)
    return result


def _raw_args(raw: Optional[tuple], raw_out: Optional[torch.Tensor], c: int, x: torch.Tensor, flags: dict) -> tuple:
    """The kernels' raw-output arguments (pointers and grid; RAW* flags set in ``flags``)."""
    if raw is None:
        flags.update(RAW=False, RAW_INT8=False, RAW_PER_CH=False)
        return x, x, x, 0, 0, 0
    if flags["HAS_ADD"]:
        raise ValueError("group_norm_act: a raw second output is the input itself; it takes no addend")
    scale, dtype, zp, qmin, qmax, qoffset = raw
    scale = scale.float().reshape(-1).contiguous()
    zp = zp.float().reshape(-1).contiguous() if dtype == torch.int8 else scale
    if dtype == torch.int8 and scale.numel() != zp.numel():
        scale, zp = scale.expand(c).contiguous(), zp.expand(c).contiguous()
    flags.update(RAW=True, RAW_INT8=dtype == torch.int8, RAW_PER_CH=scale.numel() > 1)
    return (raw_out.view(torch.uint8) if dtype == torch.float8_e4m3fn else raw_out), scale, zp, qmin, qmax, qoffset


def group_norm_act_dual_triton(x, x2, weight, bias, num_groups, eps, silu, out_scale, out_dtype, out_zp, qmin, qmax,
                               qoffset, raw_scale, raw_dtype, raw_zp, rqmin, rqmax, rqoffset) -> tuple:
    """``diffquant::group_norm_act_dual`` on the GPU: :func:`group_norm_act_triton` with its raw second output."""
    return group_norm_act_triton(x, x2, None, weight, bias, num_groups, eps, silu, out_scale, out_dtype, out_zp, qmin,
                                 qmax, qoffset, raw=(raw_scale, raw_dtype, raw_zp, rqmin, rqmax, rqoffset))


def group_norm_act_stats_triton(x, mean, m2, add_nc, weight, bias, num_groups, eps, silu, out_scale, out_dtype,
                                out_zp=None, qmin=0, qmax=0, qoffset=0):
    """``diffquant::group_norm_act_stats`` on the GPU: the finalize step over x's per-row partials (plus the addend),
    then the apply step; no statistics pass."""
    nb, c, h, w = x.shape
    plan = norm_plan(nb, c, h * w, x.device, fold=False)
    return group_norm_act_triton(x, None, add_nc, weight, bias, num_groups, eps, silu, out_scale, out_dtype, out_zp,
                                 qmin, qmax, qoffset, plan=plan, rows=(mean.contiguous(), m2.contiguous()))


def row_stats_triton(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, row, channel) of ``y`` [N, C, H, W] (channels-last), the mean and the sum of squared deviations
    of the row's values, [N, H, C] fp32 each (:func:`.reference.row_stats_reference`): the statistics kernel with one
    segment per row. ``diffquant::qconv_stats`` runs it after conv configs whose epilogue cannot."""
    nb, c, h, w = y.shape
    y = _channels_last(y)
    mean = torch.empty((nb, h, c), dtype=torch.float32, device=y.device)
    m2 = torch.empty_like(mean)
    if mean.numel() == 0:
        return mean, m2
    pl = norm_plan(nb, c, h * w, y.device)
    block_c = pl["block_c"]
    block_p = max(16, min(256, 4096 // block_c, triton.next_power_of_2(w)))
    _gn_stats_kernel[(h, nb, triton.cdiv(c, block_c))](y, y, y, mean, m2, h * w, c, c, h, w, HAS_X2=False,
                                                       HAS_ADD=False, PURE=False, BLOCK_P=block_p, BLOCK_C=block_c,
                                                       num_warps=4)
    return mean, m2
