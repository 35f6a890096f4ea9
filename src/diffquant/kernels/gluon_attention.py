"""bf16 / fp16 flash attention for Hopper in Gluon (Triton's lower-level dialect): the kernel behind
``diffquant::flash_attention`` on sm_90 (no mask, not causal; ``convert(..., attention="flash")``). Experimental:
it is correct (outputs within cuDNN's error of fp32 attention, GPU tests passed) but slower than cuDNN's bf16 SDPA,
which the default ``attention="float"`` runs. Measured on SD-1.5 b8's shapes (H200, 2026-11-29, BENCHMARKS.md
"Kernels, seventeenth measurement", ``bash scripts/gpu/flash_attention.sh``): 64x64 self-attention 0.627 against
0.584 ms (0.93x), 32x32 0.72-0.86x, cross-attention on 77 keys 0.6-0.7x; in the model (-fa) SD b8 13.81 against
13.35 ms. Nsight Compute on the 64x64 shape: the SFU and the tensor cores each about 47 % busy, as if one waited for
the other (cuDNN: 53 % and 51 %). Tried and dropped (slower or no faster): handing the consumers turns at the wgmmas
or at the exponentials, tree-shaped row reductions, 64-key blocks, Q read from shared memory, e4m3 Q and K (an
illegal instruction; not debugged). A third consumer warp group (``CONSUMERS=3``, 64-key blocks) gained 2 % at the
64x64 level, within the runs' spread. Session 20 (BENCHMARKS.md "Kernels, eighteenth measurement"): a head read in
two column boxes (``SPLIT``) took the 32x32 self-attention (head width 80) from 85.8 to 66.7 us (cuDNN 61.2) but
the 64x64 one (width 40) from 629 to 695 us with two consumers (606 with three and 64-key blocks; cuDNN 583): less
tensor-core work does not make the 64x64 level faster, so it is bound by how softmax and wgmmas overlap.

Why a kernel of our own: at SD-1.5's head widths (40, 80, 160) attention is bounded by the softmax's exponentials,
not by its matmuls (BENCHMARKS.md, "What bounds SD-1.5 b8"), and cuDNN's bf16 kernel, the fastest SDPA backend
here, runs the 64x64 self-attention at 2.2x the exponential bound (609 against 275 us a call, H200, 2026-11-28).
The exponentials (the SFU) and the matmuls (the tensor cores) are different units; this kernel keeps both busy at
once, as FlashAttention-3 does:

- warp specialization (``gl.warp_specialize``): a producer warp TMA-loads Q once and the K / V blocks into a ring
  of STAGES buffers (``k_ready`` / ``v_ready`` / ``empty`` mbarriers; both consumers read every block, so
  ``empty`` counts two arrivals);
- two consumer warp groups, 64 query rows each, run independently, so one's softmax overlaps the other's wgmmas;
- within a consumer, the wgmma of block j's scores is issued before the P.V wgmma of block j-1, and the softmax of
  block j runs while that P.V is on the tensor cores (one wgmma group left in flight).

Layout: Q, K, V are read as 2-D [tokens, columns] views of the projections' outputs (a head is a column range, so
a stacked QKV projection's output is read in place), in one box of a power-of-two width DP >= D, or in two
(``SPLIT``, :func:`head_boxes`: 80 = 64 + 16 columns instead of 128; two wgmmas for the scores and two accumulators
for P.V) (the neighbouring head's columns, or TMA's zero fill past the last head, fill the rest). Q's extra columns
are zeroed in registers (the scores are exact); the output's extra columns are not stored. Keys past the end of a sequence (a partial last
block, as the 77-token text context) are masked to -inf; queries past it are computed and not stored.
"""
from __future__ import annotations

from typing import Optional

import torch

from diffquant.kernels.ops import flash_token_major  # the layout check the op applies before calling

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as e:  # Triton without Gluon, or no Triton (the CPU install): the op takes its reference
    _MISSING: Optional[str] = f"Gluon is not importable ({e})"
else:
    _MISSING = None

LOG2E = 1.4426950408889634
# Head widths up to 128 (a box of 256 columns would not fit shared memory; SD-1.5's 160-wide heads, at 256 tokens,
# take 18 us a call in cuDNN)
MAX_HEAD_DIM = 128
DEFAULTS = {"BLOCK_N": 128, "STAGES": None, "CONSUMERS": 2, "CONSUMER_REGS": None, "PRODUCER_REGS": 40, "SPLIT": None}
RING_BYTES = 200 * 1024  # Q's two tiles and the K / V ring (the rest of the 227 KB: barriers, layout scratch)


def unavailable(device: torch.device) -> Optional[str]:
    """None when the kernel can run on ``device``, else why it cannot."""
    if _MISSING is not None:
        return _MISSING
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device, got {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs Hopper (sm_90: wgmma, TMA), got sm_{major}{minor}"
    return None


def padded_head_dim(d: int) -> int:
    """The box width the kernel reads a head in: the next power of two, at least 16."""
    return max(16, 1 << (int(d) - 1).bit_length())


def head_boxes(d: int, split: bool = True) -> tuple[int, int, int, int]:
    """``(DQA, DQB, DVA, DVB)``: the column boxes a head of width ``d`` is read in, for the scores (Q, K: the
    wgmma's K dimension) and for P.V (V and the output: its N dimension). One power-of-two box (``padded_head_dim``,
    DQB = DVB = 0), or with ``split`` two, the largest power of two below ``d`` and the next one of at least 16 above
    the rest, where that reads fewer columns: 40 = 32 + 16 (48 of 64 columns: 3/4 of the score wgmmas, 3/4 of the
    P.V ones), 80 = 64 + 16 (80 of 128)."""
    dp = padded_head_dim(d)
    if split and d > 16 and dp != d:
        a = 1 << (int(d).bit_length() - 1)
        b = max(16, 1 << (int(d) - a - 1).bit_length())
        if a + b < dp:
            return a, b, a, b
    return dp, 0, dp, 0


if _MISSING is None:
    @gluon.jit
    def _ex2(x):
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _fa_producer(q_desc, q2_desc, k_desc, k2_desc, v_desc, v2_desc, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs,
                     v2_bufs, q_ready, k_ready, v_ready, empty, Sq, Sk, H, D: gl.constexpr, DQA: gl.constexpr,
                     DQB: gl.constexpr, DVA: gl.constexpr, DVB: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """TMA loads: each consumer's Q tile once, then the K / V blocks into the ring. A head is read as one box of
        DQA (DVA) columns, or, split (DQB / DVB > 0), as two boxes of DQA + DQB (DVA + DVB) columns."""
        b = gl.program_id(1) // H
        col = (gl.program_id(1) % H) * D
        q_row = b * Sq + gl.program_id(0) * (CONSUMERS * BLOCK_M)
        q_bytes: gl.constexpr = q_desc.block_type.nbytes + (q2_desc.block_type.nbytes if DQB > 0 else 0)
        k_bytes: gl.constexpr = k_desc.block_type.nbytes + (k2_desc.block_type.nbytes if DQB > 0 else 0)
        v_bytes: gl.constexpr = v_desc.block_type.nbytes + (v2_desc.block_type.nbytes if DVB > 0 else 0)
        for w in gl.static_range(CONSUMERS):
            mbarrier.expect(q_ready.index(w), q_bytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + w * BLOCK_M, col], q_ready.index(w), q_bufs.index(w))
            if DQB > 0:
                tma.async_copy_global_to_shared(q2_desc, [q_row + w * BLOCK_M, col + DQA], q_ready.index(w),
                                                q2_bufs.index(w))
        k_row = b * Sk
        for j in range(gl.cdiv(Sk, BLOCK_N)):
            st = j % STAGES
            mbarrier.wait(empty.index(st), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(k_ready.index(st), k_bytes)
            tma.async_copy_global_to_shared(k_desc, [k_row + j * BLOCK_N, col], k_ready.index(st), k_bufs.index(st))
            if DQB > 0:
                tma.async_copy_global_to_shared(k2_desc, [k_row + j * BLOCK_N, col + DQA], k_ready.index(st),
                                                k2_bufs.index(st))
            mbarrier.expect(v_ready.index(st), v_bytes)
            tma.async_copy_global_to_shared(v_desc, [k_row + j * BLOCK_N, col], v_ready.index(st), v_bufs.index(st))
            if DVB > 0:
                tma.async_copy_global_to_shared(v2_desc, [k_row + j * BLOCK_N, col + DVA], v_ready.index(st),
                                                v2_bufs.index(st))

    @gluon.jit
    def _softmax(s, m_i, l_i, k0, Sk, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_K: gl.constexpr,
                 dtype: gl.constexpr):
        """One block's online softmax in the log2 domain (keys past the end masked to -inf): P in the operands'
        dtype, the new running max and sum, and the factor the output so far is to be rescaled by."""
        if not EVEN_K:
            kidx = k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where((kidx < Sk)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = _ex2(s * qk_scale - m_new[:, None])
        alpha = _ex2(m_i - m_new)
        return p.to(dtype), m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _qk(q, q2, k_bufs, k2_bufs, k_ready, j, zero_s, DQB: gl.constexpr, STAGES: gl.constexpr):
        """Issue block j's scores (async; two wgmmas over the head's two column boxes when split) once its K is in."""
        st = j % STAGES
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        s = warpgroup_mma(q, k_bufs.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if DQB > 0:
            s = warpgroup_mma(q2, k2_bufs.index(st).permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _pv(p, v_bufs, v2_bufs, v_ready, j, o, o2, p_dot: gl.constexpr, p2_dot: gl.constexpr, DVB: gl.constexpr,
            STAGES: gl.constexpr):
        """Issue o += P_j V_j (async; o2 += P_j V2_j for the second column box when split) once V_j is in; returns
        the accumulator tokens and P's operands (kept alive)."""
        st = j % STAGES
        mbarrier.wait(v_ready.index(st), (j // STAGES) & 1)
        p_op = gl.convert_layout(p, p_dot)
        o = warpgroup_mma(p_op, v_bufs.index(st), o, is_async=True)
        p2_op = p_op
        if DVB > 0:
            p2_op = gl.convert_layout(p, p2_dot)
            o2 = warpgroup_mma(p2_op, v2_bufs.index(st), o2, is_async=True)
        return o, o2, p_op, p2_op

    @gluon.jit
    def _load_q(bufs, WG: gl.constexpr, c0: gl.constexpr, DQ: gl.constexpr, D: gl.constexpr, q_dot: gl.constexpr):
        """A consumer's Q box (columns c0 .. c0 + DQ of the head) as the wgmma's register operand; columns past the
        head (the neighbouring head's, or TMA's zero fill) zeroed, so that the scores are this head's only."""
        q_blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (DQ // 8), DQ // 8], [4, 1], [1, 0])
        q = bufs.index(WG).load(q_blk)
        if c0 + DQ > D:
            cols = gl.arange(0, DQ, layout=gl.SliceLayout(0, q_blk))
            q = gl.where((cols < D - c0)[None, :], q, gl.zeros_like(q))
        return gl.convert_layout(q, q_dot)

    @gluon.jit
    def _store_o(o, l_i, o_ptr, Sq, H, WG: gl.constexpr, c0: gl.constexpr, DV: gl.constexpr, D: gl.constexpr,
                 BLOCK_M: gl.constexpr, CONSUMERS: gl.constexpr, o_layout: gl.constexpr, dtype: gl.constexpr):
        o = o * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]
        b = gl.program_id(1) // H
        h = gl.program_id(1) % H
        rows = gl.program_id(0) * (CONSUMERS * BLOCK_M) + WG * BLOCK_M + gl.arange(0, BLOCK_M,
                                                                             layout=gl.SliceLayout(1, o_layout))
        cols = c0 + gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
        off = ((b * Sq + rows).to(gl.int64) * H + h) * D
        gl.store(o_ptr + off[:, None] + cols[None, :], o.to(dtype), mask=(rows < Sq)[:, None] & (cols < D)[None, :])

    @gluon.jit
    def _fa_consumer(WG: gl.constexpr, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready,
                     empty, o_ptr, Sq, Sk, H, qk_scale, D: gl.constexpr, DQA: gl.constexpr, DQB: gl.constexpr,
                     DVA: gl.constexpr, DVB: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, EVEN_K: gl.constexpr, CONSUMERS: gl.constexpr):
        dtype: gl.constexpr = q_bufs.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DVA, 16])
        DV2: gl.constexpr = DVB if DVB > 0 else 16  # (an unused second accumulator when the head is one box)
        o2_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, DV2, 16])
        q_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        p2_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o2_layout, k_width=2)
        NPV: gl.constexpr = 2 if DVB > 0 else 1  # wgmma groups of one P.V
        mbarrier.wait(q_ready.index(WG), 0)
        q = _load_q(q_bufs, WG, 0, DQA, D, q_dot)
        q2 = q
        if DQB > 0:
            q2 = _load_q(q2_bufs, WG, DQA, DQB, D, q_dot)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        o = gl.zeros([BLOCK_M, DVA], gl.float32, o_layout)
        o2 = gl.zeros([BLOCK_M, DV2], gl.float32, o2_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        n_blocks = gl.cdiv(Sk, BLOCK_N)

        s = warpgroup_mma_wait(0, deps=[_qk(q, q2, k_bufs, k2_bufs, k_ready, 0, zero_s, DQB, STAGES)])
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, Sk, qk_scale, s_layout, BLOCK_N, EVEN_K, dtype)
        for j in range(1, n_blocks):
            s = _qk(q, q2, k_bufs, k2_bufs, k_ready, j, zero_s, DQB, STAGES)
            o, o2, p_op, p2_op = _pv(p, v_bufs, v2_bufs, v_ready, j - 1, o, o2, p_dot, p2_dot, DVB, STAGES)
            s = warpgroup_mma_wait(NPV, deps=[s])  # the scores; block j-1's P.V stays in flight
            p, m_i, l_i, alpha = _softmax(s, m_i, l_i, j * BLOCK_N, Sk, qk_scale, s_layout, BLOCK_N, EVEN_K,
                                          dtype)
            if DVB > 0:
                o, o2, p_op, p2_op = warpgroup_mma_wait(0, deps=[o, o2, p_op, p2_op])
                o2 = o2 * gl.convert_layout(alpha, gl.SliceLayout(1, o2_layout))[:, None]
            else:
                o, p_op = warpgroup_mma_wait(0, deps=[o, p_op])
            mbarrier.arrive(empty.index((j - 1) % STAGES), count=1)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        o, o2, p_op, p2_op = _pv(p, v_bufs, v2_bufs, v_ready, n_blocks - 1, o, o2, p_dot, p2_dot, DVB, STAGES)
        if DVB > 0:
            o, o2, p_op, p2_op = warpgroup_mma_wait(0, deps=[o, o2, p_op, p2_op])
        else:
            o, p_op = warpgroup_mma_wait(0, deps=[o, p_op])
        mbarrier.arrive(empty.index((n_blocks - 1) % STAGES), count=1)
        _store_o(o, l_i, o_ptr, Sq, H, WG, 0, DVA, D, BLOCK_M, CONSUMERS, o_layout, dtype)
        if DVB > 0:
            _store_o(o2, l_i, o_ptr, Sq, H, WG, DVA, DVB, D, BLOCK_M, CONSUMERS, o2_layout, dtype)

    @gluon.jit
    def _fa_kernel(q_desc, q2_desc, k_desc, k2_desc, v_desc, v2_desc, o_ptr, Sq, Sk, H, qk_scale, D: gl.constexpr,
                   DQA: gl.constexpr, DQB: gl.constexpr, DVA: gl.constexpr, DVB: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, EVEN_K: gl.constexpr,
                   CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, BLOCK_M, DQA], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DQA], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DVA], v_desc.layout)
        # the second column boxes (split heads); one stage of 16 columns, unused, otherwise
        NS2: gl.constexpr = STAGES if DQB > 0 else 1
        NV2: gl.constexpr = STAGES if DVB > 0 else 1
        q2_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS if DQB > 0 else 1, BLOCK_M, q2_desc.block_type.shape[1]],
                                            q2_desc.layout)
        k2_bufs = gl.allocate_shared_memory(dtype, [NS2, BLOCK_N, k2_desc.block_type.shape[1]], k2_desc.layout)
        v2_bufs = gl.allocate_shared_memory(dtype, [NV2, BLOCK_N, v2_desc.block_type.shape[1]], v2_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(CONSUMERS):
            mbarrier.init(q_ready.index(w), count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(st), count=1)
            mbarrier.init(v_ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=CONSUMERS)  # every consumer reads every block
        fence_async_shared()
        # (arguments written out: tuples built in a gluon.jit function lose their elements' constexpr-ness)
        if CONSUMERS == 3:
            gl.warp_specialize([(_fa_consumer, (0, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty,
                                                o_ptr, Sq, Sk, H, qk_scale, D, DQA, DQB, DVA, DVB, BLOCK_M, BLOCK_N,
                                                STAGES, EVEN_K, CONSUMERS)),
                                (_fa_consumer, (1, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty,
                                                o_ptr, Sq, Sk, H, qk_scale, D, DQA, DQB, DVA, DVB, BLOCK_M, BLOCK_N,
                                                STAGES, EVEN_K, CONSUMERS)),
                                (_fa_consumer, (2, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty,
                                                o_ptr, Sq, Sk, H, qk_scale, D, DQA, DQB, DVA, DVB, BLOCK_M, BLOCK_N,
                                                STAGES, EVEN_K, CONSUMERS)),
                                (_fa_producer, (q_desc, q2_desc, k_desc, k2_desc, v_desc, v2_desc, q_bufs, q2_bufs, k_bufs, k2_bufs,
                                                v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty, Sq, Sk, H, D, DQA,
                                                DQB, DVA, DVB, BLOCK_M, BLOCK_N, STAGES, CONSUMERS))],
                               [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([(_fa_consumer, (0, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty,
                                                o_ptr, Sq, Sk, H, qk_scale, D, DQA, DQB, DVA, DVB, BLOCK_M, BLOCK_N,
                                                STAGES, EVEN_K, CONSUMERS)),
                                (_fa_consumer, (1, q_bufs, q2_bufs, k_bufs, k2_bufs, v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty,
                                                o_ptr, Sq, Sk, H, qk_scale, D, DQA, DQB, DVA, DVB, BLOCK_M, BLOCK_N,
                                                STAGES, EVEN_K, CONSUMERS)),
                                (_fa_producer, (q_desc, q2_desc, k_desc, k2_desc, v_desc, v2_desc, q_bufs, q2_bufs, k_bufs, k2_bufs,
                                                v_bufs, v2_bufs, q_ready, k_ready, v_ready, empty, Sq, Sk, H, D, DQA,
                                                DQB, DVA, DVB, BLOCK_M, BLOCK_N, STAGES, CONSUMERS))],
                               [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def new_out(b: int, sq: int, h: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The output buffer, [B, Sq, H, D] (a function of its own, so that the tests can poison it)."""
    return torch.empty((b, sq, h, d), dtype=dtype, device=device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] token-major view -> the [B*S, H*D] 2-D view the descriptors read."""
    b, h, s, d = x.shape
    return x.as_strided((b * s, h * d), (x.stride(2), 1))


def flash_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          config: Optional[dict] = None) -> torch.Tensor:
    """softmax(q kᵀ scale) v for q [B, H, Sq, D], k / v [B, H, Sk, D], bf16 or fp16 alike, on sm_90, each a
    token-major view (``x.view(B, S, H, D).transpose(1, 2)`` of a projection's output, a column slice of a stacked
    projection included: stride(3) 1, stride(1) D, stride(0) S * stride(2), stride(2) and the data pointer 16-byte
    aligned). Returns the [B, H, Sq, D] transpose view of a new [B, Sq, H, D] tensor. ``config``: BLOCK_N (128),
    STAGES (default: as many as fit, at most 4), CONSUMERS (2; 3 with 64-key blocks fits the registers at head widths up
    to 64: 609 against 622 us at SD b8's 64x64 self-attention, 104 against 86 at 32x32, session 19 call 14),
    CONSUMER_REGS (232 with 2 consumers, 160 with 3), PRODUCER_REGS (40), SPLIT (a head read in two column boxes,
    :func:`head_boxes`; default: where they read at most 5/8 of the padded width. At SD b8's 32x32 self-attention,
    head width 80 = 64 + 16, 66.7 against 85.8 us; at 64x64, 40 = 32 + 16, 695 against 629 us with two consumers and
    606 with three and 64-key blocks; H200, 2026-11-29, session 20 call 5)."""
    why = unavailable(q.device)
    if why:
        raise RuntimeError(f"flash_attention_gluon: {why}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention_gluon: q, k, v bf16 or fp16 alike; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if k.shape != (b, h, sk, d) or v.shape != k.shape or d > MAX_HEAD_DIM or d < 1:
        raise ValueError(f"flash_attention_gluon: q [B,H,Sq,D], k and v [B,H,Sk,D], D <= {MAX_HEAD_DIM}; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not flash_token_major(x):
            raise ValueError(f"flash_attention_gluon: {name} is not a token-major view (strides {x.stride()}); "
                             f"pass x.transpose(1, 2).contiguous().transpose(1, 2)")
    cfg = {**DEFAULTS, **(config or {})}
    split = cfg["SPLIT"]
    if split is None:  # where the two boxes read at most 5/8 of the padded columns (80 of 128, not 48 of 64)
        split = 8 * sum(head_boxes(d, True)[:2]) <= 5 * padded_head_dim(d)
    dqa, dqb, dva, dvb = head_boxes(d, bool(split))
    bm, bn = 64, cfg["BLOCK_N"]
    nc = cfg["CONSUMERS"]
    if nc not in (2, 3):
        raise ValueError(f"flash_attention_gluon: CONSUMERS 2 or 3, got {nc}")
    stages = cfg["STAGES"] or max(2, min(4, (RING_BYTES - nc * bm * (dqa + dqb) * 2) // (bn * (dqa + dqb + dva + dvb) * 2)))
    out = new_out(b, sq, h, d, q.dtype, q.device)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs = []
    for x, rows, first, second in ((q, bm, dqa, dqb), (k, bn, dqa, dqb), (v, bn, dva, dvb)):
        r = _rows(x)
        for width in (first, second or 16):  # (an unused 16-column box when the head is one)
            blk = [rows, width]
            descs.append(TensorDescriptor(r, list(r.shape), [r.stride(0), 1], blk,
                                          gl.NVMMASharedLayout.get_default_for(blk, gdt)))
    grid = (-(-sq // (nc * bm)), b * h)
    _fa_kernel[grid](*descs, out, sq, sk, h, float(scale) * LOG2E, D=d, DQA=dqa, DQB=dqb, DVA=dva, DVB=dvb,
                     BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, EVEN_K=sk % bn == 0, CONSUMERS=nc,
                     CONSUMER_REGS=cfg["CONSUMER_REGS"] or (232 if nc == 2 else 160),
                     PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=4)
    return out.transpose(1, 2)


__all__ = ["flash_attention_gluon", "unavailable", "padded_head_dim", "head_boxes", "new_out", "DEFAULTS",
           "MAX_HEAD_DIM"]
