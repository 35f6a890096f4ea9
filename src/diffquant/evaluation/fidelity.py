"""Paired fidelity of a quantized model against full precision, sample by sample (same seeds).

* :func:`mse`, :func:`psnr`, :func:`ssim` — per image, on uint8 images (N, H, W, C) in the 0..255
  range. PSNR uses peak 255 and is ``inf`` for identical images (the mean over a set is taken over the
  finite values and reported with the count of identical pairs). SSIM is Wang et al. 2004: 11x11
  Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, computed
  per channel over the valid region (no padding) and averaged over positions and channels.
* :func:`paired_fidelity` — all three with summaries, after checking that both sets were made from
  the same seeds.
* :class:`TimestepErrorAccumulator` / :func:`timestep_error_summary` — noise-prediction error per
  sampling time step (which steps suffer most from quantization): per-t MSE, relative error
  ||eps_q - eps_fp||² / ||eps_fp||² and the SQNR in dB.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "mse",
    "psnr",
    "ssim",
    "paired_fidelity",
    "check_paired",
    "gaussian_window",
    "TimestepErrorAccumulator",
    "timestep_error_summary",
]

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    for what, x in (("a", a), ("b", b)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"images {what} must be uint8 with shape (N, H, W, C); got {x.dtype} {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"image sets have different shapes: {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("image sets are empty")
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared error per image (0..255 scale), float64 (N,)."""
    a, b = _pair(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return (d * d).reshape(d.shape[0], -1).mean(axis=1)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = PEAK) -> np.ndarray:
    """PSNR in dB per image: 10 log10(peak² / MSE); ``inf`` where the images are identical."""
    m = mse(a, b)
    with np.errstate(divide="ignore"):
        return np.where(m > 0, 10.0 * np.log10(peak * peak / np.where(m > 0, m, 1.0)), np.inf)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size x size), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """SSIM per image (mean over valid positions and channels), float64 (N,)."""
    a, b = _pair(a, b)
    n, h, w, c = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {h}x{w}")
    win = gaussian_window().to(device)[None, None].expand(c, 1, -1, -1).contiguous()
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    out = np.empty(n, dtype=np.float64)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)

    for lo in range(0, n, batch_size):
        x = torch.from_numpy(a[lo:lo + batch_size]).to(device).permute(0, 3, 1, 2).double()
        y = torch.from_numpy(b[lo:lo + batch_size]).to(device).permute(0, 3, 1, 2).double()
        mx, my = filt(x), filt(y)
        sxx = filt(x * x) - mx * mx
        syy = filt(y * y) - my * my
        sxy = filt(x * y) - mx * my
        smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out[lo:lo + batch_size] = smap.mean(dim=(1, 2, 3)).cpu().numpy()
    return out


def check_paired(seeds_a: np.ndarray, seeds_b: np.ndarray, shape_a: Sequence[int], shape_b: Sequence[int]) -> None:
    """Refuse sample sets that were not made from the same seeds in the same order, or differ in shape."""
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f"sample sets have different image shapes: {tuple(shape_a)} vs {tuple(shape_b)}; "
                         "paired metrics need the same number of images of the same size")
    sa, sb = np.asarray(seeds_a), np.asarray(seeds_b)
    if sa.shape != sb.shape or not np.array_equal(sa, sb):
        diff = np.flatnonzero(sa != sb) if sa.shape == sb.shape else []
        where = f"first mismatch at index {int(diff[0])}: {int(sa[diff[0]])} vs {int(sb[diff[0]])}" if len(diff) else \
            f"{sa.shape[0]} vs {sb.shape[0]} seeds"
        raise ValueError(f"sample sets were not made from the same seeds ({where}); paired metrics "
                         "(MSE/PSNR/SSIM) compare image i of one set with image i of the other")


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "min": float(np.min(x)), "max": float(np.max(x))}


def paired_fidelity(a: np.ndarray, b: np.ndarray, seeds_a: np.ndarray | None = None,
                    seeds_b: np.ndarray | None = None, per_image: bool = False) -> dict:
    """MSE, PSNR and SSIM between two uint8 sets made with identical seeds.

    Returns ``{"n", "mse": {mean,std,min,max}, "psnr": {...}, "psnr_identical": count,
    "ssim": {...}}`` (+ per-image arrays under ``"per_image"`` if asked). The PSNR summary is over the
    pairs that differ (finite PSNR); if all pairs are identical it is ``inf``. ``"psnr_of_mean_mse"``
    is the PSNR of the set's mean MSE (finite unless every pair is identical).
    """
    if seeds_a is not None or seeds_b is not None:
        if seeds_a is None or seeds_b is None:
            raise ValueError("give seeds for both sets or for neither")
        check_paired(seeds_a, seeds_b, np.shape(a), np.shape(b))
    a, b = _pair(a, b)
    m = mse(a, b)
    p = psnr(a, b)
    s = ssim(a, b)
    finite = p[np.isfinite(p)]
    mean_mse = float(m.mean())
    res = {
        "n": int(a.shape[0]),
        "mse": _summary(m),
        "psnr": _summary(finite) if finite.size else {k: math.inf for k in ("mean", "std", "min", "max")},
        "psnr_identical": int(np.sum(~np.isfinite(p))),
        "psnr_of_mean_mse": 10.0 * math.log10(PEAK * PEAK / mean_mse) if mean_mse > 0 else math.inf,
        "ssim": _summary(s),
    }
    if per_image:
        res["per_image"] = {"mse": m, "psnr": p, "ssim": s}
    return res


# ---------------------------------------------------------------------------------------------
# Per-time-step noise-prediction error


@dataclass
class _Sums:
    sq_err: float = 0.0
    sq_ref: float = 0.0
    numel: int = 0
    count: int = 0


@dataclass
class TimestepErrorAccumulator:
    """Running sums of the noise-prediction error per time step; feed with :meth:`update`.

    Memory is O(number of time steps), whatever the number of samples."""

    sums: dict[int, _Sums] = field(default_factory=dict)

    def update(self, t: int, eps_fp: torch.Tensor | np.ndarray, eps_q: torch.Tensor | np.ndarray) -> None:
        fp = torch.as_tensor(eps_fp).detach().double()
        q = torch.as_tensor(eps_q).detach().double().to(fp.device)
        if fp.shape != q.shape:
            raise ValueError(f"eps_fp and eps_q differ in shape at t={t}: {tuple(fp.shape)} vs {tuple(q.shape)}")
        s = self.sums.setdefault(int(t), _Sums())
        s.sq_err += float(((q - fp) ** 2).sum())
        s.sq_ref += float((fp ** 2).sum())
        s.numel += fp.numel()
        s.count += fp.shape[0] if fp.ndim > 0 else 1

    def add_sums(self, t: int, sq_err: float, sq_ref: float, numel: int, count: int = 0) -> None:
        """Merge precomputed running sums (e.g. from another process or shard)."""
        s = self.sums.setdefault(int(t), _Sums())
        s.sq_err += float(sq_err)
        s.sq_ref += float(sq_ref)
        s.numel += int(numel)
        s.count += int(count)

    def summary(self) -> list[dict]:
        """One row per time step, ascending t: ``t, mse, rel_err, sqnr_db, n`` where
        ``rel_err = ||eps_q - eps_fp||² / ||eps_fp||²`` and ``sqnr_db = -10 log10(rel_err)``."""
        rows = []
        for t in sorted(self.sums):
            s = self.sums[t]
            if s.numel == 0:
                continue
            rel = s.sq_err / s.sq_ref if s.sq_ref > 0 else (0.0 if s.sq_err == 0 else math.inf)
            sqnr = -10.0 * math.log10(rel) if 0 < rel < math.inf else (math.inf if rel == 0 else -math.inf)
            rows.append({"t": t, "mse": s.sq_err / s.numel, "rel_err": rel, "sqnr_db": sqnr, "n": s.count})
        return rows


def timestep_error_summary(
    data: Mapping[int, Iterable[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]] | Mapping[str, float]],
) -> list[dict]:
    """Per-t error summary from ``{t: [(eps_fp, eps_q), ...]}`` or from running sums
    ``{t: {"sq_err", "sq_ref", "numel"[, "count"]}}``. See :meth:`TimestepErrorAccumulator.summary`."""
    acc = TimestepErrorAccumulator()
    for t, v in data.items():
        if isinstance(v, Mapping):
            missing = {"sq_err", "sq_ref", "numel"} - set(v)
            if missing:
                raise ValueError(f"running sums for t={t} miss {sorted(missing)}; need sq_err, sq_ref, numel")
            acc.add_sums(t, v["sq_err"], v["sq_ref"], v["numel"], v.get("count", 0))
        else:
            for pair in v:
                if len(pair) != 2:
                    raise ValueError(f"t={t}: expected (eps_fp, eps_q) pairs")
                acc.update(t, pair[0], pair[1])
    return acc.summary()
