"""Experimental Hopper path of ``diffquant::qconv``: implicit GEMM over a *padded, flattened* NHWC input
with TMA (tensor-descriptor) loads, for stride-1, dilation-1 convolutions with 8-bit activations.

Why: the gather kernel (:mod:`.triton_conv`) builds its A tile from masked per-element pointer loads
(the padding taps), which measured at about 38 % of the H200's FP8 rate on UNet shapes while cuDNN's
bf16 conv reached about 80 % of the bf16 rate (BENCHMARKS.md, "Kernels, third measurement").

How: the input is padded once per call to ``[N, H + 2*pad_h, W + 2*pad_w, C]`` with the activation's
zero point and viewed as a 2-D matrix ``[rows, C]``. The output pixel ``(n, oh, ow)`` gets the GEMM row
``m = (n*HP + oh)*WP + ow`` of the padded grid, and its tap ``(kh, kw)`` reads input row
``m + kh*WP + kw``. So for every tap the A tile of ``BLOCK_M`` consecutive ``m`` is ``BLOCK_M``
consecutive rows of the flattened input: one rectangular TMA box, with no masks and no gather. Rows of the
padded grid that are not output pixels (the right and bottom pad band) are computed and not stored;
they cost ``(HP*WP) / (Ho*Wo) - 1`` extra work (3 % at 64x64, 27 % at 8x8). A channel tail is
zero-filled by TMA and multiplies zeros.

Where it runs: a shape takes this kernel where the tuned table of the GPU says ``"path": "tma"`` (the tuner,
``benchmarks/tune_qconv.py``, times both kernels per shape; measured on the H200 on 2026-11-28 it wins on the
mid- and low-resolution SD-1.5 convs and loses at 64x64 and on the CIFAR UNet's shapes), everywhere it can with
``DIFFQUANT_QCONV_TMA=1``, nowhere with ``DIFFQUANT_QCONV_TMA=0``.
Needs a Triton with tensor descriptors
(``triton.tools.tensor_descriptor``) and, on a GPU, compute capability 9.0+; it runs under Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which is how its CPU tests check it.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diffquant.kernels._triton_common import (TensorDescriptor, dequant_store, fp8_acc, grouped_tile,
                                              grouped_tile_of, interpreting as _interpreting, nonempty, tap_block,
                                              zero_acc)


@triton.jit(do_not_specialize=["MP", "HP", "WP", "Ho", "Wo", "NITER"])
def _qconv_tma_kernel(
    a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
    MP, HP, WP, Ho, Wo, Cout, CK, NCB, NITER,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, HAS_ASCALE: tl.constexpr,
    HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP8_ACC: tl.constexpr = None,
):
    pid_m, pid_n = grouped_tile(MP, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = _tap_mainloop(a_desc, b_desc, m0, 0, 0, n0, 0, NITER, WP, CK, NCB, 0, 0, KW, A_INT, BITCAST_FP8, False,
                        BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nb, oh, ow, m_ok = _padded_pixels(offs_m, MP, HP, WP, Ho, Wo)
    dequant_store(acc, offs_n, offs_n < Cout, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                  add_ptr, son, soh, sow, soc, san, sah, saw, sac, HAS_CORR, HAS_ASCALE, HAS_BIAS, HAS_ADD)


@triton.jit
def _tap_mainloop(a_desc, b_desc, m0, oh0, ow0, co0, it0, it1, WP, CK, NCB, pad_h, pad_w, KW: tl.constexpr,
                  A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, FOUR_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_ACC: tl.constexpr, HINT: tl.constexpr = True):
    """Steps ``it0`` to ``it1`` of a tile's (tap, channel block) loop: the accumulator. ``FOUR_D``: A is the 4-D box
    at (image ``m0``, row ``oh0``, column ``ow0``) shifted by the tap, else the padded copy's rows from ``m0`` shifted
    by the tap (``WP``: the padded width). B: output channels from ``co0``."""
    return _tap_loop_into(zero_acc(BLOCK_M, BLOCK_N, A_INT), a_desc, b_desc, m0, oh0, ow0, co0, it0, it1, WP, CK, NCB,
                          pad_h, pad_w, KW, BITCAST_FP8, FOUR_D, BLOCK_M, BLOCK_K, FP8_ACC, HINT)


@triton.jit
def _tap_loop_into(acc, a_desc, b_desc, m0, oh0, ow0, co0, it0, it1, WP, CK, NCB, pad_h, pad_w, KW: tl.constexpr,
                   BITCAST_FP8: tl.constexpr, FOUR_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP8_ACC: tl.constexpr, HINT: tl.constexpr = True):
    """:func:`_tap_mainloop`'s loop, accumulating into ``acc`` (the shortcut kernel continues one accumulator over
    several sources). Never empty; ``HINT``: the compiler is told so (:func:`._triton_common.nonempty`). The shortcut
    kernels pass False: with the hint their chained loops (the accumulator rescaled between sources) get every wgmma
    serialized (C7515), without it none (ptxas of Triton 3.6 for sm_90, 2026-11-29)."""
    if HINT:
        nonempty(it1 > it0)
    for it in range(it0, it1):
        tap, c0, kh, kw = tap_block(it, NCB, KW, BLOCK_K)
        if FOUR_D:
            a = a_desc.load([m0, oh0 + kh - pad_h, ow0 + kw - pad_w, c0])
            a = tl.reshape(a, (BLOCK_M, BLOCK_K))
        else:
            a = a_desc.load([m0 + kh * WP + kw, c0])
        b = b_desc.load([co0, tap * CK + c0])
        if BITCAST_FP8:  # the interpreter has no FP8 descriptors: FP8 travels as its bytes
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype, max_num_imprecise_acc=FP8_ACC)
    return acc


@triton.jit
def _padded_pixels(offs_m, MP, HP, WP, Ho, Wo):
    """Rows of the padded copy ([N * HP * WP]) as output pixels (image, row, column) and whether each is stored: the
    rows of the pad band are computed, not stored."""
    img = HP * WP
    nb = offs_m // img
    r = offs_m - nb * img
    oh = r // WP
    ow = r - oh * WP
    return nb, oh, ow, (offs_m < MP) & (oh < Ho) & (ow < Wo)


@triton.jit(do_not_specialize=["MP", "WP", "NITER", "PER", "WS_M", "WS_N"])
def _qconv_tma_splitk_kernel(
    a_desc, b_desc, ws_ptr,
    MP, WP, Cout, CK, NCB, NITER, PER, WS_M, WS_N,
    KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP8_ACC: tl.constexpr = None,
):
    """Split-K over the padded copy (see the 4-D form below): program (tile, s) stores steps [s * PER, (s + 1) * PER)
    of its tile to ``ws[s]`` ([WS_M, WS_N]: the padded copy's rows x the padded channels)."""
    pid_m, pid_n = grouped_tile(MP, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    s = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = _tap_mainloop(a_desc, b_desc, m0, 0, 0, n0, s * PER, tl.minimum(NITER, (s + 1) * PER), WP, CK, NCB, 0, 0, KW,
                        A_INT, BITCAST_FP8, False, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC)
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    tl.store(ws_ptr + s.to(tl.int64) * WS_M * WS_N + rows[:, None] * WS_N + cols[None, :], acc)


@functools.lru_cache(maxsize=None)
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def tma_unsupported(x: torch.Tensor, w: torch.Tensor, wzp, stride: Sequence[int], dilation: Sequence[int],
                    w4: bool) -> Optional[str]:
    """Why this call cannot take the TMA path (None: it can)."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if x.device.type == "cuda" and _capability_major(x.device) < 9:
        return "TMA needs compute capability 9.0+"
    if x.device.type != "cuda" and not _interpreting():
        return "not a CUDA tensor"
    if x.dtype not in (torch.int8, torch.float8_e4m3fn):
        return f"activations {x.dtype} (8-bit only)"
    if w4 or wzp is not None:
        return "4-bit or zero-point weights"
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return "stride or dilation other than 1"
    if (x.shape[1] * x.element_size()) % 16 or (w.shape[3] * w.element_size()) % 16:
        return "channels not a multiple of 16 bytes (TMA row alignment)"
    return None


def pick_tma_config(MP: int, cout: int, ck: int, persistent: bool = False) -> dict:
    """The untuned block config of the TMA conv kernels. ``persistent`` (path ``tma4dp``): 128 x 256 tiles get 2
    stages, not 3. With 3, the persistent kernel asked for 262,192 bytes of shared memory on an H200, whose limit is
    232,448 (the GPU test's 1,280-channel case, 2026-11-28). A compile for sm_90 without the GPU reports 135,216
    bytes for that config, so the GPU's JIT specializes it differently; the cause is not known. A launch that still
    runs out of shared memory retries with one stage fewer (:func:`qconv_tma4d`)."""
    bn = 256 if cout >= 1024 else 128 if cout > 64 else 64
    bk = 128 if ck >= 128 else 64 if ck >= 64 else 32
    stages = 2 if persistent and bn == 256 else 3
    return dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bn == 256 else 4, num_stages=stages)


def qconv_tma(x, w, w_scale, a_scale, corr, bias, add, a_zp: int, padding: Sequence[int], out_dtype: torch.dtype,
              config: Optional[dict] = None) -> torch.Tensor:
    """``diffquant::qconv`` for stride 1 / dilation 1, 8-bit activations and 8-bit weights without zero point
    (see :func:`tma_unsupported`); same arguments and result as :func:`.reference.qconv_reference`."""
    from diffquant.kernels.reference import out_like

    nbatch, c, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    if ck != c:
        raise ValueError(f"input has {c} channels; the weight expects {ck}")
    ph, pw = int(padding[0]), int(padding[1])
    hp, wp = h + 2 * ph, wd + 2 * pw
    ho, wo = hp - kh + 1, wp - kw + 1
    out = out_like(x, cout, ho, wo, out_dtype)
    if nbatch * ho * wo == 0:
        return out
    fp8 = x.dtype == torch.float8_e4m3fn
    xb = x.view(torch.uint8) if fp8 else x  # pad FP8 as bytes (0x00 is 0.0); int8 pads with its zero point
    xh = xb.permute(0, 2, 3, 1)
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph), value=0 if fp8 else int(a_zp))
    xh = xh.contiguous()
    bitcast = fp8 and _interpreting()
    if fp8 and not bitcast:
        xh = xh.view(torch.float8_e4m3fn)
    wv = w.view(torch.uint8) if bitcast else w
    rows = nbatch * hp * wp
    cfg = dict(config or pick_tma_config(rows, cout, ck))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(xh.view(rows, c), [rows, c], [c, 1], [bm, bk])
    w2 = wv.reshape(cout, kh * kw * ck)
    b_desc = TensorDescriptor(w2, [cout, kh * kw * ck], [kh * kw * ck, 1], [bn, bk])
    ncb = triton.cdiv(ck, bk)
    dummy = w_scale
    sa = add.stride() if add is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(rows, bm) * triton.cdiv(cout, bn),)
    split, per = split_k_steps(kh * kw * ncb, cfg.get("SPLIT_K", 1))
    if split > 1:
        ws_m, ws_n = triton.cdiv(rows, bm) * bm, triton.cdiv(cout, bn) * bn
        ws = torch.empty((split, ws_m, ws_n), device=x.device,
                         dtype=torch.int32 if x.dtype == torch.int8 else torch.float32)
        _qconv_tma_splitk_kernel[(grid[0], split)](
            a_desc, b_desc, ws, rows, wp, cout, ck, ncb, kh * kw * ncb, per, ws_m, ws_n,
            KW=kw, A_INT=x.dtype == torch.int8, BITCAST_FP8=bitcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            FP8_ACC=fp8_acc(bk, fp8), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _reduce_split(ws, out, a_scale, w_scale, corr, bias, add, None, nbatch, h, wd, ho, wo, cout, ph, pw, kh, kw,
                      split, padded=(rows, hp, wp))
        return out
    _qconv_tma_kernel[grid](
        a_desc, b_desc, out,
        a_scale if a_scale is not None else dummy, w_scale, corr if corr is not None else dummy,
        bias if bias is not None else dummy, add if add is not None else out,
        rows, hp, wp, ho, wo, cout, ck, ncb, kh * kw * ncb,
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        sa[0], sa[2], sa[3], sa[1],
        KW=kw, A_INT=x.dtype == torch.int8, BITCAST_FP8=bitcast, HAS_ASCALE=a_scale is not None,
        HAS_CORR=corr is not None, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FP8_ACC=fp8_acc(bk, fp8), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


# ---- 4-D boxes over the unpadded input (path "tma4d") --------------------------------------------------------
# The padded path above pays a copy of its input per call (0.67 ms in one SD-1.5 b8 forward pass, H200,
# 2026-11-28). Here the output tile is a box of BI images x BH rows x BW columns, and the A tile of tap (kh, kw) is
# the 4-D TMA box [BI, BH, BW, BLOCK_K] of the NHWC input at (n0, oh0 + kh - pad_h, ow0 + kw - pad_w, c0): the
# hardware fills coordinates outside the input (the padding) with zeros, so no copy and no pad-band rows. An int8
# activation zero point is added back per padded tap in the epilogue (``pad_corr``), as in the gather kernel.
@triton.jit
def _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The first image, output row, output column and output channel of tile (pid_m, pid_n)."""
    tw = pid_m % TILES_W
    th = (pid_m // TILES_W) % TILES_H
    return (pid_m // (TILES_W * TILES_H)) * BI, th * BH, tw * BW, pid_n * BLOCK_N


@triton.jit
def _tile_pixels(n0, oh0, ow0, r, N, Ho, Wo, BH: tl.constexpr, BW: tl.constexpr):
    """Row ``r`` of the 4-D tile at (n0, oh0, ow0) as an output pixel (image, row, column), and whether it exists."""
    nb = n0 + r // (BH * BW)
    oh = oh0 + (r // BW) % BH
    ow = ow0 + r % BW
    return nb, oh, ow, (nb < N) & (oh < Ho) & (ow < Wo)


@triton.jit
def _pad_fix_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                   padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH: tl.constexpr,
                   KW: tl.constexpr, PAD_FIX: tl.constexpr, HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr):
    """The 4-D kernels' epilogue for the output pixels (nb, oh, ow): the padded taps read zeros, where the true input
    is an int8 zero point (``PAD_FIX``: its products added back per tap, as in the gather kernel), then
    :func:`dequant_store` (whose stored tile it returns)."""
    if PAD_FIX:
        for t in tl.static_range(KH * KW):
            ih = oh + t // KW - pad_h
            iw = ow + t % KW - pad_w
            outside = (ih < 0) | (ih >= H) | (iw < 0) | (iw >= W)
            pc = tl.load(padc_ptr + offs_n * (KH * KW) + t, mask=n_ok, other=0)
            acc += tl.where(outside[:, None], pc[None, :], 0)
    return dequant_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                         add_ptr, son, soh, sow, soc, san, sah, saw, sac, HAS_CORR, HAS_ASCALE, HAS_BIAS, HAS_ADD)


@triton.jit
def _row_stats_store(y, m_ok, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, R: tl.constexpr,
                     BW: tl.constexpr, BH: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per output row of a tile of whole rows (R = images x rows of BW pixels each, TILES_W == 1) and channel: the
    mean and sum of squared deviations of the stored values ``y`` over the row's valid pixels, into [N, Ho, Cout]
    fp32 (``diffquant::qconv_stats``'s partials for the next group norm). Two passes over the registers, no
    E[y^2] - E[y]^2 cancellation."""
    okf = tl.reshape(m_ok.to(tl.float32), (R, BW))
    v = tl.reshape(tl.where(m_ok[:, None], y.to(tl.float32), 0.0), (R, BW, BLOCK_N))
    cnt = tl.sum(okf, axis=1)
    mean = tl.sum(v, axis=1) / tl.maximum(cnt, 1.0)[:, None]
    d = (v - mean[:, None, :]) * okf[:, :, None]
    m2 = tl.sum(d * d, axis=1)
    _store_row_partials(mean, m2, tl.arange(0, R), R, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, BH)


@triton.jit
def _store_row_partials(mean, m2, r, R, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, BH: tl.constexpr):
    """Tile rows ``r`` (of which the first R are real) as (image n0 + r // BH, output row oh0 + r % BH): their
    partials into [N, Ho, Cout]."""
    nb = n0 + r // BH
    oh = oh0 + r % BH
    dst = (nb.to(tl.int64) * Ho + oh)[:, None] * Cout + offs_n[None, :]
    ok = ((r < R) & (nb < N) & (oh < Ho))[:, None] & n_ok[None, :]
    tl.store(mean_ptr + dst, mean, mask=ok)
    tl.store(m2_ptr + dst, m2, mask=ok)


@triton.jit
def _row_stats_dot_store(y, m_ok, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, pivot, R: tl.constexpr,
                         BW: tl.constexpr, BH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_row_stats_store`'s partials with the reductions on the tensor cores instead of warp shuffles: a 0/1
    matrix selecting each row's valid pixels times D = y - ``pivot`` (the channel's bias, near the row's mean) and
    times D*D, as TF32 dots (fp32's range; 10-bit mantissas, 2^-11 relative rounding of each term; fp16 operands
    overflowed on int8 convs' outputs), fp32 sums; then mean = pivot + S1 / n and M2 = S2 - S1^2 / n
    (``DIFFQUANT_GN_STATS_EPILOGUE=dot``)."""
    RP: tl.constexpr = 16 if R < 16 else R
    r = tl.arange(0, RP)
    p = tl.arange(0, BLOCK_M)
    sel = ((p[None, :] // BW) == r[:, None]) & m_ok[None, :]
    d = tl.where(m_ok[:, None], y.to(tl.float32) - pivot[None, :], 0.0)
    s1 = tl.dot(sel.to(tl.float32), d, input_precision="tf32")
    s2 = tl.dot(sel.to(tl.float32), d * d, input_precision="tf32")
    cnt = tl.sum(sel.to(tl.float32), axis=1)
    c = tl.maximum(cnt, 1.0)[:, None]
    mean = pivot[None, :] + s1 / c
    m2 = tl.maximum(s2 - s1 * s1 / c, 0.0)
    _store_row_partials(mean, m2, r, R, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, BH)


@triton.jit
def _tma4d_tile(pid_m, pid_n, a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
                N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w,
                son, soh, sow, soc, san, sah, saw, sac,
                KH: tl.constexpr, KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr,
                PAD_FIX: tl.constexpr, HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_ADD: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, FP8_ACC: tl.constexpr, mean_ptr=None, m2_ptr=None,
                STATS: tl.constexpr = False, STATS_DOT: tl.constexpr = False):
    """One output tile (``pid_m``: BI images x BH rows x BW columns; ``pid_n``: BLOCK_N channels): the tap loop over
    4-D TMA boxes, then the epilogue; ``STATS``: and the per-row statistics of the stored tile
    (:func:`_row_stats_store`; the tiles must hold whole rows)."""
    BLOCK_M: tl.constexpr = BI * BH * BW
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, BLOCK_N)
    acc = _tap_mainloop(a_desc, b_desc, n0, oh0, ow0, co0, 0, NITER, 0, CK, NCB, pad_h, pad_w, KW, A_INT, BITCAST_FP8,
                        True, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC)
    nb, oh, ow, m_ok = _tile_pixels(n0, oh0, ow0, tl.arange(0, BLOCK_M), N, Ho, Wo, BH, BW)
    offs_n = co0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout
    y = _pad_fix_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                       add_ptr, padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX,
                       HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD)
    if STATS and STATS_DOT:
        pivot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            pivot = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        _row_stats_dot_store(y, m_ok, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, pivot, BI * BH, BW, BH,
                             BLOCK_M, BLOCK_N)
    elif STATS:
        _row_stats_store(y, m_ok, n0, oh0, offs_n, n_ok, N, Ho, Cout, mean_ptr, m2_ptr, BI * BH, BW, BH, BLOCK_N)


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w"])
def _qconv_tma4d_kernel(
    a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
    N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KH: tl.constexpr, KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, PAD_FIX: tl.constexpr,
    HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None, mean_ptr=None, m2_ptr=None, STATS: tl.constexpr = False,
    STATS_DOT: tl.constexpr = False,
):
    BLOCK_M: tl.constexpr = BI * BH * BW
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    _tma4d_tile(pid_m, pid_n, a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
                N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, son, soh, sow, soc,
                san, sah, saw, sac, KH, KW, A_INT, BITCAST_FP8, PAD_FIX, HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD,
                BI, BH, BW, BLOCK_N, BLOCK_K, FP8_ACC, mean_ptr, m2_ptr, STATS, STATS_DOT)


# Wide tiles (a "BLOCK_N2" in the config): each program computes BLOCK_N + BLOCK_N2 output channels, the second block
# from a second B descriptor into a second accumulator, so that one A tile feeds both dots. Channel counts that are no
# power of two get tiles without padding: SD-1.5's 320 as 256 + 64 (or 128 + 32 twice), where 128-wide tiles compute
# 384 and 256-wide 512, and every output pixel's A tile is read once per 320 channels instead of once per 128.
# Where A and B come from L2 near its bandwidth (SD b8's 64x64 convs: about 5.7 TB/s of tile loads at the measured
# 0.091 ms a call, an estimate from the tile arithmetic, not a profile), fewer A reads are the point. A tuner
# candidate (tuning.CANDIDATES_WIDE), not a default: tuned into SD-1.5 b8's 320-, 640- and 1,280-channel 3x3 convs, they
# took its row from 15.06 to 14.36 ms (H200, 2026-11-29, BENCHMARKS.md "Kernels, thirteenth measurement").
@triton.jit
def _tap_mainloop_wide(a_desc, b_desc, b2_desc, m0, oh0, ow0, co0, NITER, CK, NCB, pad_h, pad_w, KW: tl.constexpr,
                       A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr, FP8_ACC: tl.constexpr, HINT: tl.constexpr = True):
    """:func:`_tap_mainloop` (4-D boxes, the whole K loop) for a wide tile: the accumulators of channels
    ``co0 .. co0 + BLOCK_N`` and ``co0 + BLOCK_N .. co0 + BLOCK_N + BLOCK_N2`` from the same A tile."""
    return _tap_loop_wide_into(zero_acc(BLOCK_M, BLOCK_N, A_INT), zero_acc(BLOCK_M, BLOCK_N2, A_INT), a_desc, b_desc,
                               b2_desc, m0, oh0, ow0, co0, NITER, CK, NCB, pad_h, pad_w, KW, BITCAST_FP8, BLOCK_M,
                               BLOCK_N, BLOCK_K, FP8_ACC, HINT)


@triton.jit
def _tap_loop_wide_into(acc, acc2, a_desc, b_desc, b2_desc, m0, oh0, ow0, co0, NITER, CK, NCB, pad_h, pad_w,
                        KW: tl.constexpr, BITCAST_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, FP8_ACC: tl.constexpr, HINT: tl.constexpr = True):
    """:func:`_tap_mainloop_wide`'s loop, accumulating into ``acc`` and ``acc2`` (``HINT``: as in
    :func:`_tap_loop_into`)."""
    if HINT:
        nonempty(NITER > 0)
    for it in range(0, NITER):
        tap, c0, kh, kw = tap_block(it, NCB, KW, BLOCK_K)
        a = tl.reshape(a_desc.load([m0, oh0 + kh - pad_h, ow0 + kw - pad_w, c0]), (BLOCK_M, BLOCK_K))
        b = b_desc.load([co0, tap * CK + c0])
        b2 = b2_desc.load([co0 + BLOCK_N, tap * CK + c0])
        if BITCAST_FP8:  # the interpreter has no FP8 descriptors: FP8 travels as its bytes
            a = a.to(tl.float8e4nv, bitcast=True)
            b = b.to(tl.float8e4nv, bitcast=True)
            b2 = b2.to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype, max_num_imprecise_acc=FP8_ACC)
        acc2 = tl.dot(a, b2.T, acc2, out_dtype=acc2.dtype, max_num_imprecise_acc=FP8_ACC)
    return acc, acc2


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w"])
def _qconv_tma4d_wide_kernel(
    a_desc, b_desc, b2_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
    N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KH: tl.constexpr, KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, PAD_FIX: tl.constexpr,
    HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    """The plain 4-D kernel (:func:`_qconv_tma4d_kernel`) with wide tiles: BLOCK_N + BLOCK_N2 output channels a
    program, two accumulators, the epilogue once per channel block."""
    BLOCK_M: tl.constexpr = BI * BH * BW
    WIDE: tl.constexpr = BLOCK_N + BLOCK_N2
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, WIDE, GROUP_M)
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, WIDE)
    acc, acc2 = _tap_mainloop_wide(a_desc, b_desc, b2_desc, n0, oh0, ow0, co0, NITER, CK, NCB, pad_h, pad_w, KW,
                                   A_INT, BITCAST_FP8, BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_K, FP8_ACC)
    nb, oh, ow, m_ok = _tile_pixels(n0, oh0, ow0, tl.arange(0, BLOCK_M), N, Ho, Wo, BH, BW)
    # the narrow block's epilogue first: the wide accumulator waits in registers through the smaller one's
    offs_n2 = co0 + BLOCK_N + tl.arange(0, BLOCK_N2)
    _pad_fix_store(acc2, offs_n2, offs_n2 < Cout, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr,
                   bias_ptr, add_ptr, padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW,
                   PAD_FIX, HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD)
    offs_n = co0 + tl.arange(0, BLOCK_N)
    _pad_fix_store(acc, offs_n, offs_n < Cout, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                   add_ptr, padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX,
                   HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD)


# A conv with its ResNet block's 1x1 shortcut in the same accumulator (path of ``diffquant::qconv_sc``): conv2's taps
# over its own input, then one K loop per shortcut source (an up block's (h, skip) halves: two), each reading its own
# 4-D boxes at the same output pixels. The sources' kernel (KSC) is 1x1, or conv2's own k x k: a split conv (an up
# block's conv1 on (h, skip)) is its first part as "conv2" and its second part as one k x k source. The scales differ per source (activation scale x per-channel weight scale
# c_j[n]), so before source j the accumulator is multiplied by c_{j-1}[n] / c_j[n] and the epilogue by the last c:
# sum_j c_j S_j, exact up to fp32 rounding (the scales are positive, 1e-12 or more, as the converter makes them).
# The kernel reads the scales and both biases itself: no per-call host arithmetic, so no extra launches in a graph.
# The shortcut's own kernels (the gather kernel at 2-3x cuDNN's time on these short-K shapes), its output's write and
# its read back in conv2's epilogue all go.
@triton.jit(do_not_specialize=["N", "H", "W", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w", "CK1", "NCB1", "CK2",
                               "NCB2"])
def _qconv_tma4d_sc_kernel(
    a_desc, b_desc, a1_desc, b1_desc, a2_desc, b2_desc, out_ptr, as0_ptr, ws0_ptr, as1_ptr, ws1_ptr, as2_ptr, ws2_ptr,
    bias_ptr, scbias_ptr,
    N, H, W, Cout, CK, NCB, NITER, CK1, NCB1, CK2, NCB2, TILES_H, TILES_W, pad_h, pad_w,
    son, soh, sow, soc,
    KW: tl.constexpr, KSC: tl.constexpr, BITCAST_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SC_BIAS: tl.constexpr,
    NSC: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    BLOCK_M: tl.constexpr = BI * BH * BW
    PSC: tl.constexpr = (KSC - 1) // 2
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, BLOCK_N)
    offs_n = co0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout
    acc = _tap_mainloop(a_desc, b_desc, n0, oh0, ow0, co0, 0, NITER, 0, CK, NCB, pad_h, pad_w, KW, False, BITCAST_FP8,
                        True, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC, False)
    acc = acc * _sc_ratio(ws0_ptr, as0_ptr, ws1_ptr, as1_ptr, offs_n, n_ok)[None, :]
    acc = _tap_loop_into(acc, a1_desc, b1_desc, n0, oh0, ow0, co0, 0, KSC * KSC * NCB1, 0, CK1, NCB1, PSC, PSC, KSC,
                         BITCAST_FP8, True, BLOCK_M, BLOCK_K, FP8_ACC, False)
    if NSC == 2:
        acc = acc * _sc_ratio(ws1_ptr, as1_ptr, ws2_ptr, as2_ptr, offs_n, n_ok)[None, :]
        acc = _tap_loop_into(acc, a2_desc, b2_desc, n0, oh0, ow0, co0, 0, KSC * KSC * NCB2, 0, CK2, NCB2, PSC, PSC,
                             KSC, BITCAST_FP8, True, BLOCK_M, BLOCK_K, FP8_ACC, False)
    nb, oh, ow, m_ok = _tile_pixels(n0, oh0, ow0, tl.arange(0, BLOCK_M), N, H, W, BH, BW)
    dequant_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, as2_ptr if NSC == 2 else as1_ptr,
                  ws2_ptr if NSC == 2 else ws1_ptr, ws0_ptr, bias_ptr, out_ptr, son, soh, sow, soc, son, soh, sow, soc,
                  False, True, HAS_BIAS, False, scbias_ptr, HAS_SC_BIAS)


@triton.jit
def _sc_ratio(wsa_ptr, asa_ptr, wsb_ptr, asb_ptr, offs_n, n_ok):
    """c_a[n] / c_b[n], c = weight scale x activation scale: the factor that carries an accumulator from source a's
    scale to source b's."""
    ca = tl.load(wsa_ptr + offs_n, mask=n_ok, other=1.0) * tl.load(asa_ptr)
    return ca / (tl.load(wsb_ptr + offs_n, mask=n_ok, other=1.0) * tl.load(asb_ptr))


@triton.jit(do_not_specialize=["N", "H", "W", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w", "CK1", "NCB1", "CK2",
                               "NCB2"])
def _qconv_tma4d_sc_wide_kernel(
    a_desc, b_desc, bw_desc, a1_desc, b1_desc, b1w_desc, a2_desc, b2_desc, b2w_desc, out_ptr, as0_ptr, ws0_ptr,
    as1_ptr, ws1_ptr, as2_ptr, ws2_ptr, bias_ptr, scbias_ptr,
    N, H, W, Cout, CK, NCB, NITER, CK1, NCB1, CK2, NCB2, TILES_H, TILES_W, pad_h, pad_w,
    son, soh, sow, soc,
    KW: tl.constexpr, KSC: tl.constexpr, BITCAST_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SC_BIAS: tl.constexpr,
    NSC: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    """:func:`_qconv_tma4d_sc_kernel` with wide tiles (``BLOCK_N2``, as :func:`_qconv_tma4d_wide_kernel`): BLOCK_N +
    BLOCK_N2 output channels a program, two accumulators carried through every source (``b*w_desc``: the second
    channel block's weight boxes)."""
    BLOCK_M: tl.constexpr = BI * BH * BW
    WIDE: tl.constexpr = BLOCK_N + BLOCK_N2
    PSC: tl.constexpr = (KSC - 1) // 2
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, WIDE, GROUP_M)
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, WIDE)
    offs_n = co0 + tl.arange(0, BLOCK_N)
    offs_n2 = co0 + BLOCK_N + tl.arange(0, BLOCK_N2)
    n_ok, n2_ok = offs_n < Cout, offs_n2 < Cout
    acc, acc2 = _tap_mainloop_wide(a_desc, b_desc, bw_desc, n0, oh0, ow0, co0, NITER, CK, NCB, pad_h, pad_w, KW,
                                   False, BITCAST_FP8, BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_K, FP8_ACC, False)
    acc = acc * _sc_ratio(ws0_ptr, as0_ptr, ws1_ptr, as1_ptr, offs_n, n_ok)[None, :]
    acc2 = acc2 * _sc_ratio(ws0_ptr, as0_ptr, ws1_ptr, as1_ptr, offs_n2, n2_ok)[None, :]
    acc, acc2 = _tap_loop_wide_into(acc, acc2, a1_desc, b1_desc, b1w_desc, n0, oh0, ow0, co0, KSC * KSC * NCB1, CK1,
                                    NCB1, PSC, PSC, KSC, BITCAST_FP8, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC, False)
    if NSC == 2:
        acc = acc * _sc_ratio(ws1_ptr, as1_ptr, ws2_ptr, as2_ptr, offs_n, n_ok)[None, :]
        acc2 = acc2 * _sc_ratio(ws1_ptr, as1_ptr, ws2_ptr, as2_ptr, offs_n2, n2_ok)[None, :]
        acc, acc2 = _tap_loop_wide_into(acc, acc2, a2_desc, b2_desc, b2w_desc, n0, oh0, ow0, co0, KSC * KSC * NCB2,
                                        CK2, NCB2, PSC, PSC, KSC, BITCAST_FP8, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC,
                                        False)
    nb, oh, ow, m_ok = _tile_pixels(n0, oh0, ow0, tl.arange(0, BLOCK_M), N, H, W, BH, BW)
    as_last = as2_ptr if NSC == 2 else as1_ptr
    ws_last = ws2_ptr if NSC == 2 else ws1_ptr
    dequant_store(acc2, offs_n2, n2_ok, m_ok, nb, oh, ow, out_ptr, as_last, ws_last, ws0_ptr, bias_ptr, out_ptr, son,
                  soh, sow, soc, son, soh, sow, soc, False, True, HAS_BIAS, False, scbias_ptr, HAS_SC_BIAS)
    dequant_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, as_last, ws_last, ws0_ptr, bias_ptr, out_ptr, son, soh,
                  sow, soc, son, soh, sow, soc, False, True, HAS_BIAS, False, scbias_ptr, HAS_SC_BIAS)


def qconv_sc_unsupported(x: torch.Tensor, w: torch.Tensor, padding: Sequence[int], sc_x: Sequence[torch.Tensor],
                         sc_w: Sequence[torch.Tensor]) -> Optional[str]:
    """Why :func:`qconv_tma4d_sc` cannot run this call (None: it can)."""
    if not 1 <= len(sc_x) <= 2 or len(sc_w) != len(sc_x):
        return f"{len(sc_x)} shortcut sources with {len(sc_w)} weights (1 or 2 of each)"
    if x.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        return f"needs FP8 input and weight; got {x.dtype} / {w.dtype}"
    cout, kh, kw, ck = w.shape
    if ck != x.shape[1] or 2 * int(padding[0]) != kh - 1 or 2 * int(padding[1]) != kw - 1:
        return f"conv2 must keep the size (k {kh}x{kw}, padding {tuple(padding)}, {ck} weight channels)"
    for xs, ws in zip(sc_x, sc_w):
        if xs.dtype != torch.float8_e4m3fn or ws.dtype != torch.float8_e4m3fn:
            return f"shortcut sources and weights must be FP8; got {xs.dtype} / {ws.dtype}"
        if xs.shape[0] != x.shape[0] or xs.shape[2:] != x.shape[2:]:
            return f"shortcut source {tuple(xs.shape)} against conv input {tuple(x.shape)}"
        k = ws.shape[1]
        if (tuple(ws.shape) != (cout, k, k, xs.shape[1]) or k not in (1, kh) or (k > 1 and kh != kw)
                or k != sc_w[0].shape[1]):
            return (f"source weight {tuple(ws.shape)} for a {xs.shape[1]}-channel source and {cout} outputs (1x1, or "
                    f"conv2's {kh}x{kw}, the same for every source)")
    if x.device.type == "cuda" and _capability_major(x.device) < 9:
        return "TMA needs compute capability 9.0+"
    if x.device.type != "cuda" and not _interpreting():
        return "needs a GPU (or Triton's interpreter)"
    for t in (x, *sc_x):
        why = tma4d_extra_unsupported(t, 0, (0, 0), None)
        if why is not None:
            return why
    return None


def qconv_tma4d_sc(x, w, w_scale, a_scale, bias, sc_x, sc_w, sc_w_scale, sc_a_scale, sc_bias, padding: Sequence[int],
                   out_dtype: torch.dtype, config: dict) -> torch.Tensor:
    """``diffquant::qconv_sc`` through :func:`_qconv_tma4d_sc_kernel`, for a call that :func:`qconv_sc_unsupported`
    accepts (the caller, :func:`.triton_conv.qconv_sc_triton`, has checked); ``config``: BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages, and optionally BLOCK_N2 (wide tiles: :func:`_qconv_tma4d_sc_wide_kernel`)."""
    from diffquant.kernels.reference import out_like

    nbatch, c, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    out = out_like(x, cout, h, wd, out_dtype)
    if nbatch * h * wd == 0:
        return out
    bitcast = _interpreting()
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    bn2 = int(config.get("BLOCK_N2", 0))
    bi, bh, bw = tile_4d(bm, h, wd)
    box = [bi, bh, bw, bk]

    def descs(t, wt, k):  # A boxes, B boxes of the first channel block (and of the second, for wide tiles)
        tv = t.view(torch.uint8) if bitcast else t
        wv = (wt.view(torch.uint8) if bitcast else wt).reshape(cout, k)
        b = [TensorDescriptor(wv, [cout, k], [k, 1], [bn, bk])]
        if bn2:
            b.append(TensorDescriptor(wv, [cout, k], [k, 1], [bn2, bk]))
        return [TensorDescriptor(tv, [nbatch, h, wd, t.shape[1]], [t.stride(0), t.stride(2), t.stride(3), 1], box), *b]

    main = descs(x, w, kh * kw * ck)
    src = [descs(xs, ws, ws.shape[1] * ws.shape[2] * xs.shape[1]) for xs, ws in zip(sc_x, sc_w)]
    second = 1 if len(src) == 2 else 0  # (unused when NSC == 1)
    scales = [(sc_a_scale[i], sc_w_scale[i]) for i in (0, second)]
    tiles_h, tiles_w = triton.cdiv(h, bh), triton.cdiv(wd, bw)
    grid = (triton.cdiv(nbatch, bi) * tiles_h * tiles_w * triton.cdiv(cout, bn + bn2),)
    ncb = triton.cdiv(ck, bk)
    ck1, ck2 = sc_x[0].shape[1], sc_x[second].shape[1]
    ksc = sc_w[0].shape[1]
    args = (*main, *src[0], *src[second], out, a_scale, w_scale, *scales[0], *scales[1],
            bias if bias is not None else w_scale, sc_bias if sc_bias is not None else w_scale,
            nbatch, h, wd, cout, ck, ncb, kh * kw * ncb, ck1, triton.cdiv(ck1, bk), ck2, triton.cdiv(ck2, bk), tiles_h,
            tiles_w, int(padding[0]), int(padding[1]), out.stride(0), out.stride(2), out.stride(3), out.stride(1))
    flags = dict(KW=kw, KSC=ksc, BITCAST_FP8=bitcast, HAS_BIAS=bias is not None, HAS_SC_BIAS=sc_bias is not None,
                 NSC=len(src), BI=bi, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FP8_ACC=fp8_acc(bk, True),
                 num_warps=config["num_warps"], num_stages=config["num_stages"])
    kernel = _qconv_tma4d_sc_kernel
    if bn2:
        kernel, flags = _qconv_tma4d_sc_wide_kernel, dict(flags, BLOCK_N2=bn2)
    _launch_retrying(kernel, grid, args, flags, bm, bn + bn2, bk)
    return out


# The persistent form (path "tma4dp"): one program per SM walks the output tiles, and the tile loop is flattened
# into the tap loop (``tl.range(..., flatten=True)``), so the loads of a tile's first taps are issued while the
# previous tile's epilogue runs. The CIFAR UNet's 3x3 convs have 9 to 18 K steps per tile (128 to 256 channels), so
# each program's prologue and epilogue weigh: tuned, the non-persistent kernel reached 645-1,114 TFLOPS on those of
# 8x8 and up, of an FP8 peak near 1,979 (benchmarks/results/qconv_tune_rows_cifar_tma4d.json, H200, 2026-11-28).
@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w",
                               "NUM_PROGS"])
def _qconv_tma4d_persistent_kernel(
    a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
    N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, NUM_PROGS,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KH: tl.constexpr, KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, PAD_FIX: tl.constexpr,
    HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    BLOCK_M: tl.constexpr = BI * BH * BW
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    num_tiles = tiles_m * tl.cdiv(Cout, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile_of(tile, tiles_m * BLOCK_M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
        _tma4d_tile(pid_m, pid_n, a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                    padc_ptr, N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, son, soh, sow, soc,
                    san, sah, saw, sac, KH, KW, A_INT, BITCAST_FP8, PAD_FIX, HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD,
                    BI, BH, BW, BLOCK_N, BLOCK_K, FP8_ACC)


# ---- split-K (config field "SPLIT_K" of paths "tma4d" and "tma") -----------------------------------------------
# SD-1.5's 8x8 and 16x16 levels at batch 8 have M = 512 and 2,048 output pixels against K = 11,520: 40 to 160 output
# tiles for 132 SMs, and their convs ran at 374-851 TFLOPS where the 64x64 level's best reach 1,258
# (benchmarks/results/qconv_tune_rows_tma4dr.json, H200, 2026-11-28). Split-K gives each tile SPLIT_K programs, each
# over a contiguous part of the (tap, channel block) loop, which store their partial accumulators (fp32, int32 for
# int8: exact) to a workspace; a second kernel sums them and runs the usual epilogue.
@triton.jit(do_not_specialize=["N", "H", "W", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w", "PER", "WS_M", "WS_N"])
def _qconv_tma4d_splitk_kernel(
    a_desc, b_desc, ws_ptr,
    N, H, W, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, PER, WS_M, WS_N,
    KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    """Program (tile, s): steps [s * PER, (s + 1) * PER) of the tile's loop, stored to ``ws[s]`` ([WS_M, WS_N], the
    tiles' pixels in tile order x the padded channels)."""
    BLOCK_M: tl.constexpr = BI * BH * BW
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    s = tl.program_id(1)
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, BLOCK_N)
    acc = _tap_mainloop(a_desc, b_desc, n0, oh0, ow0, co0, s * PER, tl.minimum(NITER, (s + 1) * PER), 0, CK, NCB,
                        pad_h, pad_w, KW, A_INT, BITCAST_FP8, True, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = co0 + tl.arange(0, BLOCK_N)
    tl.store(ws_ptr + s.to(tl.int64) * WS_M * WS_N + rows[:, None] * WS_N + cols[None, :], acc)


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "TILES_H", "TILES_W", "pad_h", "pad_w", "SPLIT", "WS_M",
                               "WS_N", "MP", "HP", "WP"])
def _qconv_splitk_reduce_kernel(
    ws_ptr, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
    N, H, W, Ho, Wo, Cout, TILES_H, TILES_W, pad_h, pad_w, SPLIT, WS_M, WS_N, MP, HP, WP,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KH: tl.constexpr, KW: tl.constexpr, PAD_FIX: tl.constexpr, HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, PADDED: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr,
    BW: tl.constexpr, RM: tl.constexpr, RN: tl.constexpr,
):
    """The split-K partials of an [RM, RN] block of the workspace summed, then the conv epilogue. Workspace row i is
    pixel i % BLOCK_M of output tile i // BLOCK_M (the 4-D split kernel's tile order), or with ``PADDED`` row i of
    the padded copy (the 2-D kernel's; MP rows of HP x WP images)."""
    rows = tl.program_id(0) * RM + tl.arange(0, RM)
    cols = tl.program_id(1) * RN + tl.arange(0, RN)
    offs = rows.to(tl.int64)[:, None] * WS_N + cols[None, :]
    acc = tl.load(ws_ptr + offs)
    for s in range(1, SPLIT):
        acc += tl.load(ws_ptr + s * WS_M.to(tl.int64) * WS_N + offs)
    if PADDED:
        nb, oh, ow, m_ok = _padded_pixels(rows, MP, HP, WP, Ho, Wo)
    else:
        BLOCK_M: tl.constexpr = BI * BH * BW
        n0, oh0, ow0, _ = _tile_origin(rows // BLOCK_M, 0, TILES_H, TILES_W, BI, BH, BW, RN)
        nb, oh, ow, m_ok = _tile_pixels(n0, oh0, ow0, rows % BLOCK_M, N, Ho, Wo, BH, BW)
    n_ok = cols < Cout
    _pad_fix_store(acc, cols, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                   padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX, HAS_ASCALE,
                   HAS_CORR, HAS_BIAS, HAS_ADD)


def _reduce_split(ws, out, a_scale, w_scale, corr, bias, add, pad_corr, nbatch, h, wd, ho, wo, cout, ph, pw, kh, kw,
                  split, tiles=None, padded=None) -> None:
    """Launch :func:`_qconv_splitk_reduce_kernel` on a split kernel's workspace ``ws`` ([split, WS_M, WS_N]): rows in
    4-D tile order (``tiles``: (BI, BH, BW, TILES_H, TILES_W)) or of the padded copy (``padded``: (MP, HP, WP))."""
    _, ws_m, ws_n = ws.shape
    bi, bh, bw, tiles_h, tiles_w = tiles or (1, 1, 1, 1, 1)
    mp, hp, wp = padded or (0, 1, 1)
    rn = min(128, ws_n & -ws_n)  # a power of two dividing WS_N (a multiple of BLOCK_N)
    sa = add.stride() if add is not None else (0, 0, 0, 0)
    _qconv_splitk_reduce_kernel[(triton.cdiv(ws_m, 32), ws_n // rn)](
        ws, out, a_scale if a_scale is not None else w_scale, w_scale, corr if corr is not None else w_scale,
        bias if bias is not None else w_scale, add if add is not None else out,
        pad_corr if pad_corr is not None else w_scale,
        nbatch, h, wd, ho, wo, cout, tiles_h, tiles_w, ph, pw, split, ws_m, ws_n, mp, hp, wp,
        out.stride(0), out.stride(2), out.stride(3), out.stride(1), sa[0], sa[2], sa[3], sa[1],
        KH=kh, KW=kw, PAD_FIX=pad_corr is not None, HAS_ASCALE=a_scale is not None, HAS_CORR=corr is not None,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None, PADDED=padded is not None, BI=bi, BH=bh, BW=bw, RM=32,
        RN=rn, num_warps=4)


def split_k_steps(niter: int, split: int) -> tuple[int, int]:
    """(programs per tile, loop steps per program) of a split-K call: at most ``split`` programs, none empty."""
    split = max(1, min(int(split), niter))
    per = -(-niter // split)
    return -(-niter // per), per


# ---- 4-D boxes, one dot per output row (path "tma4dr") --------------------------------------------------------
# A tile of several rows reshaped from one [BI, BH, BW, BK] box goes through registers before the MMA, and ptxas then
# serializes the wgmma pipeline (C7515; benchmarks/ptxas_report.py). One-row boxes [1, 1, BW, BK] stay in shared
# memory. So this kernel covers R = BI * BH rows (2 or 4) with R one-row boxes per K step and one accumulator
# each: R dots of [BW, BK] x [BK, BLOCK_N] that share the B tile. BW must be 64 or more (wgmma's M per warpgroup).
@triton.jit
def _row_epilogue(acc, r: tl.constexpr, n0, oh0, ow0, offs_n, n_ok, out_ptr, ascale_ptr, wscale_ptr, corr_ptr,
                  bias_ptr, add_ptr, padc_ptr, N, H, W, Ho, Wo, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac,
                  KH: tl.constexpr, KW: tl.constexpr, PAD_FIX: tl.constexpr, HAS_ASCALE: tl.constexpr,
                  HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, BH: tl.constexpr,
                  BW: tl.constexpr):
    """Row ``r`` of the tile (image n0 + r // BH, output row oh0 + r % BH): the zero-point fix and the epilogue."""
    zero = tl.zeros((BW,), dtype=tl.int32)
    nb = zero + n0 + r // BH
    oh = zero + oh0 + r % BH
    ow = ow0 + tl.arange(0, BW)
    m_ok = (nb < N) & (oh < Ho) & (ow < Wo)
    _pad_fix_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                   padc_ptr, H, W, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX, HAS_ASCALE,
                   HAS_CORR, HAS_BIAS, HAS_ADD)


@triton.jit
def _row_a(a_desc, r: tl.constexpr, n0, oh0, ow0, kh, kw, c0, pad_h, pad_w, BH: tl.constexpr, BW: tl.constexpr,
           BLOCK_K: tl.constexpr, BITCAST_FP8: tl.constexpr):
    """The A tile of row ``r`` for tap (kh, kw): a one-row box, [BW, BLOCK_K] without leaving shared memory."""
    a = a_desc.load([n0 + r // BH, oh0 + r % BH + kh - pad_h, ow0 + kw - pad_w, c0])
    a = tl.reshape(a, (BW, BLOCK_K))
    if BITCAST_FP8:
        a = a.to(tl.float8e4nv, bitcast=True)
    return a


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "NITER", "TILES_H", "TILES_W", "pad_h", "pad_w"])
def _qconv_tma4d_rows_kernel(
    a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr, padc_ptr,
    N, H, W, Ho, Wo, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w,
    son, soh, sow, soc,
    san, sah, saw, sac,
    KH: tl.constexpr, KW: tl.constexpr, A_INT: tl.constexpr, BITCAST_FP8: tl.constexpr, PAD_FIX: tl.constexpr,
    HAS_ASCALE: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BI: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr = None,
):
    R: tl.constexpr = BI * BH
    tl.static_assert(R == 2 or R == 4, "tma4dr covers 2 or 4 rows a tile")
    BLOCK_M: tl.constexpr = R * BW
    tiles_m = tl.cdiv(N, BI) * TILES_H * TILES_W
    pid_m, pid_n = grouped_tile(tiles_m * BLOCK_M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    n0, oh0, ow0, co0 = _tile_origin(pid_m, pid_n, TILES_H, TILES_W, BI, BH, BW, BLOCK_N)
    acc0 = zero_acc(BW, BLOCK_N, A_INT)
    acc1 = zero_acc(BW, BLOCK_N, A_INT)
    if R == 4:
        acc2 = zero_acc(BW, BLOCK_N, A_INT)
        acc3 = zero_acc(BW, BLOCK_N, A_INT)
    nonempty(NITER > 0)
    for it in range(0, NITER):
        tap, c0, kh, kw = tap_block(it, NCB, KW, BLOCK_K)
        b = b_desc.load([co0, tap * CK + c0])
        if BITCAST_FP8:
            b = b.to(tl.float8e4nv, bitcast=True)
        bt = b.T
        a = _row_a(a_desc, 0, n0, oh0, ow0, kh, kw, c0, pad_h, pad_w, BH, BW, BLOCK_K, BITCAST_FP8)
        acc0 = tl.dot(a, bt, acc0, out_dtype=acc0.dtype, max_num_imprecise_acc=FP8_ACC)
        a = _row_a(a_desc, 1, n0, oh0, ow0, kh, kw, c0, pad_h, pad_w, BH, BW, BLOCK_K, BITCAST_FP8)
        acc1 = tl.dot(a, bt, acc1, out_dtype=acc1.dtype, max_num_imprecise_acc=FP8_ACC)
        if R == 4:
            a = _row_a(a_desc, 2, n0, oh0, ow0, kh, kw, c0, pad_h, pad_w, BH, BW, BLOCK_K, BITCAST_FP8)
            acc2 = tl.dot(a, bt, acc2, out_dtype=acc2.dtype, max_num_imprecise_acc=FP8_ACC)
            a = _row_a(a_desc, 3, n0, oh0, ow0, kh, kw, c0, pad_h, pad_w, BH, BW, BLOCK_K, BITCAST_FP8)
            acc3 = tl.dot(a, bt, acc3, out_dtype=acc3.dtype, max_num_imprecise_acc=FP8_ACC)
    offs_n = co0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout
    _row_epilogue(acc0, 0, n0, oh0, ow0, offs_n, n_ok, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                  padc_ptr, N, H, W, Ho, Wo, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX,
                  HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD, BH, BW)
    _row_epilogue(acc1, 1, n0, oh0, ow0, offs_n, n_ok, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                  padc_ptr, N, H, W, Ho, Wo, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW, PAD_FIX,
                  HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD, BH, BW)
    if R == 4:
        _row_epilogue(acc2, 2, n0, oh0, ow0, offs_n, n_ok, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                      add_ptr, padc_ptr, N, H, W, Ho, Wo, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW,
                      PAD_FIX, HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD, BH, BW)
        _row_epilogue(acc3, 3, n0, oh0, ow0, offs_n, n_ok, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr,
                      add_ptr, padc_ptr, N, H, W, Ho, Wo, pad_h, pad_w, son, soh, sow, soc, san, sah, saw, sac, KH, KW,
                      PAD_FIX, HAS_ASCALE, HAS_CORR, HAS_BIAS, HAS_ADD, BH, BW)


def rows_split(block_m: int, ho: int, wo: int) -> Optional[int]:
    """Rows of a tma4dr tile (2 or 4), or None where that kernel cannot take this tile: output rows under 64 pixels
    wide (wgmma's M per warpgroup; :func:`.triton_conv.tma_paths` offers the kernel from 64 up), a tile of one row
    (the plain 4-D kernel already reads it from shared memory), or more than 4 rows."""
    bi, bh, bw = tile_4d(block_m, ho, wo)
    r = bi * bh
    return r if wo >= 64 and bw >= 64 and r in (2, 4) else None


def tma4d_unsupported(x: torch.Tensor, w: torch.Tensor, wzp, stride: Sequence[int], dilation: Sequence[int],
                      w4: bool, a_zp: int, padding: Sequence[int], pad_corr) -> Optional[str]:
    """Why this call cannot take the 4-D TMA path (None: it can)."""
    why = tma_unsupported(x, w, wzp, stride, dilation, w4)
    return why if why is not None else tma4d_extra_unsupported(x, a_zp, padding, pad_corr)


def tma4d_extra_unsupported(x: torch.Tensor, a_zp: int, padding: Sequence[int], pad_corr) -> Optional[str]:
    """What the 4-D TMA path needs beyond :func:`tma_unsupported` (None: nothing is missing)."""
    if x.stride(1) != 1:
        return "input not channels-last"
    if any((s * x.element_size()) % 16 for s in (x.stride(0), x.stride(2), x.stride(3))) or x.data_ptr() % 16:
        return "input strides or start not 16-byte aligned"
    if x.dtype == torch.int8 and a_zp != 0 and (padding[0] or padding[1]) and pad_corr is None:
        return "an int8 zero point with padding needs pad_corr"
    return None


def tile_4d(block_m: int, ho: int, wo: int) -> tuple[int, int, int]:
    """(images, rows, columns) of an output tile of ``block_m`` pixels: whole rows where they fit."""
    bw = min(triton.next_power_of_2(wo), block_m, 256)
    bh = min(triton.next_power_of_2(ho), block_m // bw)
    return block_m // (bw * bh), bh, bw


def qconv_tma4d(x, w, w_scale, a_scale, corr, bias, add, a_zp: int, padding: Sequence[int], out_dtype: torch.dtype,
                pad_corr=None, config: Optional[dict] = None, persistent: bool = False,
                rows: bool = False, stats: Optional[tuple] = None) -> torch.Tensor:
    """``diffquant::qconv`` through 4-D TMA boxes (see :func:`tma4d_unsupported`); same arguments and result as
    :func:`.reference.qconv_reference`. Reads channels-last input in place, channel slices included.
    ``persistent``: one program per SM walking the tiles (:func:`_qconv_tma4d_persistent_kernel`). ``rows``: one
    one-row box and one dot per output row of the tile (:func:`_qconv_tma4d_rows_kernel`; :func:`rows_split` says
    where it applies, elsewhere the plain kernel runs). ``stats``: ``(mean, m2)``, [N, Ho, Cout] fp32 buffers that
    the plain kernel's epilogue fills with the output's per-row statistics (``diffquant::qconv_stats``); only for a
    config that :func:`row_stats_in_epilogue` accepts. A config with ``BLOCK_N2`` runs wide tiles
    (:func:`_qconv_tma4d_wide_kernel`) on the plain kernel's calls; persistent, rows, split-K and statistics calls
    run its ``BLOCK_N`` tiles."""
    from diffquant.kernels.reference import out_like

    nbatch, c, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    if ck != c:
        raise ValueError(f"input has {c} channels; the weight expects {ck}")
    ph, pw = int(padding[0]), int(padding[1])
    ho, wo = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
    out = out_like(x, cout, ho, wo, out_dtype)
    if nbatch * ho * wo == 0:
        return out
    fp8 = x.dtype == torch.float8_e4m3fn
    bitcast = fp8 and _interpreting()
    xv = x.view(torch.uint8) if bitcast else x
    wv = w.view(torch.uint8) if bitcast else w
    cfg = dict(config or pick_tma_config(nbatch * ho * wo, cout, ck, persistent))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    bi, bh, bw = tile_4d(bm, ho, wo)
    rows = rows and not persistent and rows_split(bm, ho, wo) is not None
    box = [1, 1, bw, bk] if rows else [bi, bh, bw, bk]
    a_desc = TensorDescriptor(xv, [nbatch, h, wd, c], [x.stride(0), x.stride(2), x.stride(3), 1], box)
    w2 = wv.reshape(cout, kh * kw * ck)
    b_desc = TensorDescriptor(w2, [cout, kh * kw * ck], [kh * kw * ck, 1], [bn, bk])
    ncb = triton.cdiv(ck, bk)
    dummy = w_scale
    pad_fix = x.dtype == torch.int8 and a_zp != 0 and bool(ph or pw)
    sa = add.stride() if add is not None else (0, 0, 0, 0)
    tiles_h, tiles_w = triton.cdiv(ho, bh), triton.cdiv(wo, bw)
    tiles = triton.cdiv(nbatch, bi) * tiles_h * tiles_w * triton.cdiv(cout, bn)
    args = (a_desc, b_desc, out,
            a_scale if a_scale is not None else dummy, w_scale, corr if corr is not None else dummy,
            bias if bias is not None else dummy, add if add is not None else out, pad_corr if pad_fix else dummy,
            nbatch, h, wd, ho, wo, cout, ck, ncb, kh * kw * ncb, tiles_h, tiles_w, ph, pw)
    strides = (out.stride(0), out.stride(2), out.stride(3), out.stride(1), sa[0], sa[2], sa[3], sa[1])
    flags = dict(KH=kh, KW=kw, A_INT=x.dtype == torch.int8, BITCAST_FP8=bitcast, PAD_FIX=pad_fix,
                 HAS_ASCALE=a_scale is not None, HAS_CORR=corr is not None, HAS_BIAS=bias is not None,
                 HAS_ADD=add is not None, BI=bi, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                 FP8_ACC=fp8_acc(bk, fp8),
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    split, per = split_k_steps(kh * kw * ncb, cfg.get("SPLIT_K", 1))
    bn2 = int(cfg.get("BLOCK_N2", 0))
    if bn2 and not (persistent or rows or split > 1 or stats is not None):  # (those run the config's BLOCK_N tiles)
        b2_desc = TensorDescriptor(w2, [cout, kh * kw * ck], [kh * kw * ck, 1], [bn2, bk])
        grid = (triton.cdiv(nbatch, bi) * tiles_h * tiles_w * triton.cdiv(cout, bn + bn2),)
        _launch_retrying(_qconv_tma4d_wide_kernel, grid, (args[0], args[1], b2_desc, *args[2:], *strides),
                         dict(flags, BLOCK_N2=bn2), bm, bn + bn2, bk)
        return out
    if split > 1 and not persistent and not rows:  # (a tma4d config rerouted to tma4dr by 4dr / precise runs unsplit)
        tiles_m, tiles_n = triton.cdiv(nbatch, bi) * tiles_h * tiles_w, triton.cdiv(cout, bn)
        ws_m, ws_n = tiles_m * bm, tiles_n * bn
        ws = torch.empty((split, ws_m, ws_n), device=x.device,
                         dtype=torch.int32 if x.dtype == torch.int8 else torch.float32)
        main = {k: flags[k] for k in ("KW", "A_INT", "BITCAST_FP8", "BI", "BH", "BW", "BLOCK_N", "BLOCK_K", "GROUP_M",
                                      "FP8_ACC", "num_warps", "num_stages")}
        _launch_retrying(_qconv_tma4d_splitk_kernel, (tiles, split),
                         (a_desc, b_desc, ws, nbatch, h, wd, cout, ck, ncb, kh * kw * ncb, tiles_h, tiles_w, ph, pw,
                          per, ws_m, ws_n), main, bm, bn, bk)
        _reduce_split(ws, out, a_scale, w_scale, corr, bias, add, pad_corr if pad_fix else None, nbatch, h, wd, ho,
                      wo, cout, ph, pw, kh, kw, split, tiles=(bi, bh, bw, tiles_h, tiles_w))
        return out
    if persistent:
        progs = max(1, min(tiles, persistent_programs(x.device)))
        grid, kernel, flags = (progs,), _qconv_tma4d_persistent_kernel, dict(flags, FLATTEN=not _interpreting())
        args = (*args, progs)
    else:
        grid, kernel = (tiles,), _qconv_tma4d_rows_kernel if rows else _qconv_tma4d_kernel
    if stats is not None:
        if kernel is not _qconv_tma4d_kernel or tiles_w != 1 or split > 1:
            raise ValueError(f"qconv_tma4d: this config ({cfg}) cannot compute row statistics in its epilogue")
        flags = dict(flags, mean_ptr=stats[0], m2_ptr=stats[1], STATS=True, STATS_DOT=stats_epilogue() == "dot")
    _launch_retrying(kernel, grid, (*args, *strides), flags, bm, bn, bk)
    return out


def stats_epilogue() -> str:
    """``DIFFQUANT_GN_STATS_EPILOGUE``: how the 4-D kernel's epilogue reduces its rows' statistics: ``shuffle`` (the
    default: the mean, then the deviations, by warp shuffles; timed in session 13, 0.73 ms dearer than the
    statistics passes it saved on CIFAR b256) or ``dot`` (both sums on the tensor cores,
    :func:`_row_stats_dot_store`; timed in session 14: the conv epilogues 0.25 ms dearer instead of 0.74, the model
    row no faster than without the statistics, 7.955 against 7.936 ms on CIFAR b256, H200)."""
    v = os.environ.get("DIFFQUANT_GN_STATS_EPILOGUE", "shuffle")
    if v not in ("shuffle", "dot"):
        raise ValueError(f"DIFFQUANT_GN_STATS_EPILOGUE={v!r}: shuffle or dot")
    return v


def row_stats_in_epilogue(cfg: dict, path: str, ho: int, wo: int) -> bool:
    """Whether the conv kernel of this call (block config ``cfg``, kernel ``path`` as run) computes the output's
    per-row statistics in its epilogue: the plain 4-D kernel, unsplit, with tiles of whole output rows."""
    if path != "tma4d" or cfg.get("SPLIT_K", 1) > 1:
        return False
    _, _, bw = tile_4d(cfg["BLOCK_M"], ho, wo)
    return bw >= wo


def _launch_retrying(kernel, grid, args: tuple, flags: dict, bm: int, bn: int, bk: int) -> None:
    """``kernel[grid](*args, **flags)``, retried with one pipeline stage fewer while shared memory runs out: the
    persistent kernel's output tile, and the rows kernel's per-row epilogue, share shared memory with the operand
    stages (a config tuned for the plain kernel can run out there)."""
    flags = dict(flags)
    while True:
        try:
            kernel[grid](*args, **flags)
            return
        except triton.runtime.errors.OutOfResources as e:
            if flags["num_stages"] <= 1 or "shared memory" not in str(e):
                raise
            _warn_stages(bm, bn, bk, flags["num_stages"], str(e))
            flags["num_stages"] -= 1


@functools.lru_cache(maxsize=None)
def _warn_stages(bm: int, bn: int, bk: int, stages: int, why: str) -> None:
    import logging

    logging.getLogger(__name__).warning("4-D TMA conv %dx%dx%d with %d stages: %s; retrying with %d", bm, bn, bk,
                                        stages, why.splitlines()[0][:160], stages - 1)


def persistent_programs(device: torch.device) -> int:
    """Programs of the persistent conv kernel: one per SM (a small fixed count in the interpreter, so that its tests
    walk several tiles per program)."""
    if _interpreting() or device.type != "cuda":
        return 3
    from diffquant.kernels.triton_conv import _num_sms

    return _num_sms(device)
