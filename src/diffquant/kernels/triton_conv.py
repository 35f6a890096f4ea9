"""Triton implicit-GEMM convolution (NHWC, no materialised im2col) for int8, FP8 (e4m3) and bf16
activations with int8, FP8 or packed 4-bit weights; a Linear is the 1x1 case.

GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin, walked as one flat loop over
(tap, channel block) so that the software pipeline spans the taps. Each program owns a
BLOCK_M x BLOCK_N output tile; the A tile is gathered from the NHWC input (padding positions take
the activation zero point), the B tile is read from the ``[Cout, KH, KW, Cin]`` weight (K-major,
as Hopper's tensor cores want it for 8-bit operands). The epilogue applies the zero-point
corrections in int32, then one fp32 scale per output channel, the bias and an optional residual
(``add``), and stores the output channels-last. Storage conventions: :mod:`diffquant.kernels.reference`.

Importing this module needs Triton; :mod:`diffquant.kernels.ops` imports it only when available.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from diffquant.kernels import triton_conv_tma, tuning
from diffquant.kernels._triton_common import dequant_store, fp8_acc, fp8_precise, grouped_tile, nonempty

log = logging.getLogger(__name__)


# Integer arguments equal to 1 or divisible by 16 are specialised by Triton (one compilation per
# pattern). Sizes that only bound loops or masks are left out of that, so a UNet's few dozen layer
# shapes share a handful of compilations; the strides and CK/Cout stay specialised (they decide
# whether loads and stores vectorise).
@triton.jit(do_not_specialize=["a_zp", "M", "H", "W", "Ho", "Wo", "NCB", "NITER", "conv_sh", "conv_sw", "pad_h",
                               "pad_w", "dil_h", "dil_w"])
def _qconv_kernel(
    x_ptr, w_ptr, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, wzp_ptr, bias_ptr, add_ptr, padc_ptr,
    a_zp,
    M, H, W, Ho, Wo, Cout, CK, NCB, NITER,
    sxn, sxh, sxw, sxc,
    son, soh, sow, soc,
    san, sah, saw, sac,
    swn,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    A_INT: tl.constexpr, A_FP8: tl.constexpr, W4: tl.constexpr, HAS_AZP: tl.constexpr, PAD_FIX: tl.constexpr, HAS_ASCALE: tl.constexpr,
    HAS_WZP: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr = False, IEEE: tl.constexpr = False, FP8_ACC: tl.constexpr = None,
):
    pid_m, pid_n = grouped_tile(M, Cout, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < Cout
    hw = Ho * Wo
    nb = offs_m // hw
    r = offs_m % hw
    oh = r // Wo
    ow = r % Wo
    ih0 = oh * conv_sh - pad_h
    iw0 = ow * conv_sw - pad_w
    x_row = x_ptr + nb.to(tl.int64) * sxn
    w_col = w_ptr + offs_n.to(tl.int64) * swn
    offs_k = tl.arange(0, BLOCK_K)

    if A_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rs = tl.zeros((BLOCK_M,), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rs = tl.zeros((BLOCK_M,), dtype=tl.float32)

    nonempty(NITER > 0)  # qconv_triton refuses a weight without channels or taps
    for it in range(0, NITER):
        tap = it // NCB
        c0 = (it - tap * NCB) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        sp_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kk = c0 + offs_k
        if EVEN_K:  # CK % BLOCK_K == 0: no channel tail, the mask is the padding rows only
            k_ok = offs_k < BLOCK_K
        else:
            k_ok = kk < CK
        a_ptrs = x_row[:, None] + (ih.to(tl.int64) * sxh + iw * sxw)[:, None] + kk[None, :] * sxc
        a_mask = sp_ok[:, None] & k_ok[None, :]
        # zero fill (padding, K tail): an async copy straight into shared memory; with PAD_FIX the
        # padding's zero point is added back in the epilogue instead of per element here
        a = tl.load(a_ptrs, mask=a_mask, other=0)
        if A_FP8:  # FP8 travels as its bytes (0x00 = 0.0), bitcast after the masked load
            a = a.to(tl.float8e4nv, bitcast=True)
        if HAS_AZP:
            pad = (~sp_ok)[:, None] & k_ok[None, :]
            a = tl.where(pad, a_zp.to(tl.int8), a)
        b = tl.load(w_col[None, :] + tap * CK + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        if W4:
            a2 = tl.load(a_ptrs + CK * sxc, mask=a_mask, other=0)
            if HAS_AZP:
                a2 = tl.where(pad, a_zp.to(tl.int8), a2)
            lo = (b & 15).to(tl.int8) - 8
            hi = (b >> 4).to(tl.int8) - 8
            if A_INT:
                acc = tl.dot(a, lo, acc, out_dtype=acc.dtype)
                acc = tl.dot(a2, hi, acc, out_dtype=acc.dtype)
            else:
                if IEEE:  # fp32 activations with TF32 disallowed
                    acc = tl.dot(a, lo.to(a.dtype), acc, out_dtype=acc.dtype, input_precision="ieee")
                    acc = tl.dot(a2, hi.to(a.dtype), acc, out_dtype=acc.dtype, input_precision="ieee")
                else:
                    acc = tl.dot(a, lo.to(a.dtype), acc, out_dtype=acc.dtype)
                    acc = tl.dot(a2, hi.to(a.dtype), acc, out_dtype=acc.dtype)
            if HAS_WZP:
                rs += tl.sum(a.to(rs.dtype), axis=1) + tl.sum(a2.to(rs.dtype), axis=1)
        else:
            if A_FP8:
                b = b.to(tl.float8e4nv, bitcast=True)
            if IEEE:
                acc = tl.dot(a, b, acc, out_dtype=acc.dtype, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, out_dtype=acc.dtype, max_num_imprecise_acc=FP8_ACC)
            if HAS_WZP:
                rs += tl.sum(a.to(rs.dtype), axis=1)

    if HAS_WZP:
        wz = tl.load(wzp_ptr + offs_n, mask=n_ok, other=0).to(acc.dtype)
        acc = acc - rs[:, None] * wz[None, :]
    if PAD_FIX:
        # padded taps of each output pixel read zeros above; the true input there is a_zp:
        # add a_zp * sum_c w[n, tap, c] (precomputed per tap: padc[n, tap]) for each such tap
        for t in tl.static_range(KH * KW):
            ih = ih0 + (t // KW) * dil_h
            iw = iw0 + (t % KW) * dil_w
            outside = (ih < 0) | (ih >= H) | (iw < 0) | (iw >= W)
            pc = tl.load(padc_ptr + offs_n * (KH * KW) + t, mask=n_ok, other=0)
            acc += tl.where(outside[:, None], pc[None, :], 0)
    dequant_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                  son, soh, sow, soc, san, sah, saw, sac, HAS_CORR, HAS_ASCALE, HAS_BIAS, HAS_ADD)


_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def pick_config(M: int, cout: int, ck: int, a_int8: bool, w4: bool, device: torch.device, a_bytes: int = 2) -> dict:
    """Block shapes by a fixed heuristic (no autotuning: a UNet has dozens of shapes and the
    device time to tune them is not there). Overridable through DIFFQUANT_QCONV_CONFIG=BM,BN,BK,W,S.

    ``a_bytes``: bytes per activation element. fp32 activations (W4A16 / W8A16 layers called with fp32
    inputs) get BLOCK_K 32: with 64 the pipelined tiles need 245,760 bytes of shared memory, more than
    an H200's 232,448 (measured 2026-11-28, benchmarks/kernel_quality.py)."""
    env = os.environ.get("DIFFQUANT_QCONV_CONFIG")
    if env:
        bm, bn, bk, nw, ns = (int(v) for v in env.split(","))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    one_byte = a_int8  # int8 / fp8 activations
    bn = 128 if cout > 64 else 64 if cout > 32 else 32
    bm = 128 if M > 64 else 64
    if bm == 128 and triton.cdiv(M, 128) * triton.cdiv(cout, bn) < _num_sms(device):
        bm = 64
    if one_byte and not w4:
        bk = 128 if ck >= 128 else 64 if ck >= 64 else 32
    else:
        bk = 64 if ck >= 64 else 32
    if not one_byte:
        bk = min(bk, 64 if a_bytes <= 2 else 32)
    nw = 8 if bm * bn >= 128 * 128 else 4
    ns = 4 if one_byte and not w4 else 3
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)


def _device_name(device: torch.device) -> str:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAMES:
        _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return _DEVICE_NAMES[idx]


_DEVICE_NAMES: dict = {}


# DIFFQUANT_QCONV_TMA values that force a TMA kernel
_FORCED_PATHS = {"1": "tma", "4d": "tma4d", "4dp": "tma4dp", "4dr": "tma4dr"}


def _config(x, key: str, M: int, cout: int, ck: int, w4: bool, ok_paths: frozenset) -> dict:
    """:func:`_table_config`, then ``DIFFQUANT_QCONV_SPLIT_K=S`` (an A/B switch, not for the tuner's forced configs):
    every ``tma`` / ``tma4d`` config without its own ``SPLIT_K`` splits in S where the layer has fewer output tiles
    than :data:`.tuning.SPLIT_K_BELOW_TILES`."""
    cfg = _table_config(x, key, M, cout, ck, w4, ok_paths)
    env = os.environ.get("DIFFQUANT_QCONV_SPLIT_K", "")
    if not env or tuning._RECORD["force"] is not None:
        return cfg
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"DIFFQUANT_QCONV_SPLIT_K={env!r}: a positive integer (ways to split a tile's K loop)")
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cout, cfg["BLOCK_N"])
    if cfg.get("path") in tuning.SPLIT_K_PATHS and "SPLIT_K" not in cfg and tiles < tuning.SPLIT_K_BELOW_TILES:
        return dict(cfg, SPLIT_K=int(env))
    return cfg


def _table_config(x, key: str, M: int, cout: int, ck: int, w4: bool, ok_paths: frozenset) -> dict:
    """The block config (and kernel path) of one call: forced (tuner) > ``DIFFQUANT_QCONV_TMA=1`` / ``4d`` / ``4dp``
    (that TMA kernel wherever it can run, with the table's config for it or its heuristic; ``4dr``: the table's
    ``tma4d`` entries run their tiles one dot per row, :func:`.triton_conv_tma.rows_split`) > tuned table of this GPU model
    (with ``DIFFQUANT_QCONV_BORROW=1``, the same layer's entry at the nearest batch size) > heuristic. ``DIFFQUANT_QCONV_TMA=0`` keeps every shape on the gather kernel. ``ok_paths``: the TMA kernels that
    can run this call."""
    forced = tuning._RECORD["force"]
    if forced is not None:
        return forced
    env = os.environ.get("DIFFQUANT_QCONV_TMA", "")
    cfg = tuning.lookup(key, _device_name(x.device)) if x.device.type == "cuda" else None
    if cfg is None and x.device.type == "cuda" and os.environ.get("DIFFQUANT_QCONV_BORROW") == "1":
        cfg = tuning.lookup_nearest(key, _device_name(x.device))  # the same layer tuned at another batch size
    want = _FORCED_PATHS.get(env)
    if want == "tma4dr":  # an A/B of the same tiles: the table's tma4d entries run one dot per row, the rest as tuned
        if cfg is not None and cfg.get("path") == "tma4d" and want in ok_paths:
            return dict(cfg, path=want)
    elif want is not None and want in ok_paths:
        if cfg is not None and cfg.get("path") == want:
            return cfg
        return dict(triton_conv_tma.pick_tma_config(M, cout, ck, persistent=want == "tma4dp"), path=want)
    if cfg is not None:
        path = cfg.get("path", "gather")
        if path == "gather" or (path in ok_paths and env != "0"):
            return cfg
    return pick_config(M, cout, ck, x.element_size() == 1, w4, x.device, a_bytes=x.element_size())


def precise_path(path: str, block_m: int, ho: int, wo: int, fp8: bool) -> str:
    """The kernel an FP8 call takes under ``DIFFQUANT_FP8_ACC=precise`` (:func:`._triton_common.fp8_acc`): the 4-D TMA
    kernels keep one-row tiles ([1, 1, BW, BK] boxes, read by the MMA from shared memory), but a tile of several
    rows or images is reshaped in registers, where Triton 3.6 cannot promote the accumulation (the compile fails);
    those calls take the one-dot-per-row kernel (``"tma4dr"``, one-row boxes) where the rows are 64 pixels or wider,
    else the padded 2-D TMA kernel, with the same block config (logged once per shape). Tune in the default mode: the
    tuner's 4-D candidates would be rerouted too."""
    if not (fp8 and path in ("tma4d", "tma4dp") and fp8_precise()):
        return path
    bi, bh, _ = triton_conv_tma.tile_4d(block_m, ho, wo)
    if bi * bh == 1:
        return path
    to = "tma4dr" if triton_conv_tma.rows_split(block_m, ho, wo) is not None else "tma"
    _log_reroute(path, block_m, ho, wo, to)
    return to


@functools.lru_cache(maxsize=None)
def _log_reroute(path: str, block_m: int, ho: int, wo: int, to: str) -> None:
    log.info("DIFFQUANT_FP8_ACC=precise: %dx%d output, %d-pixel tiles of several rows: %s -> %s", ho, wo, block_m,
             path, to)


def tma_paths(x, w, wzp, stride, padding, dilation, w4: bool, a_zp: int, pad_corr) -> frozenset:
    """The TMA kernels that can run this call: {"tma", "tma4d", "tma4dp", "tma4dr"}, a subset, or none ("tma4dr"
    where the output rows are 64 pixels or wider)."""
    if triton_conv_tma.tma_unsupported(x, w, wzp, stride, dilation, w4) is not None:
        return frozenset()
    ok = {"tma"}
    if triton_conv_tma.tma4d_extra_unsupported(x, a_zp, padding, pad_corr) is None:
        ok.update(("tma4d", "tma4dp"))
        from diffquant.kernels.reference import conv_out_hw

        if conv_out_hw(x.shape[2], x.shape[3], w.shape[1], w.shape[2], stride, padding, dilation)[1] >= 64:
            ok.add("tma4dr")
    return frozenset(ok)


def _run_path(cfg: dict, ho: int, wo: int, x: torch.Tensor) -> str:
    """The kernel a call with block config ``cfg`` runs (the precise-mode reroute included)."""
    return precise_path(cfg.get("path", "gather"), cfg["BLOCK_M"], ho, wo, x.dtype == torch.float8_e4m3fn)


def _qconv_with_stats(x, w, w_scale, a_scale, corr, wzp, bias, add, a_zp, stride, padding, dilation, w4, out_dtype,
                      pad_corr):
    """:func:`qconv_triton` with ``stats=True``."""
    from diffquant.kernels.reference import conv_out_hw

    nbatch, _, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    ho, wo = conv_out_hw(h, wd, kh, kw, stride, padding, dilation)
    ok_paths = tma_paths(x, w, wzp, stride, padding, dilation, w4, a_zp, pad_corr)
    if "tma4d" in ok_paths and ck == x.shape[1] and nbatch * ho * wo > 0:  # (else qconv_triton's own checks)
        key = tuning.shape_key(x.shape, x.dtype, w.shape, w4, stride, padding, dilation, out_dtype, add is not None)
        cfg = _config(x, key, nbatch * ho * wo, cout, ck, w4, ok_paths)
        path = _run_path(cfg, ho, wo, x)
        if triton_conv_tma.row_stats_in_epilogue(cfg, path, ho, wo) and tuning._RECORD["calls"] is None:
            mean = torch.empty((nbatch, ho, cout), dtype=torch.float32, device=x.device)
            m2 = torch.empty_like(mean)
            out = triton_conv_tma.qconv_tma4d(x, w, w_scale, a_scale, corr, bias, add, a_zp, padding, out_dtype,
                                              pad_corr=pad_corr, config=cfg, stats=(mean, m2))
            return out, mean, m2
    from diffquant.kernels.triton_norm import row_stats_triton

    out = qconv_triton(x, w, w_scale, a_scale, corr, wzp, bias, add, a_zp, stride, padding, dilation, w4, out_dtype,
                       pad_corr)
    return (out, *row_stats_triton(out))


def qconv_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    corr: Optional[torch.Tensor],
    wzp: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    add: Optional[torch.Tensor],
    a_zp: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    w4: bool,
    out_dtype: torch.dtype,
    pad_corr: Optional[torch.Tensor] = None,
    stats: bool = False,
):
    """``diffquant::qconv`` on the GPU (or under the interpreter); ``stats``: ``diffquant::qconv_stats``, the result
    is ``(out, mean, m2)`` with the output's per-row statistics, from the 4-D kernel's epilogue where the config
    allows (:func:`.triton_conv_tma.row_stats_in_epilogue`), else from a statistics pass over the output."""
    if stats:
        return _qconv_with_stats(x, w, w_scale, a_scale, corr, wzp, bias, add, a_zp, stride, padding, dilation, w4,
                                 out_dtype, pad_corr)
    from diffquant.kernels.reference import conv_out_hw, out_like

    nbatch, c, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    if (2 * ck if w4 else ck) != c:
        raise ValueError(f"input has {c} channels; the weight expects {2 * ck if w4 else ck}")
    if ck == 0 or kh * kw == 0:  # the kernels' K loops assume at least one step
        raise ValueError(f"qconv: a weight of shape {tuple(w.shape)} has no input channels or no taps")
    ho, wo = conv_out_hw(h, wd, kh, kw, stride, padding, dilation)
    out = out_like(x, cout, ho, wo, out_dtype)
    M = nbatch * ho * wo
    if M == 0:
        return out
    a_int = x.dtype == torch.int8
    # the TMA kernels (stride 1, 8-bit) run a shape where the tuned table (or DIFFQUANT_QCONV_TMA) says so
    ok_paths = tma_paths(x, w, wzp, stride, padding, dilation, w4, a_zp, pad_corr)
    key = tuning.shape_key(x.shape, x.dtype, w.shape, w4, stride, padding, dilation, out_dtype, add is not None)
    cfg = _config(x, key, M, cout, ck, w4, ok_paths)
    if tuning._RECORD["calls"] is not None:
        tuning._RECORD["calls"].append((key, (x, w, w_scale, a_scale, corr, wzp, bias, add, a_zp, list(stride),
                                              list(padding), list(dilation), w4, out_dtype), {"pad_corr": pad_corr}))
    path = _run_path(cfg, ho, wo, x)
    if path != "gather" and path not in ok_paths:
        raise ValueError(f"{key}: the forced {path} config cannot run this call "
                         f"({triton_conv_tma.tma4d_unsupported(x, w, wzp, stride, dilation, w4, a_zp, padding, pad_corr)})")
    if path == "tma":
        return triton_conv_tma.qconv_tma(x, w, w_scale, a_scale, corr, bias, add, a_zp, padding, out_dtype, config=cfg)
    if path in ("tma4d", "tma4dp", "tma4dr"):
        return triton_conv_tma.qconv_tma4d(x, w, w_scale, a_scale, corr, bias, add, a_zp, padding, out_dtype,
                                           pad_corr=pad_corr, config=cfg, persistent=path == "tma4dp",
                                           rows=path == "tma4dr")
    bk = cfg["BLOCK_K"]
    ncb = triton.cdiv(ck, bk)
    dummy = w_scale
    a_fp8 = x.dtype == torch.float8_e4m3fn
    if a_fp8:
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 activations need FP8 weights; got {w.dtype}")
        x, w = x.view(torch.uint8), w.view(torch.uint8)
    # the activation zero point matters only where a conv tap reads padding
    padded = a_int and a_zp != 0 and bool(padding[0] or padding[1])
    pad_fix = padded and pad_corr is not None and not w4 and wzp is None
    sa = add.stride() if add is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cout, cfg["BLOCK_N"]),)
    _qconv_kernel[grid](
        x, w, out,
        a_scale if a_scale is not None else dummy, w_scale,
        corr if corr is not None else dummy, wzp if wzp is not None else dummy,
        bias if bias is not None else dummy, add if add is not None else out,
        pad_corr if pad_fix else dummy,
        int(a_zp),
        M, h, wd, ho, wo, cout, ck, ncb, kh * kw * ncb,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        out.stride(0), out.stride(2), out.stride(3), out.stride(1),
        sa[0], sa[2], sa[3], sa[1],
        w.stride(0),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, A_INT=a_int, A_FP8=a_fp8, W4=w4, HAS_AZP=padded and not pad_fix, PAD_FIX=pad_fix, HAS_ASCALE=a_scale is not None,
        HAS_WZP=wzp is not None, HAS_CORR=corr is not None, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=8, EVEN_K=ck % bk == 0,
        FP8_ACC=fp8_acc(bk, a_fp8 and not w4),
        # fp32 operands: TF32 or IEEE as PyTorch's own conv would (torch.backends.cudnn.allow_tf32)
        IEEE=x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def sc_key(x_shape, w_shape, padding, out_dtype, sc_channels: Sequence[int]) -> str:
    """The tuned-table key of a ``diffquant::qconv_sc`` call: conv2's key with its residual, then ``:sc`` and the
    shortcut sources' channels (``fp8:8x320x64x64:o320:k3x3:s1x1:p1x1:d1x1:bfloat16:add:sc640+320``)."""
    base = tuning.shape_key(x_shape, torch.float8_e4m3fn, w_shape, False, (1, 1), padding, (1, 1), out_dtype, True)
    return f"{base}:sc{'+'.join(str(int(c)) for c in sc_channels)}"


def _sc_entry(x: torch.Tensor, w: torch.Tensor, padding, out_dtype, sc_x) -> tuple[Optional[dict], str]:
    """The table entry a ``diffquant::qconv_sc`` call goes by, and where it came from: ``"forced"`` (the tuner's
    forced config), ``"own"`` (the call's :func:`sc_key` entry: ``"path": "tma4d"`` tiles, or ``"path":
    "composed"``), ``"conv"`` (the ``tma4d`` entry of conv2 with a residual, the call it replaces, or of the same conv
    without one, a split conv's first part), or ``(None, "heuristic")``."""
    if tuning._RECORD["force"] is not None:
        return tuning._RECORD["force"], "forced"
    if x.device.type != "cuda":
        return None, "heuristic"
    own = tuning.lookup(sc_key(x.shape, w.shape, padding, out_dtype, [t.shape[1] for t in sc_x]),
                        _device_name(x.device))
    return (own, "own") if own is not None else _sc_conv_entry(x, w, padding, out_dtype)


def sc_plan(x: torch.Tensor, w: torch.Tensor, padding, out_dtype, sc_x,
            route: bool = True) -> tuple[dict, Optional[str]]:
    """How a ``diffquant::qconv_sc`` call runs, from one table lookup: ``(tiles, why)``. ``tiles``: the kernel's block
    config (its own ``tma4d`` entry, :func:`sc_key`; else the ``tma4d`` entry of conv2 with a residual, the call it
    replaces, or of the same conv without one, a split conv's first part; else the 4-D heuristic; the tile sizes,
    warps, stages and wide tiles, ``BLOCK_N2``, as the kernel has no split-K). ``why``: None where the kernel runs
    the call, else why the composed ``diffquant::qconv`` calls do. A forced config (the tuner) or the call's own
    ``tma4d`` entry: the kernel. Its own ``"path": "composed"`` entry: the composed calls (the tuner timed them
    faster). Otherwise, on a GPU, the composed calls where the entry it borrows from conv2 splits K (tuned so for too
    few tiles) or where the kernel's grid would not fill one wave (:func:`_sc_grid_reason`): the composed calls keep
    their own tuned configs, split-K included. SD-1.5 at batch 1, whose every such call is of that kind, ran 5.69 ms
    with the kernel against 5.22 without (H200, 2026-11-29, BENCHMARKS.md "Kernels, fourteenth measurement").
    ``route=False``: the tiles only (``why`` None)."""
    cout, kh, kw, ck = w.shape
    cfg, source = _sc_entry(x, w, padding, out_dtype, sc_x)
    why = None
    if source == "own" and cfg.get("path") == "composed":
        why = "its tuned entry: the composed qconv calls are faster"
        cfg, source = _sc_conv_entry(x, w, padding, out_dtype)
    if cfg is None:
        cfg = triton_conv_tma.pick_tma_config(x.shape[0] * x.shape[2] * x.shape[3], cout,
                                              ck * kh * kw + sum(t.shape[1] for t in sc_x))
    tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "BLOCK_N2") if k in cfg}
    if not route:
        return tiles, None
    if why is None and source in ("conv", "heuristic") and x.device.type == "cuda":
        if cfg.get("SPLIT_K", 1) > 1:
            why = f"the conv it replaces is tuned to split K in {cfg['SPLIT_K']}"
        else:
            why = _sc_grid_reason(x, w, tiles)
    return tiles, why


def sc_config(x: torch.Tensor, w: torch.Tensor, padding, out_dtype, sc_x) -> dict:
    """The block config of a ``diffquant::qconv_sc`` call's kernel (:func:`sc_plan`)."""
    return sc_plan(x, w, padding, out_dtype, sc_x, route=False)[0]


def sc_composed_reason(x: torch.Tensor, w: torch.Tensor, padding, out_dtype, sc_x) -> Optional[str]:
    """Why a ``diffquant::qconv_sc`` call that the kernel could run takes the composed ``diffquant::qconv`` calls
    instead, or None (:func:`sc_plan`)."""
    return sc_plan(x, w, padding, out_dtype, sc_x)[1]


def _sc_conv_entry(x, w, padding, out_dtype) -> tuple[Optional[dict], str]:
    name = _device_name(x.device)
    for add in (True, False):
        base = tuning.lookup(tuning.shape_key(x.shape, x.dtype, w.shape, False, (1, 1), padding, (1, 1), out_dtype,
                                              add), name)
        if base is not None and base.get("path") == "tma4d":
            return base, "conv"
    return None, "heuristic"


def _sc_grid_reason(x: torch.Tensor, w: torch.Tensor, tiles: dict) -> Optional[str]:
    """Fewer output tiles than the GPU has SMs (the kernel's grid would not fill one wave), or None."""
    bi, bh, bw = triton_conv_tma.tile_4d(tiles["BLOCK_M"], x.shape[2], x.shape[3])
    n = (triton.cdiv(x.shape[0], bi) * triton.cdiv(x.shape[2], bh) * triton.cdiv(x.shape[3], bw)
         * triton.cdiv(w.shape[0], tiles["BLOCK_N"] + tiles.get("BLOCK_N2", 0)))
    sms = _num_sms(x.device)
    return f"{n} output tiles for {sms} SMs" if n < sms else None


def _in_place_or_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the 4-D TMA kernels read it: in place where they can (channels-last, channel slices included, with
    16-byte aligned strides and start), else a channels-last copy."""
    if triton_conv_tma.tma4d_extra_unsupported(t, 0, (0, 0), None) is None:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def qconv_sc_triton(x, w, w_scale, a_scale, bias, sc_x, sc_w, sc_w_scale, sc_a_scale, sc_bias, padding, out_dtype):
    """``diffquant::qconv_sc`` on the GPU (or under the interpreter): the shortcut kernel
    (:func:`.triton_conv_tma.qconv_tma4d_sc`) where :func:`.triton_conv_tma.qconv_sc_unsupported` allows and
    :func:`sc_plan` does not object, else the composed ``diffquant::qconv`` calls
    (:func:`.ops.qconv_sc_composed`). The inputs are read in place (an up block's conv1 fed a channel slice of its
    quantized ``(h, skip)`` included); only those whose strides TMA cannot read are copied. Under
    ``DIFFQUANT_FP8_ACC=precise``, tiles of several rows cannot promote their accumulation (see
    :func:`precise_path`): composed calls then."""
    from diffquant.kernels.ops import qconv_sc_composed

    args = (x, w, w_scale, a_scale, bias, sc_x, sc_w, sc_w_scale, sc_a_scale, sc_bias, padding, out_dtype)
    x = _in_place_or_copy(x)
    sc_x = [_in_place_or_copy(t) for t in sc_x]
    why = triton_conv_tma.qconv_sc_unsupported(x, w, padding, sc_x, sc_w)
    if why is None and tuning._RECORD["sc_calls"] is not None:  # (the shortcut tuner's input: calls it can run)
        tuning._RECORD["sc_calls"].append((sc_key(x.shape, w.shape, padding, out_dtype, [t.shape[1] for t in sc_x]),
                                           args))
    cfg = None
    if why is None:
        cfg, why = sc_plan(x, w, padding, out_dtype, sc_x)
    if why is None and fp8_precise():
        bi, bh, _ = triton_conv_tma.tile_4d(cfg["BLOCK_M"], x.shape[2], x.shape[3])
        why = "DIFFQUANT_FP8_ACC=precise with multi-row tiles" if bi * bh > 1 else None
    if why is not None:
        _log_sc_composed(why)
        return qconv_sc_composed(*args)
    return triton_conv_tma.qconv_tma4d_sc(x, w, w_scale, a_scale, bias, sc_x, sc_w, sc_w_scale, sc_a_scale, sc_bias,
                                          padding, out_dtype, cfg)


@functools.lru_cache(maxsize=None)
def _log_sc_composed(why: str) -> None:
    log.info("diffquant::qconv_sc runs as separate qconv calls: %s", why)
