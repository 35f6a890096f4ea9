"""Triton pieces shared by the two conv kernels (:mod:`.triton_conv`, :mod:`.triton_conv_tma`)."""
from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the TMA kernels are unavailable
    TensorDescriptor = None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``): FP8 then travels as its bytes and
    e4m3 rounding is emulated."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kloop_hint() -> bool:
    v = os.environ.get("DIFFQUANT_KLOOP_HINT", "1")
    if v not in ("0", "1"):
        raise ValueError(f"DIFFQUANT_KLOOP_HINT={v!r}: 0 or 1")
    return v == "1"


# Whether the K loops tell the compiler that they are never empty (:func:`nonempty`); read once at import.
# DIFFQUANT_KLOOP_HINT=0 is for A/B timing only (session 21 found the hint's effect by compiling, not timing it).
KLOOP_HINT = tl.constexpr(_kloop_hint())


@triton.jit
def nonempty(cond):
    """``tl.assume(cond)`` for a K loop's trip-count condition (the loop is never empty: the hosts launch no empty
    K range). Without it LLVM lays out a zero-trip path that sets the accumulators after the loop, and ptxas sees
    non-wgmma instructions defining accumulator registers inside the wgmma pipeline stage (its warning C7515) and
    waits for every wgmma at once. That hit the conv kernels without a residual add: 8 of the 28 SD-1.5 b8 conv
    entries of the H200 table (``benchmarks/ptxas_report.py --table-census``); in the model's Nsight Compute probe a
    32x32 conv1 kept the tensor pipe 56 % busy against 75 % for its conv2, the same kernel and config with the add
    (H200, 2026-11-29, ``benchmarks/results/ncu_model_probe_sd8_ln_pipe.txt``, launches 8 and 9). Not for chained
    loops that rescale the accumulators in between (the shortcut kernels): there the hint made ptxas serialize every
    wgmma."""
    if KLOOP_HINT:
        tl.assume(cond)


FP8_ACC_MODES = ("fast", "precise")


def fp8_precise() -> bool:
    """``DIFFQUANT_FP8_ACC=precise`` (default ``fast``): see :func:`fp8_acc`."""
    mode = os.environ.get("DIFFQUANT_FP8_ACC", "fast")
    if mode not in FP8_ACC_MODES:
        raise ValueError(f"DIFFQUANT_FP8_ACC={mode!r}; allowed: {', '.join(FP8_ACC_MODES)}")
    return mode == "precise"


def fp8_acc(k: int, fp8: bool = True):
    """``max_num_imprecise_acc`` for a Triton FP8 dot over ``k`` products. None, Triton's default on sm_90, lets the
    tensor cores accumulate the FP8 products in their own reduced precision across the whole K loop (``2**30``
    products before a promotion; 1-3 % of the GEGLU kernel's e4m3 codes then differ from a float reference's, H200,
    2026-11-28). With ``DIFFQUANT_FP8_ACC=precise`` every 64 products (32 in a dot of 64) go to a partial
    accumulator that is added to the fp32 one in full precision, the way cuBLAS's FP8 GEMMs (``_scaled_mm`` without
    ``use_fast_accum``) and DeepSeek-V3's promotion work. Triton 3.6 promotes only when the value is below the dot's
    K (equal to it compiles to the same code as None) and at least 32, so a dot of 32 products stays unpromoted.
    None also for non-FP8 operands (int8 accumulates exactly)."""
    if not (fp8 and fp8_precise()):
        return None
    k = int(k)
    return 64 if k > 64 else 32 if k > 32 else None


@triton.jit
def _mufu(x, ASM: tl.constexpr):
    """One special-function (MUFU) instruction an element: the PTX ``ASM``, fp32 in and out."""
    return tl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def fast_ex2(x, EMULATE: tl.constexpr):
    """2**x in fp32 by one ``ex2.approx.ftz.f32`` (one MUFU.EX2, relative error under 2**-22; subnormal results
    flushed to 0). ``tl.exp2`` adds a range check and two multiplies to keep subnormal results, about three
    instructions an element in an epilogue that is issue-bound. ``EMULATE`` (Triton's CPU interpreter, which runs
    no inline PTX): ``tl.exp2``."""
    return tl.exp2(x) if EMULATE else _mufu(x, "ex2.approx.ftz.f32 $0, $1;")


@triton.jit
def fast_rcp(x, EMULATE: tl.constexpr):
    """1 / x in fp32 by one ``rcp.approx.ftz.f32`` (one MUFU.RCP, within 1 ulp; 1 / inf = 0), for the same reason
    as :func:`fast_ex2` (a division is a reciprocal plus range fix-ups). ``EMULATE``: a division."""
    return 1.0 / x if EMULATE else _mufu(x, "rcp.approx.ftz.f32 $0, $1;")


@triton.jit
def fast_rsqrt(x, EMULATE: tl.constexpr):
    """1 / sqrt(x) in fp32 by one ``rsqrt.approx.ftz.f32`` (one MUFU.RSQ, relative error under 2**-22).
    ``EMULATE``: ``tl.math.rsqrt``."""
    return tl.math.rsqrt(x) if EMULATE else _mufu(x, "rsqrt.approx.ftz.f32 $0, $1;")


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (pid_m, pid_n), GROUP_M row tiles at a time (L2 reuse of the B tiles)."""
    return grouped_tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def grouped_tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``pid``'s (pid_m, pid_n) in the grouped order of :func:`grouped_tile` (persistent kernels walk tiles)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_INT: tl.constexpr):
    """The accumulator tile: int32 for integer operands, fp32 otherwise."""
    if A_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def tap_block(it, NCB, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``it`` of the flat (tap, channel block) loop: (tap, first channel, kernel row, kernel column)."""
    tap = it // NCB
    c0 = (it - tap * NCB) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    return tap, c0, kh, kw


@triton.jit
def dequant_store(acc, offs_n, n_ok, m_ok, nb, oh, ow, out_ptr, ascale_ptr, wscale_ptr, corr_ptr, bias_ptr, add_ptr,
                  son, soh, sow, soc, san, sah, saw, sac,
                  HAS_CORR: tl.constexpr, HAS_ASCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                  bias2_ptr=None, HAS_BIAS2: tl.constexpr = False):
    """The epilogue: + per-channel integer correction, x (activation scale x weight scale), + bias (+ a second
    bias: a fused shortcut's), + residual, stored at (image nb, row oh, column ow, channel) through the output
    strides, where m_ok & n_ok. Returns the tile as stored (in the output dtype; unused by most callers, and then
    not computed)."""
    if HAS_CORR:
        corr = tl.load(corr_ptr + offs_n, mask=n_ok, other=0).to(acc.dtype)
        acc = acc + corr[None, :]
    ws = tl.load(wscale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_ASCALE:
        ws = ws * tl.load(ascale_ptr)
    out = acc.to(tl.float32) * ws[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS2:
        out += tl.load(bias2_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    nb64 = nb.to(tl.int64)
    if HAS_ADD:
        add_off = nb64 * san + oh * sah + ow * saw
        out += tl.load(add_ptr + add_off[:, None] + offs_n[None, :] * sac, mask=mask, other=0.0).to(tl.float32)
    o_off = nb64 * son + oh * soh + ow * sow
    stored = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_off[:, None] + offs_n[None, :] * soc, stored, mask=mask)
    return stored
