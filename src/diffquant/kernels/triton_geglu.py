"""Triton FP8 GEMM with diffusers' GEGLU and the next layer's input quantization in its epilogue
(``diffquant::linear_geglu``).

Why: in a transformer block's feed-forward, ``GEGLU.proj`` writes a [tokens, 2I] bf16 projection that a separate
kernel reads back to compute ``h * gelu(g)`` and quantize it for ``ff.net[2]``. At the SD-1.5 UNet's widths these
GEMMs are bandwidth-bound: at 64x64 latents and batch 8 (32,768 tokens, 320 -> 2 x 1,280), the projection is 168 MB
of bf16 written and read again for 54 GFLOP. In the H200 profile of the SD-1.5 b8 FP8 rows, the GEGLU-and-quantize
kernels alone took 0.85 ms (BENCHMARKS.md, "Kernels, seventh measurement"). Here each program computes one tile of
``h`` and the matching tile of ``g`` (two accumulators over the same A tiles, B tiles from rows ``n`` and ``I + n``
of the weight) and writes only the e4m3 result: [tokens, I] bytes.

Loads are TMA (tensor descriptors, the K stride must be a multiple of 16 bytes); the epilogue dequantizes with the
activation scale and per-row weight scales, adds the bias, takes the exact (erf) GELU of the gate in fp32 (erf
from a polynomial, GELU within 4.2e-7, for e4m3 and 16-bit outputs: :func:`_gelu`), rounds once to e4m3, and
leaves by one TMA store a tile. The result is :func:`.reference.linear_geglu_reference` up to accumulation order. Importing this
module needs Triton; it runs under the CPU interpreter (``TRITON_INTERPRET=1``), which is how its tests check it.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from diffquant.kernels._triton_common import (TensorDescriptor, fast_ex2, fast_rsqrt, fp8_acc, grouped_tile,
                                              grouped_tile_of, interpreting, nonempty)
from diffquant.kernels.triton_attention import _e4m3


@triton.jit
def _gelu(g, POLY: tl.constexpr, EMULATE: tl.constexpr):
    """Exact (erf) GELU of ``g`` in fp32. ``POLY``: erf by Abramowitz & Stegun 7.1.26 (a degree-5 polynomial in
    t = 1 / (1 + p|x|) times exp(-x²); t from one approximate reciprocal square root, squared; both special
    functions one MUFU instruction each, flushing subnormals: :func:`.fast_rsqrt`, :func:`.fast_ex2`), for outputs
    in e4m3 or 16 bits: in fp32 on [-12, 12] the GELU is within 4.2e-7 (absolute) of float64's, against 8e-8 for a
    correctly rounded fp32 erf (numpy, 2026-11-29), far below an e4m3 or bf16 output step. Else libdevice's erff:
    about 32 of the epilogue's 50 instructions per output element on sm_90 (predicated moves of two coefficient
    sets, on the ALU pipe, which Nsight Compute showed the busiest in the 64x64-level GEGLU kernel: 47 %, H200,
    2026-11-29); the polynomial takes the kernel from 3,240 to 2,208 SASS instructions (128 x 64 config,
    ``benchmarks/sass_counts.py``)."""
    if POLY:  # Phi(g) = 1 - erfc(|g| / sqrt 2) / 2 for g >= 0, erfc(|g| / sqrt 2) / 2 below; constants folded
        t = fast_rsqrt(1.0 + 0.23164189985974283 * tl.abs(g), EMULATE)  # p / sqrt 2
        t = t * t
        half_erfc = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
        half_erfc = half_erfc * fast_ex2(g * -0.7213475204444817 * g, EMULATE)  # exp(-g² / 2)
        phi = tl.where(g < 0, half_erfc, 1.0 - half_erfc)
    else:
        phi = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    return g * phi


@triton.jit
def _geglu_tile(pid_m, pid_n, a_desc, w_desc, out_ptr, out_desc, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M, I,
                K, som, soi, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, OSCALE_PER_CH: tl.constexpr,
                BITCAST_FP8: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, FP8_ACC: tl.constexpr, TMA_OUT: tl.constexpr, POLY: tl.constexpr):
    """One output tile: the h and g accumulators over K, then the epilogue. ``TMA_OUT``: the tile leaves through
    ``out_desc`` (one TMA store, rows and columns outside [M, I] clipped by the descriptor) instead of one masked
    store per element with 64-bit addresses (sm_90 SASS of the 128 x 64 config: 64 byte stores and about 14 integer
    instructions per output element a thread, of about 50 in the epilogue)."""
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nonempty(K > 0)  # the host refuses K = 0
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([m0, k])
        bh = w_desc.load([n0, k])
        bg = w_desc.load([I + n0, k])
        if BITCAST_FP8:  # the interpreter has no FP8 descriptors: FP8 travels as its bytes
            a = a.to(tl.float8e4nv, bitcast=True)
            bh = bh.to(tl.float8e4nv, bitcast=True)
            bg = bg.to(tl.float8e4nv, bitcast=True)
        acc_h = tl.dot(a, bh.T, acc_h, max_num_imprecise_acc=FP8_ACC)
        acc_g = tl.dot(a, bg.T, acc_g, max_num_imprecise_acc=FP8_ACC)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I  # the h tile's rows past I are g rows of the weight: computed, never stored
    s_a = tl.load(ascale_ptr)
    h = acc_h * (s_a * tl.load(wscale_ptr + offs_n, mask=n_ok, other=0.0))[None, :]
    g = acc_g * (s_a * tl.load(wscale_ptr + I + offs_n, mask=n_ok, other=0.0))[None, :]
    if HAS_BIAS:
        h += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        g += tl.load(bias_ptr + I + offs_n, mask=n_ok, other=0.0)[None, :]
    y = h * _gelu(g, POLY, EMULATE)
    if QUANT:
        if OSCALE_PER_CH:
            so = tl.load(oscale_ptr + offs_n, mask=n_ok, other=1.0)[None, :]
        else:
            so = tl.load(oscale_ptr)
        st = _e4m3(tl.clamp(y / so, -448.0, 448.0), EMULATE).to(tl.uint8, bitcast=True)
    else:
        st = y.to(out_ptr.dtype.element_ty)
    if TMA_OUT:
        out_desc.store([m0, n0], st)
    else:
        mask = (offs_m < M)[:, None] & n_ok[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * soi, st, mask=mask)


@triton.jit
def _linear_geglu_kernel(a_desc, w_desc, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M, I, K,
                         som, soi, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, OSCALE_PER_CH: tl.constexpr,
                         BITCAST_FP8: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         FP8_ACC: tl.constexpr = None, out_desc=None, TMA_OUT: tl.constexpr = False,
                         POLY: tl.constexpr = False):
    pid_m, pid_n = grouped_tile(M, I, BLOCK_M, BLOCK_N, GROUP_M)
    _geglu_tile(pid_m, pid_n, a_desc, w_desc, out_ptr, out_desc, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M, I,
                K, som, soi, HAS_BIAS, QUANT, OSCALE_PER_CH, BITCAST_FP8, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC,
                TMA_OUT, POLY)


@triton.jit
def _linear_geglu_persistent_kernel(a_desc, w_desc, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M, I, K,
                                    som, soi, NUM_PROGS, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr,
                                    OSCALE_PER_CH: tl.constexpr, BITCAST_FP8: tl.constexpr, EMULATE: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, FP8_ACC: tl.constexpr = None,
                                    out_desc=None, TMA_OUT: tl.constexpr = False, POLY: tl.constexpr = False):
    """One program per SM walking the tiles; the tile loop is flattened into the K loop, so the next tile's first
    loads are issued during this tile's epilogue. For short K (SD-1.5's 64x64 level: K = 320, three K steps), where
    the non-persistent kernel waits for its loads and then for its epilogue on every tile."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(I, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile_of(tile, M, I, BLOCK_M, BLOCK_N, GROUP_M)
        _geglu_tile(pid_m, pid_n, a_desc, w_desc, out_ptr, out_desc, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M,
                    I, K, som, soi, HAS_BIAS, QUANT, OSCALE_PER_CH, BITCAST_FP8, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K,
                    FP8_ACC, TMA_OUT, POLY)


def pick_geglu_config(m: int, i: int, k: int) -> dict:
    """Block shape: 128 x 64 output tiles of h (and of g), 128-deep K steps, 4 warps, 2 stages. Measured with
    ``benchmarks/bench_geglu.py`` on an H200 (2026-11-29, BENCHMARKS.md "Kernels, twelfth measurement"), it beat the
    earlier 64 x 128 (same warps and stages) on all four SD-1.5 b8 shapes: 0.148 against 0.166 ms at 64x64 (K = 320),
    0.093 / 0.102 at 32x32, 0.069 / 0.073 at 16x16, 0.028 / 0.030 at 8x8; inside the SD-1.5 b8 UNet the GEGLU kernels
    took 1.89 against 2.01 ms a call (``DIFFQUANT_GEGLU_CONFIG='{"BLOCK_M": 128, "BLOCK_N": 64}'`` A/B, same call).
    A tile of 128 tokens reads each weight row half as often per output as 64 tokens do. (Session 11: 64 x 128 had
    beaten 128 x 128 / 8 warps / 3 stages, 0.163 against 0.190 ms at 64x64.) The persistent kernel
    (``config={"persistent": True}``) won that op benchmark at K = 320 but took 0.217 ms a call inside the SD-1.5
    UNet (profile of session 11), so it is no default."""
    bk = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    bn = 64 if i >= 64 else max(16, triton.next_power_of_2(i))
    return {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 2}


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "persistent", "tma_out", "gelu"}
GELU_MODES = ("poly", "erf")


@functools.lru_cache(maxsize=8)
def _env_config(text: str) -> Optional[dict]:
    """``DIFFQUANT_GEGLU_CONFIG``: a JSON block config for every GEGLU call, to A/B configs inside a model (the op
    benchmark and the model disagreed on the persistent kernel, BENCHMARKS.md "Kernels, ninth measurement"). Keys
    missing from it keep :func:`pick_geglu_config`'s values."""
    if not text:
        return None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"DIFFQUANT_GEGLU_CONFIG is not JSON ({e}): {text!r}") from None
    if not isinstance(cfg, dict) or set(cfg) - _CONFIG_KEYS:
        raise ValueError(f"DIFFQUANT_GEGLU_CONFIG: an object with keys among {sorted(_CONFIG_KEYS)}; got {text!r}")
    return cfg


def geglu_config(m: int, i: int, k: int) -> dict:
    """The block config a call without an explicit one runs: :func:`pick_geglu_config`'s, with
    ``DIFFQUANT_GEGLU_CONFIG`` over it."""
    cfg = pick_geglu_config(m, i, k)
    over = _env_config(os.environ.get("DIFFQUANT_GEGLU_CONFIG", ""))
    return dict(cfg, **over) if over else cfg


def new_out(m: int, i: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The output buffer (a function of its own, so that the tests can poison it)."""
    return torch.empty((m, i), dtype=dtype, device=device)


def linear_geglu_triton(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                        bias: Optional[torch.Tensor], out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                        config: Optional[dict] = None) -> torch.Tensor:
    """``diffquant::linear_geglu`` on the GPU (or the interpreter); arguments as there. ``config``: a block config
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; ``persistent``: True for the persistent kernel; ``tma_out``:
    False for per-element stores instead of one TMA store a tile; ``gelu``: "erf" for libdevice's erff, "poly" for the
    polynomial of :func:`_gelu`, the default for e4m3 and 16-bit outputs) over :func:`geglu_config`'s. The output leaves
    by TMA where its rows are a multiple of 16 bytes (``tma_out`` unset or True), else by masked stores."""
    if TensorDescriptor is None:
        raise RuntimeError("linear_geglu's kernel needs a Triton with tensor descriptors (triton.tools.tensor_descriptor)")
    m, k = xq.shape
    i = w.shape[0] // 2
    if k % 16 or k == 0:
        raise ValueError(f"linear_geglu's kernel needs the input width to be a positive multiple of 16 (TMA rows); "
                         f"got {k}")
    out = new_out(m, i, out_dtype, xq.device)
    if m == 0 or i == 0:
        return out
    quant = out_dtype == torch.float8_e4m3fn
    bitcast = interpreting()
    xv = xq.contiguous()
    wv = w.contiguous()
    if bitcast:
        xv, wv = xv.view(torch.uint8), wv.view(torch.uint8)
    cfg = dict(geglu_config(m, i, k), **(config or {}))  # keys a config leaves out: the default's
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(xv, [m, k], [k, 1], [bm, bk])
    w_desc = TensorDescriptor(wv, [2 * i, k], [k, 1], [bn, bk])
    ws = w_scale.float().reshape(-1).contiguous()
    sa = a_scale.float().reshape(1).contiguous()
    b = bias.float().reshape(-1).contiguous() if bias is not None else ws
    so = out_scale.float().reshape(-1).contiguous() if quant else ws
    out_arg = out.view(torch.uint8) if quant else out
    tiles = triton.cdiv(m, bm) * triton.cdiv(i, bn)
    args = (a_desc, w_desc, out_arg, sa, ws, b, so, m, i, k, out.stride(0), out.stride(1))
    tma_out = bool(cfg.get("tma_out", True)) and (i * out.element_size()) % 16 == 0
    gelu = cfg.get("gelu", "poly" if out.element_size() <= 2 else "erf")
    if gelu not in GELU_MODES:
        raise ValueError(f"linear_geglu: gelu must be one of {GELU_MODES}; got {gelu!r}")
    flags = dict(HAS_BIAS=bias is not None, QUANT=quant, OSCALE_PER_CH=quant and so.numel() > 1, BITCAST_FP8=bitcast,
                 EMULATE=bitcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FP8_ACC=fp8_acc(bk),
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], TMA_OUT=tma_out, POLY=gelu == "poly",
                 out_desc=TensorDescriptor(out_arg, [m, i], [i, 1], [bm, bn]) if tma_out else None)
    if cfg.get("persistent"):
        from diffquant.kernels.triton_conv_tma import persistent_programs

        progs = max(1, min(tiles, persistent_programs(xq.device)))
        _linear_geglu_persistent_kernel[(progs,)](*args, progs, **flags, FLATTEN=not bitcast)
    else:
        _linear_geglu_kernel[(tiles,)](*args, **flags)
    return out
