"""Feature extraction for image-quality metrics, and the registry of named feature spaces.

A :class:`FeatureExtractor` turns uint8 NHWC images into float64 arrays in batches with a progress
bar. :class:`TorchFeatureExtractor` wraps any torch module that has a ``features(x)`` method (the
zoo CIFAR classifier, :class:`~diffquant.evaluation.inception.FIDInceptionV3`) or any callable
``f(x) -> (N, D)``; ``x`` is float NCHW in [0, 1] on the extractor's device.

Resizing policy (explicit, never silent):

* ``input_size=None``: images go to the network at their own size (the FID Inception network
  resizes to 299x299 itself, bilinear, as pytorch-fid does);
* ``input_size=(H, W)`` with ``resize="error"`` (default): images of another size are refused with a
  ``ValueError``; with ``resize="bilinear"`` they are resized (``align_corners=False``, no
  antialiasing).

Single-channel images are repeated to three channels; other channel counts are refused.

Named feature spaces (:data:`FEATURE_SPACES`): ``"cifar10-features"`` (the zoo classifier
``zoo:cifar10-features``; reference statistics bundled under ``diffquant/zoo/stats/``) and
``"inception"`` (FID Inception-v3; weights from a local file).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffquant.evaluation.fid import FeatureStats, statistics_from_features

log = logging.getLogger(__name__)

__all__ = [
    "FeatureExtractor",
    "TorchFeatureExtractor",
    "FEATURE_SPACES",
    "RESIZE_POLICIES",
    "get_extractor",
    "reference_stats",
    "reference_stats_path",
    "STATS_DIR",
    "find_dataset_split",
    "dataset_outputs",
    "cache_dir",
    "module_fingerprint",
    "check_images",
]

RESIZE_POLICIES = ("error", "bilinear")
OUTPUTS = ("features", "logits")

#: Where the zoo helper bundles reference statistics: ``{STATS_DIR}/{space}_{split}.npz`` with keys
#: ``mu``, ``sigma``, ``n`` (see :func:`reference_stats_path`).
STATS_DIR = Path(__file__).resolve().parent.parent / "zoo" / "stats"
SPLITS = ("train", "test")


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate a uint8 (N, H, W, C) array with C in {1, 3}; returns it unchanged."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{what} must be uint8 with shape (N, H, W, C); got {images.dtype} {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels (last axis); got {images.shape[-1]}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 images)")
    return images


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 NHWC images to float64 feature arrays, in batches."""

    name: str

    def extract(
        self, images: np.ndarray, outputs: Sequence[str] = ("features",), progress: bool = True
    ) -> dict[str, np.ndarray]:
        """Return ``{output: float64 (N, D)}`` for each requested output ("features", "logits")."""
        ...

    def fingerprint(self) -> str:
        """A string that changes whenever the features could change (used as a cache key)."""
        ...


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, values), in key order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TorchFeatureExtractor:
    """Batched feature extraction through a torch module or callable (see module docstring).

    ``model``: a module with ``features(x)`` (and optionally ``features_and_logits(x)`` or
    ``logits_from_features(f)``, used for the "logits" output; otherwise logits are ``model(x)``), or
    any callable returning (N, D) features.
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
        name: str,
        *,
        input_size: tuple[int, int] | None = None,
        resize: str = "error",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        fingerprint: str | None = None,
    ) -> None:
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}; got {resize!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
            raise ValueError(f"input_size must be (H, W) with positive sizes or None; got {input_size}")
        self.model = model
        self.name = name
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.resize = resize
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._fingerprint = fingerprint
        if isinstance(model, torch.nn.Module):
            model.to(self.device).eval()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            if isinstance(self.model, torch.nn.Module):
                self._fingerprint = module_fingerprint(self.model)
            else:
                self._fingerprint = getattr(self.model, "__qualname__", type(self.model).__name__)
            size = "any" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
            self._fingerprint = f"{self.name}|{size}|{self.resize}|{self._fingerprint}"
        return self._fingerprint

    def _to_input(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            if self.resize == "error":
                raise ValueError(
                    f"feature space {self.name!r} expects {self.input_size[0]}x{self.input_size[1]} images; got "
                    f"{x.shape[-2]}x{x.shape[-1]} (allow resizing explicitly with resize='bilinear' / --resize bilinear)"
                )
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=False)
        return x

    def _forward(self, x: torch.Tensor, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
        m = self.model
        want_logits = "logits" in outputs
        want_feats = "features" in outputs
        if want_logits and want_feats and hasattr(m, "features_and_logits"):
            f, lg = m.features_and_logits(x)
            return {"features": f, "logits": lg}
        res: dict[str, torch.Tensor] = {}
        f = None
        if want_feats or (want_logits and hasattr(m, "logits_from_features")):
            f = m.features(x) if hasattr(m, "features") else m(x)
            if want_feats:
                res["features"] = f
        if want_logits:
            if hasattr(m, "logits_from_features"):
                res["logits"] = m.logits_from_features(f)
            elif isinstance(m, torch.nn.Module) and hasattr(m, "features"):
                res["logits"] = m(x)
            else:
                raise ValueError(f"feature space {self.name!r} provides no logits (needed for the Inception Score)")
        return res

    @torch.no_grad()
    def extract(
        self, images: np.ndarray, outputs: Sequence[str] = ("features",), progress: bool = True
    ) -> dict[str, np.ndarray]:
        images = check_images(images)
        outputs = tuple(dict.fromkeys(outputs))
        bad = [o for o in outputs if o not in OUTPUTS]
        if bad or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}; got {outputs}")
        n = images.shape[0]
        chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        # Full fp32 everywhere: TF32 off (as when the bundled reference statistics were computed),
        # so features on CUDA match CPU ones to float32 rounding.
        old_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with tqdm(total=n, unit="img", desc=f"{self.name} features", disable=not progress, leave=False) as bar:
                for lo in range(0, n, self.batch_size):
                    res = self._forward(self._to_input(images[lo:lo + self.batch_size]), outputs)
                    for o in outputs:
                        t = res[o]
                        if t.ndim != 2:
                            t = t.reshape(t.shape[0], -1)
                        chunks[o].append(t.detach().to("cpu", torch.float64).numpy())
                    bar.update(min(self.batch_size, n - lo))
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old_tf32
        out = {o: np.concatenate(c, axis=0) for o, c in chunks.items()}
        for o, a in out.items():
            if not np.all(np.isfinite(a)):
                raise ValueError(f"feature space {self.name!r} produced non-finite {o}")
        return out

    def features(self, images: np.ndarray, progress: bool = True) -> np.ndarray:
        return self.extract(images, ("features",), progress)["features"]

    def statistics(self, images: np.ndarray, progress: bool = True) -> FeatureStats:
        return statistics_from_features(self.features(images, progress))


# ---------------------------------------------------------------------------------------------
# Named feature spaces


@dataclass(frozen=True)
class FeatureSpace:
    name: str
    description: str
    build: Callable[..., TorchFeatureExtractor]
    has_logits: bool
    bundled_stats: bool


def _build_cifar10_features(device: str | torch.device = "cpu", batch_size: int = 256, resize: str = "error",
                            **_: object) -> TorchFeatureExtractor:
    from diffquant import zoo

    if "cifar10-features" not in zoo.available():
        raise ValueError(
            "the zoo feature network 'cifar10-features' (needed by fd_cifar, kid_cifar, pr_cifar, is_cifar) is not "
            f"bundled yet in this version of diffquant; available zoo models: {', '.join(zoo.available())}"
        )
    zm = zoo.load("cifar10-features", device=device)
    size = zm.card.get("input_size", (32, 32)) if isinstance(zm.card, dict) else (32, 32)
    if isinstance(size, int):
        size = (size, size)
    return TorchFeatureExtractor(zm.model, "cifar10-features", input_size=tuple(size), resize=resize,
                                 device=device, batch_size=batch_size)


def _build_inception(device: str | torch.device = "cpu", batch_size: int = 64, resize: str = "error",
                     inception_weights: str | os.PathLike | None = None, verify: bool = True,
                     **_: object) -> TorchFeatureExtractor:
    from diffquant.evaluation.inception import fid_inception_v3

    model = fid_inception_v3(inception_weights, device=device, verify=verify)
    # input_size=None: the network resizes to 299x299 itself (bilinear), the FID convention.
    return TorchFeatureExtractor(model, "inception", input_size=None, resize=resize, device=device,
                                 batch_size=batch_size)


FEATURE_SPACES: dict[str, FeatureSpace] = {
    "cifar10-features": FeatureSpace(
        "cifar10-features", "zoo CIFAR-10-JPEG classifier features (FD_cifar; not comparable with Inception FID)",
        _build_cifar10_features, has_logits=True, bundled_stats=True),
    "inception": FeatureSpace(
        "inception", "FID Inception-v3 pool3 (2048-d) and 1008-way logits; weights from a local file",
        _build_inception, has_logits=True, bundled_stats=False),
}


def get_extractor(space: str, **kwargs: object) -> TorchFeatureExtractor:
    """Build the extractor of a named feature space. kwargs: device, batch_size, resize,
    inception_weights, verify (the last two for "inception")."""
    if space not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {space!r}; allowed: {', '.join(FEATURE_SPACES)}")
    return FEATURE_SPACES[space].build(**kwargs)


def reference_stats_path(space: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"reference split must be one of {SPLITS}; got {split!r}")
    return STATS_DIR / f"{space}_{split}.npz"


def reference_stats(space: str, split: str = "train") -> FeatureStats:
    """Bundled reference statistics of CIFAR-10-JPEG ``split`` in feature space ``space``."""
    path = reference_stats_path(space, split)
    if not path.is_file():
        bundled = sorted(p.name for p in STATS_DIR.glob("*.npz")) if STATS_DIR.is_dir() else []
        raise ValueError(
            f"no bundled reference statistics for feature space {space!r}, split {split!r} (expected {path}); "
            f"bundled: {', '.join(bundled) or 'none'}"
        )
    return FeatureStats.load(path)


# ---------------------------------------------------------------------------------------------
# Real images of CIFAR-10-JPEG and cached features of them


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Feature cache folder: ``explicit``, else ``$DIFFQUANT_CACHE``, else ``~/.cache/diffquant``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("DIFFQUANT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffquant"


def _candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs: list[Path] = []
    env = os.environ.get("DIFFQUANT_CIFAR10_DIR")
    if env:
        dirs.append(Path(env))
    dirs += [Path(".data"), Path("data/cifar10-jpeg"), Path("../shared/data/cifar10-jpeg")]
    return dirs


def find_dataset_split(split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Locate the CIFAR-10-JPEG ``split`` (``{split}.zip``, ``{split}.npz`` or
    ``cifar10-jpeg-{split}.npz`` packed, or a ``{split}/`` folder) in ``data_dir``, else in
    ``$DIFFQUANT_CIFAR10_DIR``, ``./.data`` (the packed copies that travel to the GPU machine),
    ``./data/cifar10-jpeg``, ``../shared/data/cifar10-jpeg``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    tried: list[str] = []
    for d in _candidate_dirs(data_dir):
        for cand in (d / f"{split}.zip", d / f"{split}.npz", d / f"cifar10-jpeg-{split}.npz", d / split):
            tried.append(str(cand))
            if cand.exists():
                return cand
    raise ValueError(
        f"CIFAR-10-JPEG {split!r} split not found; tried {', '.join(tried)} "
        "(pass --data-dir or set DIFFQUANT_CIFAR10_DIR)"
    )


def _file_digest(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dataset_outputs(
    extractor: FeatureExtractor,
    split: str,
    outputs: Iterable[str] = ("features",),
    data_dir: str | os.PathLike | None = None,
    cache: str | os.PathLike | None | bool = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Features (and/or logits) of every image of the CIFAR-10-JPEG ``split``, in dataset order,
    cached as ``.npz`` (float32, no pickle) under :func:`cache_dir` keyed by the extractor's
    fingerprint and the dataset file's SHA-256. ``cache=False`` disables the cache."""
    outputs = tuple(dict.fromkeys(outputs))
    path = find_dataset_split(split, data_dir)
    key = hashlib.sha256(f"{extractor.fingerprint()}|{_file_digest(path)}".encode()).hexdigest()[:20]
    cfile = None
    if cache is not False:
        cfile = cache_dir(None if cache in (None, True) else cache) / "features" / f"{extractor.name}-{split}-{key}.npz"
        if cfile.is_file():
            try:
                with np.load(cfile, allow_pickle=False) as z:
                    if all(o in z.files for o in outputs):
                        log.info("cached %s features of %s: %s", extractor.name, split, cfile)
                        return {o: z[o].astype(np.float64) for o in outputs}
            except (OSError, ValueError, EOFError) as e:
                log.warning("ignoring unreadable feature cache %s: %s", cfile, e)
    from diffquant.data import load_images

    log.info("reading CIFAR-10-JPEG %s from %s", split, path)
    images = load_images(path).images
    # Compute both outputs when the space has logits, so one pass fills the cache for every metric.
    want = tuple(dict.fromkeys(outputs + (("logits",) if "logits" not in outputs and extractor.name in FEATURE_SPACES
                                          and FEATURE_SPACES[extractor.name].has_logits else ())))
    res = extractor.extract(images, want, progress=progress)
    if cfile is not None:
        cfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfile.with_name(cfile.name + ".tmp.npz")
        np.savez_compressed(tmp, **{o: a.astype(np.float32) for o, a in res.items()})
        tmp.replace(cfile)
    return {o: res[o].astype(np.float32).astype(np.float64) for o in outputs}
