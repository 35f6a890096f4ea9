"""Named metrics over a sample set, their references, and the real-data floor.

==============  ====================  ======================================================
metric          feature space         reference
==============  ====================  ======================================================
``fd_cifar``    zoo cifar10-features  bundled CIFAR-10-JPEG statistics of ``ref`` split
``kid_cifar``   zoo cifar10-features  features of the ``ref`` split (computed once, cached)
``pr_cifar``    zoo cifar10-features  same, subsampled to the number of samples
``is_cifar``    zoo classifier logits none (10 classes)
``fid``         FID Inception-v3      ``fid_ref_stats`` file, else ``ref`` split (cached)
``kid``         FID Inception-v3      features of the ``ref`` split (cached)
``pr``          FID Inception-v3      same, subsampled to the number of samples
``is``          Inception logits      none (1008 classes)
==============  ====================  ======================================================

``fd_cifar`` is the Fréchet distance in the zoo classifier's feature space; it is *not* FID and is
never called so. For Fréchet metrics the result carries the *real-data floor*: the FD between a
random subset of real images of the same size (from the other split) and the reference statistics
— what a perfect generator would score with that many samples.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from diffquant.evaluation.features import (
    FEATURE_SPACES,
    SPLITS,
    TorchFeatureExtractor,
    check_images,
    dataset_outputs,
    get_extractor,
    reference_stats,
    reference_stats_path,
)
from diffquant.evaluation.fid import FD_METHODS, FeatureStats, frechet_distance, statistics_from_features
from diffquant.evaluation.metrics import inception_score, kid, precision_recall

log = logging.getLogger(__name__)

__all__ = ["METRICS", "MetricSpec", "MetricResult", "evaluate_images", "parse_metrics", "json_safe"]


def json_safe(obj: Any) -> Any:
    """Recursively turn numpy values into Python ones and non-finite floats (PSNR of identical
    images, ...) into ``None``, so that the output is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True)
class MetricSpec:
    name: str
    space: str
    kind: str  # "fd" | "kid" | "pr" | "is"
    description: str


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("fd_cifar", "cifar10-features", "fd", "Fréchet distance in the zoo CIFAR-10-JPEG classifier's feature space"),
        MetricSpec("kid_cifar", "cifar10-features", "kid", "KID (unbiased MMD², cubic kernel) in the zoo classifier's feature space"),
        MetricSpec("pr_cifar", "cifar10-features", "pr", "precision/recall (k-NN manifolds, k=3) in the zoo classifier's feature space"),
        MetricSpec("is_cifar", "cifar10-features", "is", "Inception-Score formula on the zoo classifier's 10-class logits"),
        MetricSpec("fid", "inception", "fd", "FID: Fréchet distance in FID Inception-v3 pool3 features"),
        MetricSpec("kid", "inception", "kid", "KID in FID Inception-v3 pool3 features"),
        MetricSpec("pr", "inception", "pr", "precision/recall in FID Inception-v3 pool3 features"),
        MetricSpec("is", "inception", "is", "Inception Score (FID Inception-v3, 1008 logits)"),
    )
}


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ValueError(f"no metrics given; allowed: {', '.join(METRICS)}")
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, bad))}; allowed: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@dataclass
class MetricResult:
    metric: str
    value: float
    std: float | None = None
    reference: str = ""
    floor: float | None = None
    floor_note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None and v != {}}


def _other(split: str) -> str:
    return "test" if split == "train" else "train"


class _References:
    """Lazily computed reference features/statistics per feature space (shared across metrics)."""

    def __init__(self, extractors: dict[str, TorchFeatureExtractor], ref: str, data_dir, cache, progress: bool,
                 fid_ref_stats: str | os.PathLike | None) -> None:
        self.extractors = extractors
        self.ref = ref
        self.data_dir = data_dir
        self.cache = cache
        self.progress = progress
        self.fid_ref_stats = fid_ref_stats
        self._outs: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def outputs(self, space: str, split: str) -> dict[str, np.ndarray]:
        key = (space, split)
        if key not in self._outs:
            want = ("features", "logits") if FEATURE_SPACES[space].has_logits else ("features",)
            self._outs[key] = dataset_outputs(self.extractors[space], split, want, self.data_dir, self.cache,
                                              self.progress)
        return self._outs[key]

    def stats(self, space: str) -> tuple[FeatureStats, str]:
        if space == "inception" and self.fid_ref_stats is not None:
            st = FeatureStats.load(self.fid_ref_stats)
            if st.dim != 2048:
                raise ValueError(f"{self.fid_ref_stats}: FID reference statistics must be 2048-d; got {st.dim}")
            return st, f"statistics file {os.fspath(self.fid_ref_stats)}"
        if FEATURE_SPACES[space].bundled_stats and reference_stats_path(space, self.ref).is_file():
            st = reference_stats(space, self.ref)
            return st, f"CIFAR-10-JPEG {self.ref} (bundled statistics, n={st.n})"
        feats = self.outputs(space, self.ref)["features"]
        return statistics_from_features(feats), f"CIFAR-10-JPEG {self.ref} (n={feats.shape[0]}, computed, cached)"


def _fd_floor(refs: _References, space: str, ref_stats: FeatureStats, ref_desc: str, n: int, seed: int,
              method: str = "sqrtm") -> tuple[float | None, str]:
    """FD of ``n`` real images of the other split vs the reference statistics."""
    other = _other(refs.ref)
    try:
        feats = refs.outputs(space, other)["features"]
    except (ValueError, OSError) as e:
        if (FEATURE_SPACES[space].bundled_stats and reference_stats_path(space, other).is_file()
                and not (space == "inception" and refs.fid_ref_stats is not None)):
            st = reference_stats(space, other)
            log.warning("real-data floor: %s images not readable (%s); using bundled full-split statistics", other, e)
            return (st.distance(ref_stats, method=method),
                    f"bundled CIFAR-10-JPEG {other} statistics (n={st.n}) vs {ref_desc} — NOT the same sample "
                    f"count ({n}); the {other} images were not readable")
        log.warning("real-data floor not computed: %s", e)
        return None, f"not computed: {e}"
    if n >= feats.shape[0]:
        more = f" (fewer than the {n} samples)" if n > feats.shape[0] else ""
        return (statistics_from_features(feats).distance(ref_stats, method=method),
                f"all {feats.shape[0]} CIFAR-10-JPEG {other} images vs {ref_desc}{more}")
    idx = np.random.default_rng(seed).choice(feats.shape[0], n, replace=False)
    return (statistics_from_features(feats[idx]).distance(ref_stats, method=method),
            f"random {n} CIFAR-10-JPEG {other} images (seed {seed}) vs {ref_desc}")


def evaluate_images(
    images: np.ndarray,
    metrics: str | Sequence[str],
    *,
    ref: str = "train",
    device: str = "cpu",
    batch_size: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    verify_inception: bool = True,
    fid_ref_stats: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    cache: str | os.PathLike | None | bool = None,
    floor: bool = True,
    resize: str = "error",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    is_splits: int = 10,
    seed: int = 0,
    fd_method: str = "sqrtm",
    stats_out: str | os.PathLike | None = None,
    progress: bool = True,
    extractors: dict[str, TorchFeatureExtractor] | None = None,
) -> list[MetricResult]:
    """Compute the named ``metrics`` on uint8 (N, H, W, C) ``images``. See the module docstring.

    ``extractors`` overrides the feature networks per space (tests, custom networks)."""
    names = parse_metrics(metrics)
    if ref not in SPLITS:
        raise ValueError(f"ref must be one of {SPLITS}; got {ref!r}")
    if fd_method not in FD_METHODS:
        raise ValueError(f"fd_method must be one of {FD_METHODS}; got {fd_method!r}")
    images = check_images(images, "samples")
    n = images.shape[0]
    specs = [METRICS[m] for m in names]
    for s in specs:
        if s.kind in ("fd", "kid", "pr") and n < 2:
            raise ValueError(f"{s.name} needs at least 2 samples; got {n}")
    extractors = dict(extractors or {})
    spaces = list(dict.fromkeys(s.space for s in specs))
    for space in spaces:
        if space not in extractors:
            kw: dict[str, Any] = {"device": device, "resize": resize}
            if batch_size is not None:
                kw["batch_size"] = batch_size
            if space == "inception":
                kw.update(inception_weights=inception_weights, verify=verify_inception)
            extractors[space] = get_extractor(space, **kw)

    # One pass over the samples per feature space, with every output some metric needs.
    sample_outs: dict[str, dict[str, np.ndarray]] = {}
    for space in spaces:
        want = tuple(dict.fromkeys("logits" if s.kind == "is" else "features" for s in specs if s.space == space))
        sample_outs[space] = extractors[space].extract(images, want, progress=progress)
        if stats_out is not None and "features" in sample_outs[space] and n >= 2:
            path = os.path.join(os.fspath(stats_out), f"{space}.npz")
            statistics_from_features(sample_outs[space]["features"]).save(path)
            log.info("saved %s statistics of the samples to %s", space, path)

    refs = _References(extractors, ref, data_dir, cache, progress, fid_ref_stats)
    results: list[MetricResult] = []
    for s in specs:
        outs = sample_outs[s.space]
        if s.kind == "fd":
            st, ref_desc = refs.stats(s.space)
            mine = statistics_from_features(outs["features"])
            if mine.dim != st.dim:
                raise ValueError(f"{s.name}: sample features are {mine.dim}-d but the reference statistics are {st.dim}-d")
            res = MetricResult(s.name, frechet_distance(mine.mu, mine.sigma, st.mu, st.sigma, method=fd_method),
                               reference=ref_desc)
            if floor:
                res.floor, res.floor_note = _fd_floor(refs, s.space, st, ref_desc, n, seed, fd_method)
        elif s.kind == "kid":
            real = refs.outputs(s.space, ref)["features"]
            m = min(kid_subset_size, n, real.shape[0])
            mean, std = kid(outs["features"], real, num_subsets=kid_subsets, subset_size=m, seed=seed)
            res = MetricResult(s.name, mean, std, reference=f"CIFAR-10-JPEG {ref} features (n={real.shape[0]})",
                               extra={"subsets": kid_subsets, "subset_size": m})
        elif s.kind == "pr":
            real = refs.outputs(s.space, ref)["features"]
            if real.shape[0] > n:
                real = real[np.sort(np.random.default_rng(seed).choice(real.shape[0], n, replace=False))]
            pr = precision_recall(real, outs["features"], k=pr_k, device=device)
            ref_desc = f"{real.shape[0]} CIFAR-10-JPEG {ref} images"
            results.append(MetricResult(f"{s.name}.precision", pr["precision"], reference=ref_desc, extra={"k": pr_k}))
            results.append(MetricResult(f"{s.name}.recall", pr["recall"], reference=ref_desc, extra={"k": pr_k}))
            continue
        elif s.kind == "is":
            splits = min(is_splits, n)
            mean, std = inception_score(outs["logits"], splits=splits)
            res = MetricResult(s.name, mean, std, reference="none", extra={"splits": splits})
        else:  # pragma: no cover - registry invariant
            raise AssertionError(s.kind)
        results.append(res)
    return results
