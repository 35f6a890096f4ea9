"""Uniform affine (integer) and FP8 quantization: stateless tensor functions.

Conventions
-----------
* An integer grid of ``b`` bits is ``[qmin, qmax]``: ``[0, 2^b - 1]`` for asymmetric schemes,
  ``[-2^(b-1), 2^(b-1) - 1]`` for symmetric ones (zero point 0).
* ``q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)``; ``x̂ = (q - zero_point) * scale``
  (multiplication by the reciprocal, in the input's dtype, exactly as PyTorch's fused
  ``fake_quantize_per_tensor_affine`` does, so the fused fast path and this reference agree bit for bit).
* ``scale`` and ``zero_point`` broadcast against ``x`` (see :func:`group_view` for per-channel
  and per-group layouts); ``zero_point`` is a float tensor holding integer values.
* :func:`fake_quantize` is differentiable: rounding uses a straight-through estimator, the
  clamp zeroes the gradient outside the range, and gradients reach ``scale`` (LSQ-style).
"""
from __future__ import annotations

import torch

from diffquant.config import QuantScheme

FP8_E4M3_MAX = 448.0


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} inf); quantization needs finite data")


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[xmin, xmax]`` (widened to include 0) onto the grid."""
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = (absmax / qmax).clamp_min(eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(eps)
        zero_point = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as a float tensor with integer values) of ``x``."""
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; differentiable in ``x`` and ``scale``."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.clamp(round_ste(x * (1.0 / scale)) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quantize_fused(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-tensor fake quantization through PyTorch's fused kernel (one pass over ``x``).

    Same values as :func:`fake_quantize`; the gradient reaches ``x`` (STE inside the range) but
    not ``scale``. Falls back to :func:`fake_quantize` for dtypes the fused kernel lacks, and under
    ``torch.compile`` (the fused op has no fake-tensor implementation: a graph break; Inductor fuses the plain ops).
    """
    if x.dtype != torch.float32 or scale.numel() != 1 or torch.compiler.is_compiling():
        return fake_quantize(x, scale, zero_point, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    return torch.fake_quantize_per_tensor_affine(
        x, scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32), qmin, qmax
    )


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 quantize-dequantize with a scale; identity gradient inside the range."""
    y = torch.clamp(x / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = y.to(torch.float8_e4m3fn).to(x.dtype)
    return (y + (q - y).detach()) * scale


def fp8_scale_from_range(xmin: torch.Tensor, xmax: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return (torch.maximum(xmin.abs(), xmax.abs()) / FP8_E4M3_MAX).clamp_min(eps)


# ---- granularity ----------------------------------------------------------------------------
def group_view(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View a weight so that one quantization range covers one row of the last dimension.

    per_tensor  -> (1, numel)
    per_channel -> (out_channels, fan_in)
    per_group   -> (out_channels * fan_in / group_size, group_size)
    """
    if scheme.granularity == "per_tensor":
        return w.reshape(1, -1)
    if w.dim() < 2:
        raise ValueError(f"granularity {scheme.granularity!r} needs a weight with >= 2 dims; got shape {tuple(w.shape)}")
    rows = w.reshape(w.shape[0], -1)
    if scheme.granularity == "per_channel":
        return rows
    gs = scheme.group_size
    fan_in = rows.shape[1]
    if fan_in % gs != 0:
        raise ValueError(
            f"group_size={gs} does not divide the weight's input size {fan_in} (shape {tuple(w.shape)}); "
            f"allowed group sizes divide {fan_in}"
        )
    return rows.reshape(-1, gs)


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Fake-quantize a weight with qparams of shape (rows, 1) as laid out by :func:`group_view`."""
    g = group_view(w, scheme)
    if scheme.dtype == "fp8_e4m3":
        out = fake_quantize_fp8(g, scale)
    else:
        out = fake_quantize(g, scale, zero_point, scheme.bits, scheme.symmetric)
    return out.reshape(w.shape)


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    x, xq = x.detach(), xq.detach()
    noise = (x.double() - xq.double()).pow(2).sum()
    signal = x.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
