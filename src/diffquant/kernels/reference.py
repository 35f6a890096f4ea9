"""Plain-PyTorch reference implementations of the low-bit ops: the test oracle of the GPU kernels
and the implementation used where no GPU kernel runs (CPU tensors, no Triton).

Storage conventions shared by the reference and the kernels
-----------------------------------------------------------
* Weights are laid out ``[Cout, KH, KW, Cin]`` (a Linear is a 1x1 conv: ``[N, 1, 1, K]``), the
  reduction axis (kh, kw, c) contiguous, as the NHWC implicit GEMM reads them.
* Integer weights are stored as signed int8 values ``v`` with an integer zero point ``wzp`` per
  output channel: ``w = (v - wzp) * w_scale``. An asymmetric 8-bit code ``q in [0, 255]`` is stored as
  ``v = q - 128`` (``wzp = zp - 128``); a symmetric one as is (``wzp = 0``).
* 4-bit weights: ``v in [-8, 7]`` stored as the nibble ``u = v + 8``; one byte holds channel ``c``
  (low nibble) and channel ``c + Cin/2`` (high nibble) of the same tap: ``uint8 [Cout, KH, KW, Cin/2]``.
  Splitting the channels in halves (rather than pairing neighbours) lets the kernel read two
  contiguous activation slices per step, with no shuffles.
* Integer activations: ``int8`` values ``v`` with one integer zero point ``a_zp`` per tensor (asymmetric
  uint8 codes shifted by 128, like the weights). Padding positions of a conv hold ``a_zp`` (the
  quantized value of 0.0), exactly as the fake-quant model pads the dequantized input with zeros.
* The integer product is accumulated exactly (int32 in the kernels, float64 here), corrected for
  the zero points, then scaled once::

      acc[m, n] = sum_k v_x[m, k] * v_w[n, k]
      out[m, n] = (acc - wzp[n] * rowsum(v_x)[m] + corr[n]) * a_scale * w_scale[n] + bias[n] (+ add)

  with ``corr[n] = -a_zp * colsum(v_w)[n] + K * a_zp * wzp[n]`` precomputed at conversion: the
  activation zero point folded into a per-channel bias correction from the weight sums.
* FP8 (e4m3) activations and weights have no zero point; bf16 activations (W4A16) have no scale.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from diffquant.quant.affine import FP8_E4M3_MAX

W4_OFFSET = 8


def pack_w4(v: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [..., C] with C even -> uint8 [..., C/2] (channel halves)."""
    c = v.shape[-1]
    if c % 2:
        raise ValueError(f"4-bit packing needs an even number of input channels; got {c}")
    u = (v.to(torch.int16) + W4_OFFSET)
    if int(u.min()) < 0 or int(u.max()) > 15:
        raise ValueError("4-bit values must lie in [-8, 7]")
    lo, hi = u[..., : c // 2], u[..., c // 2 :]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_w4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_w4`: int8 values [..., 2 * C/2]."""
    p = p.to(torch.int16)
    lo = (p & 15) - W4_OFFSET
    hi = (p >> 4) - W4_OFFSET
    return torch.cat([lo, hi], dim=-1).to(torch.int8)


def weight_values(w: torch.Tensor, w4: bool) -> torch.Tensor:
    """The weight values ``[Cout, KH, KW, Cin]`` (int8 / fp8 / float) of a stored weight."""
    return unpack_w4(w) if w4 else w


def pad_correction(w: torch.Tensor, a_zp: int, w4: bool = False) -> torch.Tensor:
    """int32 [Cout, KH*KW]: ``a_zp * sum_c v_w[n, kh, kw, c]``, what one padded tap adds to an output
    channel's integer accumulator (the kernel's epilogue form of "padding holds a_zp")."""
    v = weight_values(w, w4).to(torch.int64)
    return (int(a_zp) * v.sum(dim=-1).reshape(v.shape[0], -1)).to(torch.int32).contiguous()


def out_like(x: torch.Tensor, cout: int, ho: int, wo: int, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised output [N, Cout, Ho, Wo] in channels-last layout (what the kernels write)."""
    return torch.empty((x.shape[0], ho, wo, cout), dtype=dtype, device=x.device).permute(0, 3, 1, 2)


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


@torch.no_grad()
def qconv_reference(
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
) -> torch.Tensor:
    """The op's definition, in float64 (exact for the integer products at any UNet size).
    ``pad_corr`` (derived from ``w`` and ``a_zp``, a kernel-side shortcut) does not enter it."""
    wv = weight_values(w, w4).to(torch.float64).permute(0, 3, 1, 2)  # [Cout, Cin, KH, KW]
    xv = x.to(torch.float64)
    if x.shape[1] != wv.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels; the weight expects {wv.shape[1]}")
    ph, pw = padding
    if ph or pw:
        xv = F.pad(xv, (pw, pw, ph, ph), value=float(a_zp))
    acc = F.conv2d(xv, wv, None, tuple(stride), 0, tuple(dilation))
    if wzp is not None:
        ones = torch.ones((1,) + tuple(wv.shape[1:]), dtype=torch.float64, device=x.device)
        rs = F.conv2d(xv, ones, None, tuple(stride), 0, tuple(dilation))
        acc = acc - rs * wzp.to(torch.float64).view(1, -1, 1, 1)
    if corr is not None:
        acc = acc + corr.to(torch.float64).view(1, -1, 1, 1)
    mult = w_scale.to(torch.float64)
    if a_scale is not None:
        mult = mult * a_scale.to(torch.float64).reshape(())
    out = acc * mult.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.to(torch.float64).view(1, -1, 1, 1)
    if add is not None:
        out = out + add.to(torch.float64)
    res = out_like(x, out.shape[1], out.shape[2], out.shape[3], out_dtype)
    res.copy_(out)
    return res



def qconv_sc_reference(x, w, w_scale, a_scale, bias, sc_x, sc_w, sc_w_scale, sc_a_scale, sc_bias, padding,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``diffquant::qconv_sc``'s definition, in float64: the conv of ``x`` (stride 1, ``padding``) plus, per source
    j, the conv of ``sc_x[j]`` with ``sc_w[j]`` ([Cout, k, k, C_j]: 1x1, or k x k padded to keep the size), each
    dequantized by its activation scale and per-channel weight scales, plus both biases, rounded once to
    ``out_dtype``."""
    if len(sc_x) != len(sc_w) or len(sc_x) != len(sc_w_scale) or len(sc_x) != len(sc_a_scale) or not sc_x:
        raise ValueError(f"qconv_sc: {len(sc_x)} shortcut sources, {len(sc_w)} weights, {len(sc_w_scale)} weight "
                         f"scales, {len(sc_a_scale)} activation scales (one or more of each, as many)")
    one = [1, 1]
    y = qconv_reference(x, w, w_scale, a_scale, None, None, bias, None, 0, one, list(padding), one, False,
                        torch.float64)
    for j, (xs, ws, wss, sas) in enumerate(zip(sc_x, sc_w, sc_w_scale, sc_a_scale)):
        p = (ws.shape[1] - 1) // 2
        y = y + qconv_reference(xs, ws, wss, sas, None, None, sc_bias if j == 0 else None, None, 0, one, [p, p], one,
                                False, torch.float64)
    res = out_like(x, y.shape[1], y.shape[2], y.shape[3], out_dtype)
    res.copy_(y)
    return res

# ---- activation quantization (plain tensor ops: torch.compile fuses them into the producer) ------
def quantize_act_int8(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      offset: int) -> torch.Tensor:
    """int8 values ``clamp(round(x * inv_scale) + zp, qmin, qmax) - offset`` (computed in fp32, as the
    fake-quant model does; ``inv_scale``/``zero_point`` broadcast against ``x``)."""
    q = torch.clamp(torch.round(x.float() * inv_scale) + zero_point, qmin, qmax)
    return (q - offset).to(torch.int8)


def quantize_act_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float() / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_amax_scale(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """FP8 e4m3 scale(s) of ``x``: absolute maximum (over ``dim``; all of it when None) / 448, fp32, never 0 (no host
    sync)."""
    a = x.detach().abs()
    a = a.amax() if dim is None else a.amax(dim=dim, keepdim=keepdim)
    return (a.float() / FP8_E4M3_MAX).clamp_min(1e-12)


def fp8_token_scales(x2: torch.Tensor) -> torch.Tensor:
    """Per-token FP8 scales of a 2-D activation [tokens, channels]: fp32 [tokens, 1]."""
    return fp8_amax_scale(x2, dim=1, keepdim=True)


def fp8_dynamic_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 scale of ``x``: fp32 [1]."""
    return fp8_amax_scale(x).reshape(1)


# ---- FP8 attention (diffquant::fp8_attention_fp8) ----------------------------------------------------------


def fp8_attention_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One e4m3 scale per (batch, head) for each of Q, K, V: absolute maximum / 448, as fp32 [B*H]."""
    return tuple(fp8_amax_scale(t, dim=(2, 3)).reshape(-1) for t in (q, k, v))


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def attention_out_like(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised attention output [B, H, Sq, D] stored as [B, Sq, H, D] (what the kernel writes: the heads are
    merged back by a free reshape)."""
    bsz, heads, sq, d = q.shape
    return torch.empty((bsz, sq, heads, d), dtype=dtype, device=q.device).permute(0, 2, 1, 3)


def fp8_attention_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scales: Optional[tuple] = None) -> tuple[torch.Tensor, ...]:
    """Q, K, V to e4m3 with one scale per (batch, head) (plain tensor ops: ``torch.compile`` fuses them into the
    producers): ``(q8, k8, v8, s_q, s_k, s_v)``, the values float8_e4m3fn in the inputs' layout, the scales fp32
    [B*H] (absolute maximum / 448 unless ``scales`` are given)."""
    bsz, heads = q.shape[:2]
    sc = scales or fp8_attention_scales(q, k, v)
    return (*(quantize_act_fp8(t, s.view(bsz, heads, 1, 1)) for t, s in zip((q, k, v), sc)), *sc)


def fp8_attention_fp8_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, s_q: torch.Tensor,
                                s_k: torch.Tensor, s_v: torch.Tensor, sm_scale: float, out_dtype: torch.dtype,
                                block_n: int = 64, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention of e4m3 Q, K, V (scales fp32 [B*H]): S = Q8·K8ᵀ x s_q s_k sm_scale; an online softmax over
    key blocks of ``block_n`` whose numerator exp(S - running max) is quantized to e4m3 before the row sum and
    before P8·V8; x s_v; in ``out_dtype``. With ``out_scale`` (fp32 [1]; ``out_dtype`` float8_e4m3fn) the result is
    quantized with it: the next layer's static input quantization, fused. What ``diffquant::fp8_attention_fp8``
    computes (its test oracle)."""
    bsz, heads, sq, d = q8.shape
    s_q, s_k, s_v = (s.float().view(bsz, heads, 1, 1) for s in (s_q, s_k, s_v))
    qf, kf, vf = q8.float(), k8.float(), v8.float()
    m = torch.full((bsz, heads, sq, 1), float("-inf"), device=q8.device)
    den = torch.zeros((bsz, heads, sq, 1), device=q8.device)
    acc = torch.zeros((bsz, heads, sq, d), device=q8.device)
    for start in range(0, k8.shape[2], block_n):
        s = (qf @ kf[:, :, start:start + block_n].transpose(-1, -2)) * (s_q * s_k * sm_scale)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p8 = _to_e4m3(torch.exp(s - m_new))
        den = den * alpha + p8.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p8 @ vf[:, :, start:start + block_n]
        m = m_new
    o = acc * s_v / den
    res = attention_out_like(q8, out_dtype)
    res.copy_(o if out_scale is None else quantize_act_fp8(o, out_scale.float().reshape(())))
    return res


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                            scales: Optional[tuple] = None, block_n: int = 64) -> torch.Tensor:
    """What the FP8 attention computes, in plain PyTorch (its test oracle): Q, K, V quantized to e4m3 with one
    scale per (batch, head) (:func:`fp8_attention_quantize`), then :func:`fp8_attention_fp8_reference`; output in
    q's dtype. q [B, H, Sq, D], k/v [B, H, Sk, D]."""
    return fp8_attention_fp8_reference(*fp8_attention_quantize(q, k, v, scales), sm_scale, q.dtype, block_n)


# ---- bf16 / fp16 flash attention (diffquant::flash_attention) ------------------------------------------------

# score elements (query rows x keys x batch x heads) the reference holds at once: 2^26 (256 MB in fp32)
FLASH_REFERENCE_CHUNK = 1 << 26


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q·Kᵀ x ``scale``)·V with no mask, computed in fp32 (fp64 for fp64 inputs), rounded once to q's dtype;
    q [B, H, Sq, D], k/v [B, H, Sk, D], any strides. The result [B, H, Sq, D] is stored as [B, Sq, H, D]
    (:func:`attention_out_like`: the heads merge back by a free reshape), the layout the Gluon kernel writes. What
    ``diffquant::flash_attention`` computes (its test oracle, and its path where the kernel does not run); the query
    rows are taken in chunks so that the scores never hold more than :data:`FLASH_REFERENCE_CHUNK` elements."""
    ct = torch.promote_types(q.dtype, torch.float32)
    bsz, heads, sq, _ = q.shape
    out = attention_out_like(q, q.dtype)
    kt, vf = k.to(ct).transpose(-1, -2), v.to(ct)
    rows = max(1, FLASH_REFERENCE_CHUNK // max(1, bsz * heads * k.shape[2]))
    for i in range(0, sq, rows):
        s = (q[:, :, i:i + rows].to(ct) @ kt) * scale
        out[:, :, i:i + rows] = torch.softmax(s, dim=-1) @ vf
    return out


# ---- group norm + SiLU + quantization (diffquant::group_norm_act) ------------------------------------------


def group_norm_act_reference(x: torch.Tensor, x2: Optional[torch.Tensor], add_nc: Optional[torch.Tensor],
                             weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, silu: bool,
                             out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                             out_zp: Optional[torch.Tensor] = None, qmin: int = 0, qmax: int = 0,
                             qoffset: int = 0) -> torch.Tensor:
    """GroupNorm over the channel concatenation of ``x`` and ``x2`` (when given) plus ``add_nc`` ([N, C], broadcast
    over the pixels: a time embedding), affine, SiLU if ``silu``, in float64 (PyTorch's fp32 CPU group norm loses
    3 digits at an input mean of 100); then y as fp32 and, with ``out_scale`` (fp32 [1] or [C]: the consumer's static
    FP8 input scale, per channel for a split layer), e4m3 values of y / out_scale; ``out_dtype`` int8: the consumer's
    integer input quantization (:func:`quantize_act_int8`; ``out_scale`` is then its inverse scale, ``out_zp`` its
    zero point, both [1] or [C]); else y in ``out_dtype``. Channels-last output [N, C, H, W]. What
    ``diffquant::group_norm_act`` computes (its test oracle)."""
    xc = x.double() if x2 is None else torch.cat([x.double(), x2.double()], dim=1)
    if add_nc is not None:
        xc = xc + add_nc.double()[:, :, None, None]
    y = F.group_norm(xc, num_groups, weight.double(), bias.double(), eps)
    if silu:
        y = F.silu(y)
    return _quantize_out(y.float(), out_scale, out_dtype, out_zp, qmin, qmax, qoffset)


def row_stats_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, output row and channel of ``y`` [N, C, H, W]: the mean and the sum of squared deviations of the
    row's W values (as stored: ``y`` in its own dtype, then fp32), each [N, H, C] fp32. What ``diffquant::qconv_stats``
    returns beside the conv output: the partial statistics a following group norm combines
    (:func:`group_norm_act_stats_reference`) instead of reading the output once more."""
    v = y.float().permute(0, 2, 3, 1)  # [N, H, W, C]
    mean = v.mean(dim=2)
    return mean.contiguous(), ((v - mean[:, :, None, :]) ** 2).sum(dim=2).contiguous()


def combine_row_stats(mean: torch.Tensor, m2: torch.Tensor, width: int, num_groups: int,
                      add_nc: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan's combination of per-row partials ([N, H, C] means and sums of squared deviations of ``width`` values
    each) into each (image, group)'s mean and variance, [N, G] float64; ``add_nc`` [N, C] shifts every channel's
    mean (a per-(image, channel) addend leaves the deviations unchanged)."""
    n, h, c = mean.shape
    m = mean.double() + (add_nc.double()[:, None, :] if add_nc is not None else 0.0)
    m = m.reshape(n, h, num_groups, c // num_groups)
    q = m2.double().reshape(n, h, num_groups, c // num_groups)
    gmean = m.mean(dim=(1, 3))
    var = (q.sum(dim=(1, 3)) + width * ((m - gmean[:, None, :, None]) ** 2).sum(dim=(1, 3))) / (h * width * c //
                                                                                                 num_groups)
    return gmean, var


def group_norm_act_stats_reference(x: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                                   add_nc: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                                   num_groups: int, eps: float, silu: bool, out_scale: Optional[torch.Tensor],
                                   out_dtype: torch.dtype, out_zp: Optional[torch.Tensor] = None, qmin: int = 0,
                                   qmax: int = 0, qoffset: int = 0) -> torch.Tensor:
    """:func:`group_norm_act_reference` of ``x`` (+ ``add_nc``) with the group statistics taken from ``x``'s per-row
    partials (``mean``, ``m2``: :func:`row_stats_reference` of ``x``, as ``diffquant::qconv_stats`` returns them)
    instead of from ``x``. The partials are used as given: they are not checked against ``x``."""
    nb, c, h, w = x.shape
    gmean, var = combine_row_stats(mean, m2, w, num_groups, add_nc)
    xc = x.double() + (add_nc.double()[:, :, None, None] if add_nc is not None else 0.0)
    cpg = c // num_groups
    mu = gmean.repeat_interleave(cpg, dim=1)[:, :, None, None]
    rs = (1.0 / torch.sqrt(var + eps)).repeat_interleave(cpg, dim=1)[:, :, None, None]
    y = (xc - mu) * rs * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]
    if silu:
        y = F.silu(y)
    return _quantize_out(y.float(), out_scale, out_dtype, out_zp, qmin, qmax, qoffset)


def _quantize_out(y: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype, zp: Optional[torch.Tensor],
                  qmin: int, qmax: int, qoffset: int) -> torch.Tensor:
    """``y`` quantized for its consumer (e4m3 with ``scale``, int8 codes with inverse ``scale`` and ``zp``; [1] or
    [C] each) or cast to ``dtype``, channels-last."""
    per_ch = lambda v: v.float().reshape(() if v.numel() == 1 else (1, -1, 1, 1))  # noqa: E731
    if dtype == torch.int8:
        y = quantize_act_int8(y, per_ch(scale), per_ch(zp), qmin, qmax, qoffset)
    elif scale is not None:
        y = quantize_act_fp8(y, per_ch(scale))
    else:
        y = y.to(dtype)
    return y.contiguous(memory_format=torch.channels_last)


def group_norm_act_dual_reference(x: torch.Tensor, x2: Optional[torch.Tensor], weight: torch.Tensor,
                                  bias: torch.Tensor, num_groups: int, eps: float, silu: bool,
                                  out_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                                  out_zp: Optional[torch.Tensor], qmin: int, qmax: int, qoffset: int,
                                  raw_scale: torch.Tensor, raw_dtype: torch.dtype, raw_zp: Optional[torch.Tensor],
                                  rqmin: int, rqmax: int, rqoffset: int) -> tuple:
    """``(group_norm_act_reference(...), the raw input cat(x, x2) quantized for a second consumer)``: a ResNet block's
    norm1 output for conv1 and its input for the shortcut conv, from one read of the input. The raw codes are what
    the consumer's own input quantization computes (:func:`quantize_act_fp8` / :func:`quantize_act_int8` of the
    input values). What ``diffquant::group_norm_act_dual`` computes."""
    normed = group_norm_act_reference(x, x2, None, weight, bias, num_groups, eps, silu, out_scale, out_dtype, out_zp,
                                      qmin, qmax, qoffset)
    xc = x if x2 is None else torch.cat([x, x2], dim=1)
    return normed, _quantize_out(xc.float(), raw_scale, raw_dtype, raw_zp, rqmin, rqmax, rqoffset)


def linear_geglu_reference(xq: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                           bias: Optional[torch.Tensor], out_scale: Optional[torch.Tensor],
                           out_dtype: torch.dtype) -> torch.Tensor:
    """diffusers' GEGLU on a quantized Linear, and the next layer's input quantization: with
    ``y = (xq @ w.T) * a_scale * w_scale + bias`` (xq [M, K] and w [2I, K] e4m3, accumulated in float64) split into
    ``h, g = y[:, :I], y[:, I:]``, the result is ``h * gelu(g)`` (exact erf GELU, as diffusers' ``F.gelu``) as e4m3
    values of ``/ out_scale`` ([1] or [I]) when ``out_dtype`` is float8_e4m3fn, else in ``out_dtype``."""
    y = (xq.double() @ w.double().t()) * (a_scale.double().reshape(-1)[0] * w_scale.double().reshape(1, -1))
    if bias is not None:
        y = y + bias.double().reshape(1, -1)
    i = w.shape[0] // 2
    o = (y[:, :i] * torch.nn.functional.gelu(y[:, i:])).float()
    if out_dtype == torch.float8_e4m3fn:
        if out_scale is None:
            raise ValueError("linear_geglu: an e4m3 output needs out_scale")
        return quantize_act_fp8(o, out_scale.float().reshape(1, -1))
    return o.to(out_dtype)


def add_layer_norm_reference(y: torch.Tensor, y_scale: Optional[torch.Tensor], y_bias: Optional[torch.Tensor],
                             residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float, out_scale: Optional[torch.Tensor],
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformer block's ``h = proj_out + residual`` and ``LayerNorm(h)`` quantized for the next GEMM, with the
    unfused model's rounding steps: ``z = (y * y_scale + y_bias)`` rounded to ``y``'s dtype (the projection's
    dequantized output; skipped when neither is given), ``h = z + residual`` rounded to it, ``n = LayerNorm(h)``
    (fp32 statistics, ``F.layer_norm``) rounded to it, and the output ``clamp(n / out_scale)`` as e4m3 when
    ``out_dtype`` is float8_e4m3fn (``out_scale``: [1] or [C]), else ``n`` in ``out_dtype``. Returns ``(h, out)``;
    ``h`` is an empty tensor when it would equal ``y`` (no scale, bias or residual)."""
    z = y
    if y_scale is not None or y_bias is not None:
        zf = y.float()
        if y_scale is not None:
            zf = zf * y_scale.float()
        if y_bias is not None:
            zf = zf + y_bias.float()
        z = zf.to(y.dtype)
    if residual is not None:
        z = (z.float() + residual.float()).to(y.dtype)
    c = y.shape[-1]
    n = torch.nn.functional.layer_norm(z.float(), (c,), None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps).to(y.dtype)
    if out_dtype == torch.float8_e4m3fn:
        if out_scale is None:
            raise ValueError("add_layer_norm: an e4m3 output needs out_scale")
        out = quantize_act_fp8(n, out_scale.float().reshape(-1))
    else:
        out = n.to(out_dtype)
    h = z if z is not y else y.new_empty(0)
    return h, out
