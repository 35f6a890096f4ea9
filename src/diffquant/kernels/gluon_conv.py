"""An FP8 3x3 (k x k, stride 1) conv as implicit GEMM in Gluon (Triton's lower-level dialect), with the A tile read
by the tensor cores straight from shared memory. Experimental: an op-level candidate, not a path of
``diffquant::qconv``. Measured on SD-1.5 b8's 3x3 convs (H200, 2026-11-29, BENCHMARKS.md "Kernels, sixteenth
measurement", ``bash scripts/gpu/gluon_conv.sh``): 0.86-1.11x of the tuned Triton kernels, outputs equal to the bit;
over six shapes weighted by calls a UNet, the best of both would save 3 %. So reading A from shared memory is not
what limits those kernels, and this stays off the model's path.

Why: the Triton kernels of the 4-D TMA paths (:mod:`.triton_conv_tma`) load an A box of several output rows or
images ([BI, BH, BW, BLOCK_K]) and ``tl.reshape`` it to [BLOCK_M, BLOCK_K]. Triton (3.6 and 3.9) cannot reshape a
shared-memory operand, so it copies A into registers for every step and runs each wgmma with a register operand,
waiting on every one (sm_90 SASS of ``_qconv_tma4d_wide_kernel``: every ``QGMMA ... R, gdesc`` followed by
``WARPGROUP.DEPBAR.LE gsb0, 0x0``, six ``BAR.SYNC`` a step). Only one-row tiles (BI = BH = 1) keep A in shared
memory. Nsight Compute on SD-1.5 b8's 64x64 320-channel conv: the tensor pipe 43.5 % busy, 44 % of the stalls at
barriers (H200, 2026-11-29, ``benchmarks/results/ncu_conv.txt``).

Here the box is TMA-loaded into a 4-D view of a buffer whose bytes are those of the [BLOCK_M, BLOCK_K] tile (rows of
BLOCK_K = 128 bytes, 128-byte swizzle: the 4-D box lays its pixels out in the same order), and the wgmma reads the
2-D view of the same bytes (``_reinterpret``). The K loop is software-pipelined by hand: STAGES buffers, one mbarrier
each, the loads of step ``it + STAGES - 1`` issued once the wgmma of step ``it - 1`` has retired (one wgmma left in
flight). Epilogue: x activation scale x per-channel weight scale, + bias, rounded once to bf16, masked stores from
the accumulator's own layout.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _issue(a_desc, b_desc, a_buf, b_buf, bar, it, n0, oh0, ow0, co0, CK, NCB, pad_h, pad_w, KW: gl.constexpr,
           BLOCK_K: gl.constexpr):
    """The TMA loads of K step ``it`` (tap, channel block) into one stage; ``bar`` counts their bytes."""
    tap = it // NCB
    c0 = (it - tap * NCB) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [n0, oh0 + kh - pad_h, ow0 + kw - pad_w, c0], bar, a_buf)
    tma.async_copy_global_to_shared(b_desc, [co0, tap * CK + c0], bar, b_buf)


@gluon.jit
def _gconv_kernel(a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, bias_ptr,
                  N, H, W, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, son, soh, sow,
                  KW: gl.constexpr, HAS_BIAS: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr, BW: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                  num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = BI * BH * BW
    n0, oh0, ow0, co0 = _tile_origin(gl.program_id(0), N, Cout, TILES_H, TILES_W, BI, BH, BW, BLOCK_N, GROUP_M)
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BI, BH, BW, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(STAGES):
        mbarrier.init(bars.index(q), count=1)
    a2d: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    for q in gl.static_range(STAGES - 1):
        if q < NITER:
            _issue(a_desc, b_desc, a_bufs.index(q), b_bufs.index(q), bars.index(q), q, n0, oh0, ow0, co0, CK, NCB,
                   pad_h, pad_w, KW, BLOCK_K)
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for it in range(NITER):
        st = it % STAGES
        mbarrier.wait(bars.index(st), (it // STAGES) & 1)
        a = a_bufs.index(st)._reinterpret(gl.float8e4nv, [BLOCK_M, BLOCK_K], a2d)
        b = b_bufs.index(st).permute((1, 0))
        acc = warpgroup_mma(a, b, acc, is_async=True)
        acc, a, b = warpgroup_mma_wait(1, deps=[acc, a, b])
        nxt = it + STAGES - 1
        if nxt < NITER:  # the stage of step it - 1, whose wgmma has retired
            t = nxt % STAGES
            _issue(a_desc, b_desc, a_bufs.index(t), b_bufs.index(t), bars.index(t), nxt, n0, oh0, ow0, co0, CK, NCB,
                   pad_h, pad_w, KW, BLOCK_K)
    acc = warpgroup_mma_wait(0, deps=[acc])
    for q in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(q))

    _epilogue(acc, acc_layout, n0, oh0, ow0, co0, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N, H, W, Cout, son, soh,
              sow, HAS_BIAS, BH, BW, BLOCK_M, BLOCK_N)


@gluon.jit
def _tile_origin(t, N, Cout, TILES_H, TILES_W, BI: gl.constexpr, BH: gl.constexpr, BW: gl.constexpr,
                 BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile ``t``'s (first image, first output row, first output column, first output channel), GROUP_M row tiles
    sharing a column of weight tiles (L2 reuse)."""
    tiles_m = gl.cdiv(N, BI) * TILES_H * TILES_W
    tiles_n = gl.cdiv(Cout, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (t // in_group) * GROUP_M
    group_m = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_m
    pid_n = (t % in_group) // group_m
    tw = pid_m % TILES_W
    th = (pid_m // TILES_W) % TILES_H
    return (pid_m // (TILES_W * TILES_H)) * BI, th * BH, tw * BW, pid_n * BLOCK_N


@gluon.jit
def _epilogue(acc, acc_layout: gl.constexpr, n0, oh0, ow0, co0, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N, H, W,
              Cout, son, soh, sow, HAS_BIAS: gl.constexpr, BH: gl.constexpr, BW: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """x activation scale x per-channel weight scale, + bias, bf16, masked stores straight from the accumulator's
    layout (each thread holds pairs of adjacent channels: 4-byte stores; no shared-memory round trip, so the pipeline
    buffers are all the shared memory a program takes)."""
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    offs_n = co0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    n_ok = offs_n < Cout
    y = acc * (gl.load(wscale_ptr + offs_n, mask=n_ok, other=0.0) * gl.load(ascale_ptr))[None, :]
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    nb = n0 + offs_m // (BH * BW)
    oh = oh0 + (offs_m // BW) % BH
    ow = ow0 + offs_m % BW
    m_ok = (nb < N) & (oh < H) & (ow < W)
    o_off = nb.to(gl.int64) * son + oh * soh + ow * sow
    gl.store(out_ptr + o_off[:, None] + offs_n[None, :], y.to(gl.bfloat16), mask=m_ok[:, None] & n_ok[None, :])


# The warp-specialized form (config "ws"): one program per SM walks the tiles; a producer warp runs the TMA loads
# ahead, independent of the MMAs; two consumer warp groups take the tiles in turn, so one's epilogue overlaps the
# other's K loop. Each consumer has a ring of its own (STAGES buffers, ready / empty mbarriers): with one ring
# shared, a consumer a whole tile ahead of the other could find a stage's ready barrier one phase behind and take
# the parity of an old phase for the one it waits on (session 18: wrong GEGLU outputs with 3 stages, launch
# failures). Each consumer keeps one wgmma in flight and releases a stage once the wgmma that read it has retired.
@gluon.jit
def _ws_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, N, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h,
                 pad_w, KW: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr, BW: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    num_tiles = gl.cdiv(N, BI) * TILES_H * TILES_W * gl.cdiv(Cout, BLOCK_N)
    local = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        n0, oh0, ow0, co0 = _tile_origin(t, N, Cout, TILES_H, TILES_W, BI, BH, BW, BLOCK_N, GROUP_M)
        ring = local % 2  # the consumer of this tile: its own ring of STAGES buffers
        for it in range(NITER):
            step = (local // 2) * NITER + it
            s = ring * STAGES + step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            _issue(a_desc, b_desc, a_bufs.index(s), b_bufs.index(s), ready.index(s), it, n0, oh0, ow0, co0, CK, NCB,
                   pad_h, pad_w, KW, BLOCK_K)
        local += 1


@gluon.jit
def _ws_consumer(WG: gl.constexpr, a_bufs, b_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N, H, W,
                 Cout, NITER, TILES_H, TILES_W, son, soh, sow, HAS_BIAS: gl.constexpr, BI: gl.constexpr,
                 BH: gl.constexpr, BW: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                 STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    BLOCK_M: gl.constexpr = BI * BH * BW
    a2d: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_tiles = gl.cdiv(N, BI) * TILES_H * TILES_W * gl.cdiv(Cout, BLOCK_N)
    local = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        if local % 2 == WG:
            n0, oh0, ow0, co0 = _tile_origin(t, N, Cout, TILES_H, TILES_W, BI, BH, BW, BLOCK_N, GROUP_M)
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            prev = 0
            for it in range(NITER):
                step = (local // 2) * NITER + it
                s = WG * STAGES + step % STAGES
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                a = a_bufs.index(s)._reinterpret(gl.float8e4nv, [BLOCK_M, BLOCK_K], a2d)
                b = b_bufs.index(s).permute((1, 0))
                acc = warpgroup_mma(a, b, acc, is_async=True)
                acc, a, b = warpgroup_mma_wait(1, deps=[acc, a, b])
                if it > 0:  # the wgmma of the step before has retired: its stage goes back to the producer
                    mbarrier.arrive(empty.index(prev), count=1)
                prev = s
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index(prev), count=1)
            _epilogue(acc, acc_layout, n0, oh0, ow0, co0, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N, H, W, Cout,
                      son, soh, sow, HAS_BIAS, BH, BW, BLOCK_M, BLOCK_N)
        local += 1


@gluon.jit
def _gconv_ws_kernel(a_desc, b_desc, out_ptr, ascale_ptr, wscale_ptr, bias_ptr,
                     N, H, W, Cout, CK, NCB, NITER, TILES_H, TILES_W, pad_h, pad_w, son, soh, sow,
                     KW: gl.constexpr, HAS_BIAS: gl.constexpr, BI: gl.constexpr, BH: gl.constexpr, BW: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, BI, BH, BW, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(2 * STAGES):
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    fence_async_shared()
    gl.warp_specialize([(_ws_consumer, (0, a_bufs, b_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N,
                                        H, W, Cout, NITER, TILES_H, TILES_W, son, soh, sow, HAS_BIAS, BI, BH, BW,
                                        BLOCK_N, BLOCK_K, STAGES, GROUP_M)),
                        (_ws_consumer, (1, a_bufs, b_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, N,
                                        H, W, Cout, NITER, TILES_H, TILES_W, son, soh, sow, HAS_BIAS, BI, BH, BW,
                                        BLOCK_N, BLOCK_K, STAGES, GROUP_M)),
                        (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, N, Cout, CK, NCB, NITER,
                                        TILES_H, TILES_W, pad_h, pad_w, KW, BI, BH, BW, BLOCK_N, BLOCK_K, STAGES,
                                        GROUP_M))],
                       [4, 1], [CONSUMER_REGS, 40])


def new_out(nb: int, cout: int, h: int, wd: int, device) -> torch.Tensor:
    """The bf16 channels-last output (a function of its own, so that the tests can poison it)."""
    return torch.empty(nb, cout, h, wd, device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)


def gconv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor, bias, padding,
          config: dict) -> torch.Tensor:
    """bf16 conv(x, w) x a_scale x w_scale[channel] + bias: x e4m3 [N, C, H, W] channels-last, w e4m3
    [Cout, kh, kw, C] (diffquant's layout), stride 1, output the input's size. ``config``: BLOCK_M (64, 128 or 256
    pixels: whole rows where they fit), BLOCK_N, STAGES, num_warps (4 a warpgroup of 64 rows); BLOCK_K is 128.
    ``"ws": True``: the warp-specialized persistent kernel (two consumer warp groups of 4 warps, ``CONSUMER_REGS``
    registers each, 216 by default; BLOCK_M x BLOCK_N fp32 a consumer must fit them; STAGES buffers a consumer)."""
    from diffquant.kernels.triton_conv_tma import tile_4d

    nb, c, h, wd = x.shape
    cout, kh, kw, ck = w.shape
    if c % 16 or ck != c or (kh - 1) // 2 != padding[0] or (kw - 1) // 2 != padding[1]:
        raise ValueError("gconv: same-size convs with 16-multiple channels only")
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], 128
    bi, bh, bw = tile_4d(bm, h, wd)
    out = new_out(nb, cout, h, wd, x.device)
    lay4 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=4)
    lay2 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    a_desc = TensorDescriptor(x, [nb, h, wd, c], [x.stride(0), x.stride(2), x.stride(3), 1], [bi, bh, bw, bk], lay4)
    wv = w.reshape(cout, kh * kw * ck)
    b_desc = TensorDescriptor(wv, [cout, kh * kw * ck], [kh * kw * ck, 1], [bn, bk], lay2)
    ncb = -(-ck // bk)
    tiles_h, tiles_w = -(-h // bh), -(-wd // bw)
    grid = (-(-nb // bi) * tiles_h * tiles_w * -(-cout // bn),)
    args = (a_desc, b_desc, out, a_scale, w_scale, bias if bias is not None else w_scale, nb, h, wd, cout, ck, ncb,
            kh * kw * ncb, tiles_h, tiles_w, int(padding[0]), int(padding[1]), out.stride(0), out.stride(2),
            out.stride(3))
    flags = dict(KW=kw, HAS_BIAS=bias is not None, BI=bi, BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk,
                 STAGES=config.get("STAGES", 4), GROUP_M=8)
    if config.get("ws"):
        progs = min(grid[0], torch.cuda.get_device_properties(x.device).multi_processor_count)
        _gconv_ws_kernel[(progs,)](*args, **flags, CONSUMER_REGS=config.get("CONSUMER_REGS", 216), num_warps=4)
    else:
        _gconv_kernel[grid](*args, **flags, num_warps=config.get("num_warps", 4))
    return out
