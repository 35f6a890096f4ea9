"""Range estimators: from data to a quantization range (and from a range to qparams).

* :func:`lp_search` — the Lp-norm clipping search used by BRECQ / Q-Diffusion: candidate ranges
  ``[r·xmin, r·xmax]`` for ``r = 1.00, 0.99, ...`` scored by ``mean |x - Q(x)|^p``; the best
  per row wins (one row = one quantization range, see ``affine.group_view``).
* :class:`ActivationObserver` — accumulates statistics of activations over calibration batches
  with bounded memory (min/max, EMA of batch min/max, and a fixed-size random reservoir for the
  percentile and Lp estimators) and turns them into qparams for a :class:`QuantScheme`.
"""
from __future__ import annotations

import torch

from diffquant.config import QuantScheme
from diffquant.quant.affine import (
    check_finite,
    fake_quantize,
    fake_quantize_fp8,
    fp8_scale_from_range,
    qparams_from_range,
    qrange,
)


def _fq_rows(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme):
    if scheme.dtype == "fp8_e4m3":
        s = fp8_scale_from_range(xmin, xmax)
        return fake_quantize_fp8(x, s), s, torch.zeros_like(s)
    s, z = qparams_from_range(xmin, xmax, scheme.bits, scheme.symmetric)
    if x.dtype == torch.float32 and x.dim() == 2:
        # PyTorch's fused per-row kernel: same values as fake_quantize (checked bit for bit in the tests)
        qmin, qmax = qrange(scheme.bits, scheme.symmetric)
        xq = torch.fake_quantize_per_channel_affine(x, s.reshape(-1), z.reshape(-1).to(torch.int32), 0, qmin, qmax)
        return xq, s, z
    return fake_quantize(x, s, z, scheme.bits, scheme.symmetric), s, z


@torch.no_grad()
def lp_search(x: torch.Tensor, scheme: QuantScheme, p: float | None = None, grid: int | None = None):
    """Per-row Lp clipping search. ``x`` has shape (rows, n). Returns (scale, zero_point) of shape (rows, 1)."""
    p = scheme.lp_p if p is None else p
    grid = scheme.lp_grid if grid is None else grid
    x = x.float()
    xmin = x.amin(dim=1, keepdim=True)
    xmax = x.amax(dim=1, keepdim=True)
    best = torch.full_like(xmin, float("inf"))
    best_s = torch.ones_like(xmin)
    best_z = torch.zeros_like(xmin)
    for i in range(grid):
        r = 1.0 - 0.01 * i
        xq, s, z = _fq_rows(x, xmin * r, xmax * r, scheme)
        score = (x - xq).abs().pow(p).mean(dim=1, keepdim=True)
        better = score < best
        best = torch.where(better, score, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


@torch.no_grad()
def weight_qparams(rows: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams for weight rows (see ``group_view``) with the scheme's estimator."""
    check_finite(rows, "weight")
    rows = rows.float()
    if scheme.estimator == "lp":
        return lp_search(rows, scheme)
    if scheme.estimator == "percentile":
        q = scheme.percentile / 100.0
        xmin = torch.quantile(rows, 1 - q, dim=1, keepdim=True) if rows.shape[1] <= 2**24 else rows.amin(1, keepdim=True)
        xmax = torch.quantile(rows, q, dim=1, keepdim=True) if rows.shape[1] <= 2**24 else rows.amax(1, keepdim=True)
    else:  # minmax and ema are the same thing for a fixed tensor
        xmin = rows.amin(dim=1, keepdim=True)
        xmax = rows.amax(dim=1, keepdim=True)
    _, s, z = _fq_rows(rows[:, :1], xmin, xmax, scheme)
    return s, z


class ActivationObserver:
    """Statistics of one activation tensor over calibration batches, in bounded memory.

    ``reservoir`` values are kept for the percentile and Lp estimators: each batch contributes
    a uniform random subset; when the pool passes ``reservoir_size`` it is halved at random and
    later batches contribute half as many values, so every value seen has the same chance to be
    kept (for equal batch sizes).
    """

    def __init__(self, scheme: QuantScheme, reservoir_size: int = 1 << 20, seed: int = 0):
        self.scheme = scheme
        self.reservoir_size = int(reservoir_size)
        self.per_batch = max(self.reservoir_size // 16, 1)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.ema_min: torch.Tensor | None = None
        self.ema_max: torch.Tensor | None = None
        self.pool: list[torch.Tensor] = []
        self.pool_n = 0
        self.batches = 0
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def needs_samples(self) -> bool:
        return self.scheme.estimator in ("lp", "percentile")

    @torch.no_grad()
    def update(self, x: torch.Tensor, name: str = "activation") -> None:
        x = x.detach()
        check_finite(x, f"calibration data at {name}")
        x = x.float()
        bmin, bmax = x.amin(), x.amax()
        if self.min is None:
            self.min, self.max = bmin.clone(), bmax.clone()
            self.ema_min, self.ema_max = bmin.clone(), bmax.clone()
        else:
            self.min = torch.minimum(self.min, bmin)
            self.max = torch.maximum(self.max, bmax)
            m = self.scheme.ema_momentum
            self.ema_min = m * self.ema_min + (1 - m) * bmin
            self.ema_max = m * self.ema_max + (1 - m) * bmax
        self.batches += 1
        self.device = x.device
        if self.needs_samples:
            flat = x.reshape(-1)
            k = min(self.per_batch, flat.numel())
            idx = torch.randint(flat.numel(), (k,), generator=self.gen).to(flat.device)
            self.pool.append(flat[idx].cpu())
            self.pool_n += k
            while self.pool_n > self.reservoir_size:
                allv = torch.cat(self.pool)
                keep = torch.randperm(allv.numel(), generator=self.gen)[: allv.numel() // 2]
                self.pool = [allv[keep]]
                self.pool_n = self.pool[0].numel()
                self.per_batch = max(self.per_batch // 2, 1)

    @torch.no_grad()
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("observer saw no data")
        est = self.scheme.estimator
        if est == "minmax":
            xmin, xmax = self.min, self.max
        elif est == "ema":
            xmin, xmax = self.ema_min, self.ema_max
        else:
            vals = torch.cat(self.pool)
            if est == "percentile":
                q = self.scheme.percentile / 100.0
                xmin = torch.quantile(vals, 1 - q)
                xmax = torch.quantile(vals, q)
            else:
                # Lp search over the reservoir, starting from the exact running range; on the device
                # the activations came from (80 candidate ranges over up to 1M values: a GPU does
                # this in milliseconds, a busy host CPU can take seconds per quantizer).
                rows = torch.cat([vals, self.min.reshape(1).cpu(), self.max.reshape(1).cpu()]).reshape(1, -1)
                s, z = lp_search(rows.to(getattr(self, "device", rows.device)), self.scheme)
                return s.reshape(()).cpu(), z.reshape(()).cpu()
        _, s, z = _fq_rows(torch.zeros(1, 1), xmin.reshape(1, 1).cpu(), xmax.reshape(1, 1).cpu(), self.scheme)
        return s.reshape(()), z.reshape(())

