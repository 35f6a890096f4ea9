"""Distribution metrics over feature arrays: KID, Inception Score, precision/recall.

All functions take float feature (or logit) arrays of shape (N, D), are deterministic given
``seed``, and compute in float64 unless a device/dtype is chosen for the k-NN distances.

* :func:`kid` — Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimator of MMD²
  with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)^3``, averaged over random subsets.
* :func:`inception_score` — exp(E_x KL(p(y|x) || p(y))) from classifier logits, over splits.
* :func:`precision_recall` — Kynkäänniemi et al. 2019: each set is a union of balls around its
  points with radius the distance to the k-th nearest neighbour (k=3); precision is the fraction of
  generated points inside the real manifold, recall the fraction of real points inside the generated
  manifold. Pairwise distances are computed in row batches.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["kid", "mmd2_unbiased", "inception_score", "precision_recall", "knn_radii"]


def _as_feats(x: np.ndarray, what: str, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D); got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{what} needs at least {min_rows} rows; got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains non-finite values (NaN or inf)")
    return x


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (a @ b.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD² between samples ``x`` (m, d) and ``y`` (n, d) with a polynomial kernel
    (``gamma`` defaults to 1/d)."""
    x = _as_feats(x, "x")
    y = _as_feats(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    m, n = x.shape[0], y.shape[0]
    kxx = _poly_kernel(x, x, degree, g, coef0)
    kyy = _poly_kernel(y, y, degree, g, coef0)
    kxy = _poly_kernel(x, y, degree, g, coef0)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two feature sets: mean and standard deviation of the unbiased MMD² over
    ``num_subsets`` random subsets of ``min(subset_size, len(a), len(b))`` rows each (drawn without
    replacement, independently per subset; ``seed`` fixes them)."""
    a = _as_feats(feats_a, "feats_a")
    b = _as_feats(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if int(num_subsets) < 1:
        raise ValueError(f"num_subsets must be >= 1; got {num_subsets}")
    if int(subset_size) < 2:
        raise ValueError(f"subset_size must be >= 2; got {subset_size}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < int(subset_size):
        log.info("KID: subset size reduced from %d to %d (smallest set)", subset_size, m)
    rng = np.random.default_rng(seed)
    vals = np.empty(int(num_subsets))
    for i in range(int(num_subsets)):
        ia = rng.choice(a.shape[0], m, replace=False)
        ib = rng.choice(b.shape[0], m, replace=False)
        vals[i] = mmd2_unbiased(a[ia], b[ib], degree, gamma, coef0)
    return float(vals.mean()), float(vals.std())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits (N, C): mean and std over ``splits`` contiguous splits
    of exp(mean_x KL(p(y|x) || p(y))). Bounds: 1 <= IS <= C."""
    lg = _as_feats(logits, "logits", min_rows=1)
    n = lg.shape[0]
    if int(splits) < 1 or int(splits) > n:
        raise ValueError(f"splits must be between 1 and the number of samples ({n}); got {splits}")
    t = torch.from_numpy(lg)
    logp = torch.log_softmax(t, dim=1)
    scores = []
    for idx in np.array_split(np.arange(n), int(splits)):
        lp = logp[idx]
        # log p(y) of the split: log mean_x p(y|x)
        logpy = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])
        kl = (lp.exp() * (lp - logpy)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


def _rows_per_batch(n_cols: int, budget_elems: int) -> int:
    return max(1, budget_elems // max(1, n_cols))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def knn_radii(
    feats: np.ndarray | torch.Tensor, k: int = 3, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64, budget_elems: int = 1 << 25,
) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the point itself excluded)."""
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats).to(device, dtype)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and N-1 = {n - 1}; got {k}")
    x_sq = (x * x).sum(1)
    out = torch.empty(n, dtype=dtype, device=x.device)
    step = _rows_per_batch(n, budget_elems)
    for lo in range(0, n, step):
        d = _sq_dists(x[lo:lo + step], x, x_sq)
        # The point itself (distance 0) is the smallest; the k-th neighbour is the (k+1)-th value.
        out[lo:lo + step] = d.kthvalue(k + 1, dim=1).values
    return out.sqrt()


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, budget_elems: int) -> torch.Tensor:
    """For each query row: is it within radii[j] of some ref row j?"""
    ref_sq = (ref * ref).sum(1)
    r2 = radii * radii
    inside = torch.empty(query.shape[0], dtype=torch.bool, device=query.device)
    step = _rows_per_batch(ref.shape[0], budget_elems)
    for lo in range(0, query.shape[0], step):
        d = _sq_dists(query[lo:lo + step], ref, ref_sq)
        inside[lo:lo + step] = (d <= r2[None, :]).any(dim=1)
    return inside


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64, budget_elems: int = 1 << 25,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Returns ``{"precision": ..., "recall": ...}``. ``budget_elems`` caps the size of each distance
    block (rows x columns) so memory stays bounded for 50k x 50k comparisons."""
    r = _as_feats(real, "real features", min_rows=k + 1)
    f = _as_feats(fake, "fake features", min_rows=k + 1)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]} vs fake {f.shape[1]}")
    rt = torch.from_numpy(r).to(device, dtype)
    ft = torch.from_numpy(f).to(device, dtype)
    r_rad = knn_radii(rt, k, device, dtype, budget_elems)
    f_rad = knn_radii(ft, k, device, dtype, budget_elems)
    precision = _coverage(ft, rt, r_rad, budget_elems).double().mean().item()
    recall = _coverage(rt, ft, f_rad, budget_elems).double().mean().item()
    return {"precision": float(precision), "recall": float(recall)}
