"""``diffquant::linear_geglu`` as a persistent, warp-specialized Gluon kernel for Hopper (experimental; an op-level
candidate beside :mod:`.triton_geglu`, not a path of the op). Measured on SD-1.5 b8's four feed-forward shapes (H200,
2026-11-29, BENCHMARKS.md "Kernels, sixteenth measurement", ``bash scripts/gpu/gluon_geglu.sh``): 0.86-1.05x of the
Triton kernel, its e4m3 outputs equal code for code; 1.327 against 1.329 ms a UNet for the best of both. The Triton
kernel already runs two programs a SM whose K loops and epilogues overlap, so the epilogue's instruction count, not
the lack of overlap, is what limits it.

Why: the Triton GEGLU kernel is limited by instruction issue in its epilogue (Nsight Compute on SD-1.5 b8's 64x64
level: 141 us, issue slots 55 % busy, against 82 us for cuBLAS's bare FP8 GEMM of the same shape; H200,
2026-11-29). K is short there (320: three K steps), so each program spends about as long in its epilogue as in its
K loop, and a program's epilogue and K loop never overlap. Here one program per SM walks the output tiles with
three partitions (``gl.warp_specialize``):

- a producer warp issues the TMA loads of every tile's K steps, into the ring of STAGES buffers (``ready`` /
  ``empty`` mbarriers) of the consumer that takes the tile (one ring each: with one shared ring, a consumer a tile
  ahead of the other could find a ready barrier a phase behind and take an old phase's parity for its own; session
  18 saw wrong outputs and launch failures that way);
- two consumer warp groups take the tiles in turn (even / odd) ("ping-pong"): while one runs its epilogue (dequantize,
  bias, GELU of the gate by the polynomial of :func:`.triton_geglu._gelu`, product, e4m3 rounding, stores), the other
  runs its wgmmas.

Tile: BLOCK_M tokens x BLOCK_N outputs of h and of g (two accumulators over the same A tile), as the Triton kernel.
The result is :func:`.reference.linear_geglu_reference` up to accumulation order and the e4m3 rounding of values
within an ulp of a rounding boundary (the output scale is applied as a multiplication by its reciprocal).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _mufu(x, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _gelu_poly(g):
    """GELU of ``g`` in fp32, erf by Abramowitz & Stegun 7.1.26 with Phi folded (as :func:`.triton_geglu._gelu`)."""
    t = _mufu(1.0 + 0.23164189985974283 * gl.abs(g), "rsqrt.approx.ftz.f32 $0, $1;")
    t = t * t
    half_erfc = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
    half_erfc = half_erfc * _mufu(g * -0.7213475204444817 * g, "ex2.approx.ftz.f32 $0, $1;")
    phi = gl.where(g < 0, half_erfc, 1.0 - half_erfc)
    return g * phi


@gluon.jit
def _tile_mn(tile, M, I, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    num_m = gl.cdiv(M, BLOCK_M)
    num_n = gl.cdiv(I, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _producer(a_desc, w_desc, a_bufs, h_bufs, g_bufs, ready, empty, M, I, K, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(I, BLOCK_N)
    ksteps = gl.cdiv(K, BLOCK_K)
    nbytes: gl.constexpr = (BLOCK_M + 2 * BLOCK_N) * BLOCK_K
    local = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        m0, n0 = _tile_mn(tile, M, I, BLOCK_M, BLOCK_N, GROUP_M)
        ring = local % 2  # the consumer of this tile: its own ring of STAGES buffers
        for kk in range(ksteps):
            step = (local // 2) * ksteps + kk
            s = ring * STAGES + step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), nbytes)
            k = kk * BLOCK_K
            tma.async_copy_global_to_shared(a_desc, [m0, k], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [n0, k], ready.index(s), h_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [I + n0, k], ready.index(s), g_bufs.index(s))
        local += 1


@gluon.jit
def _consumer(WG: gl.constexpr, a_bufs, h_bufs, g_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr, bias_ptr,
              oscale_ptr, M, I, K, HAS_BIAS: gl.constexpr, OSCALE_PER_CH: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """Warp group ``WG`` (0 or 1): the tiles of this program of its parity, K loop and epilogue each."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(I, BLOCK_N)
    ksteps = gl.cdiv(K, BLOCK_K)
    s_a = gl.load(ascale_ptr)
    local = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        if local % 2 == WG:
            m0, n0 = _tile_mn(tile, M, I, BLOCK_M, BLOCK_N, GROUP_M)
            acc_h = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            acc_g = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            for kk in range(ksteps):
                step = (local // 2) * ksteps + kk
                s = WG * STAGES + step % STAGES
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                a = a_bufs.index(s)
                bh = h_bufs.index(s).permute((1, 0))
                bg = g_bufs.index(s).permute((1, 0))
                acc_h = warpgroup_mma(a, bh, acc_h, is_async=True)
                acc_g = warpgroup_mma(a, bg, acc_g, is_async=True)
                acc_h, acc_g = warpgroup_mma_wait(0, deps=[acc_h, acc_g])
                mbarrier.arrive(empty.index(s), count=1)
            offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            n_ok = offs_n < I
            h = acc_h * (s_a * gl.load(wscale_ptr + offs_n, mask=n_ok, other=0.0))[None, :]
            g = acc_g * (s_a * gl.load(wscale_ptr + I + offs_n, mask=n_ok, other=0.0))[None, :]
            if HAS_BIAS:
                h += gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
                g += gl.load(bias_ptr + I + offs_n, mask=n_ok, other=0.0)[None, :]
            y = h * _gelu_poly(g)
            if OSCALE_PER_CH:
                y = y / gl.load(oscale_ptr + offs_n, mask=n_ok, other=1.0)[None, :]
            else:
                y = y * (1.0 / gl.load(oscale_ptr))
            y8 = gl.minimum(gl.maximum(y, -448.0), 448.0).to(gl.float8e4nv)
            mask = (offs_m < M)[:, None] & n_ok[None, :]
            gl.store(out_ptr + offs_m[:, None] * I + offs_n[None, :], y8, mask=mask)
        local += 1


@gluon.jit
def _gg_kernel(a_desc, w_desc, out_ptr, ascale_ptr, wscale_ptr, bias_ptr, oscale_ptr, M, I, K,
               HAS_BIAS: gl.constexpr, OSCALE_PER_CH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
               PRODUCER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    h_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    g_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(2 * STAGES):
        mbarrier.init(ready.index(q), count=1)
        mbarrier.init(empty.index(q), count=1)
    fence_async_shared()
    gl.warp_specialize([(_consumer, (0, a_bufs, h_bufs, g_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr,
                                     bias_ptr, oscale_ptr, M, I, K, HAS_BIAS, OSCALE_PER_CH, BLOCK_M, BLOCK_N,
                                     BLOCK_K, STAGES, GROUP_M)),
                        (_consumer, (1, a_bufs, h_bufs, g_bufs, ready, empty, out_ptr, ascale_ptr, wscale_ptr,
                                     bias_ptr, oscale_ptr, M, I, K, HAS_BIAS, OSCALE_PER_CH, BLOCK_M, BLOCK_N,
                                     BLOCK_K, STAGES, GROUP_M)),
                        (_producer, (a_desc, w_desc, a_bufs, h_bufs, g_bufs, ready, empty, M, I, K, BLOCK_M, BLOCK_N,
                                     BLOCK_K, STAGES, GROUP_M))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def new_out(m: int, i: int, device) -> torch.Tensor:
    """The e4m3 output (a function of its own, so that the tests can poison it)."""
    return torch.empty((m, i), dtype=torch.float8_e4m3fn, device=device)


def linear_geglu_gluon(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                       bias, out_scale: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """e4m3 ``h * gelu(g) / out_scale`` of ``xq @ w.T`` (dequantized, + bias), h and g the two halves of the
    projection (``diffquant::linear_geglu``'s e4m3 case). ``config``: BLOCK_M (128), BLOCK_N (64), BLOCK_K (128),
    STAGES (2, a consumer), programs (default: the SM count), CONSUMER_REGS (216), PRODUCER_REGS (40)."""
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 2, "CONSUMER_REGS": 216, "PRODUCER_REGS": 40,
           **(config or {})}
    m, k = xq.shape
    i = w.shape[0] // 2
    if k % 16 or m * i >= 2 ** 31:
        raise ValueError("linear_geglu_gluon: input width a multiple of 16 and fewer than 2**31 outputs")
    out = new_out(m, i, xq.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    lay = gl.NVMMASharedLayout(swizzle_byte_width=128 if bk >= 128 else bk, element_bitwidth=8, rank=2)
    a_desc = TensorDescriptor(xq, [m, k], [k, 1], [bm, bk], lay)
    w_desc = TensorDescriptor(w, [2 * i, k], [k, 1], [bn, bk], lay)
    ws = w_scale.float().reshape(-1).contiguous()
    so = out_scale.float().reshape(-1).contiguous()
    b = bias.float().reshape(-1).contiguous() if bias is not None else ws
    tiles = -(-m // bm) * -(-i // bn)
    progs = cfg.get("programs") or torch.cuda.get_device_properties(xq.device).multi_processor_count
    _gg_kernel[(max(1, min(tiles, progs)),)](
        a_desc, w_desc, out, a_scale.float().reshape(1), ws, b, so, m, i, k, HAS_BIAS=bias is not None,
        OSCALE_PER_CH=so.numel() > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], GROUP_M=8,
        CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=4)
    return out
