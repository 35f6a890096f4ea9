"""Fréchet distance between Gaussian feature statistics (FID, FD in any feature space).

Split EDM-style into *statistics* (``FeatureStats``: mean, covariance, count — computed once
per image set and cachable as a compressed ``.npz``, never pickled) and *distance*
(:func:`frechet_distance`).

    d² = ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½)
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

log = logging.getLogger(__name__)

__all__ = ["FD_METHODS", "FeatureStats", "frechet_distance", "statistics_from_features", "fd_from_features"]


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector; got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{which} must have shape {(mu.shape[0], mu.shape[0])} to match mu{which}; got {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{which}/sigma{which} contain non-finite values (NaN or inf)")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy warns (and older versions print) on singular input; we check finiteness ourselves.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return np.asarray(linalg.sqrtm(a))


FD_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) for symmetric PSD S1, S2 (symmetric
    eigendecompositions instead of a general Schur-based square root; no eps offset needed).
    Computed in float64 with torch.linalg (LAPACK of the torch build)."""
    s1 = torch.from_numpy(0.5 * (sigma1 + sigma1.T))
    s2 = torch.from_numpy(0.5 * (sigma2 + sigma2.T))
    w, v = torch.linalg.eigh(s1)
    tol = 1e-6 * max(1.0, float(w.abs().max())) if w.numel() else 0.0
    if w.numel() and float(w.min()) < -tol:
        raise ValueError(f"sigma1 is not positive semi-definite (eigenvalue {float(w.min()):.3g})")
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    ev = torch.linalg.eigvalsh(0.5 * (m + m.T))
    tol = 1e-6 * max(1.0, float(ev.abs().max())) if ev.numel() else 0.0
    if ev.numel() and float(ev.min()) < -tol:
        raise ValueError(f"sigma2 is not positive semi-definite (eigenvalue {float(ev.min()):.3g} of S1^1/2 S2 S1^1/2)")
    return float(ev.clamp_min(0).sqrt().sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``method="sqrtm"`` (default, the pytorch-fid computation): the matrix square root of
    ``sigma1 @ sigma2`` by :func:`scipy.linalg.sqrtm`. When the product is (near-)singular and the
    result is not finite, ``eps * I`` is added to both covariances (the standard treatment). A small
    imaginary component from numerical error is dropped; a large one (max |imag| > 1e-3) raises
    ``ValueError`` since it means the inputs are not valid covariance matrices.

    ``method="eigh"``: the same trace from symmetric eigendecompositions (see
    :func:`_trace_sqrt_product_eigh`); usually faster for large dimensions on a CPU, equal to
    ``sqrtm`` up to rounding for valid (symmetric PSD) covariances.
    """
    if method not in FD_METHODS:
        raise ValueError(f"method must be one of {FD_METHODS}; got {method!r}")
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: mu1 has {mu1.shape[0]}, mu2 has {mu2.shape[0]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")

    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
        return _clip_rounding(value, sigma1, sigma2)
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.all(np.isfinite(covmean)):
        log.warning("Fréchet distance: product of covariances is singular; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError("Fréchet distance: matrix square root is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(covmean.imag))) if covmean.size else 0.0
        if max_imag > 1e-3:
            raise ValueError(
                f"Fréchet distance: imaginary component {max_imag:.3g} in sqrt(sigma1 @ sigma2); "
                "the covariances are not positive semi-definite (or too few samples)"
            )
        covmean = covmean.real
    value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return _clip_rounding(value, sigma1, sigma2)


def _clip_rounding(value: float, sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # Tiny negative values from rounding when the two distributions are identical.
    if value < 0 and value > -1e-6 * max(1.0, float(np.trace(sigma1) + np.trace(sigma2))):
        value = 0.0
    return value


@dataclass(frozen=True)
class FeatureStats:
    """Mean, covariance and sample count of a feature set; saved/loaded as ``.npz`` (keys ``mu``,
    ``sigma``, ``n``; no pickle). ``n`` may be ``None`` for statistics from elsewhere (pytorch-fid's
    ``.npz`` files carry only ``mu`` and ``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self) -> None:
        mu, sigma = _check_stats(self.mu, self.sigma, "")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        if self.n is not None:
            if int(self.n) < 1:
                raise ValueError(f"n (number of samples) must be >= 1 or None; got {self.n}")
            object.__setattr__(self, "n", int(self.n))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path, compressed: bool = True) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics file must end in .npz; got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.int64(self.n)
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"statistics file {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError(f"{path}: not an .npz statistics file")
                missing = {"mu", "sigma"} - set(z.files)
                if missing:
                    raise ValueError(f"{path}: not a statistics file (missing {sorted(missing)}; has {sorted(z.files)})")
                mu, sigma = z["mu"], z["sigma"]
                n = int(z["n"]) if "n" in z.files else None
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot read statistics file {str(path)!r}: {e}") from e
        return cls(mu=mu, sigma=sigma, n=n)

    def distance(self, other: "FeatureStats", eps: float = 1e-6, method: str = "sqrtm") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps, method=method)


def statistics_from_features(feats: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance (``np.cov``, ddof=1) of an (N, D) feature array in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D); got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance; got {feats.shape[0]}")
    if not np.all(np.isfinite(feats)):
        raise ValueError("features contain non-finite values (NaN or inf)")
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return FeatureStats(mu=mu, sigma=np.atleast_2d(sigma), n=feats.shape[0])


def fd_from_features(feats1: np.ndarray, feats2: np.ndarray, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between two feature sets (convenience: statistics, then distance)."""
    return statistics_from_features(feats1).distance(statistics_from_features(feats2), eps=eps, method=method)
