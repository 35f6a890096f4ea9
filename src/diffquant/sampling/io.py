"""Sample sets on disk: ``.npz`` with ``images`` (uint8, N x H x W x C), ``seeds`` (int64, N)
and ``meta`` (a JSON string: model, sampler, steps, ...). Loaded without pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def save_samples(path: str | Path, images: np.ndarray, seeds: np.ndarray, meta: dict[str, Any] | None = None) -> Path:
    images = np.asarray(images)
    seeds = np.asarray(seeds, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 with shape (N, H, W, C); got {images.dtype} {images.shape}")
    if seeds.shape != (images.shape[0],):
        raise ValueError(f"seeds must have shape ({images.shape[0]},); got {seeds.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=images, seeds=seeds, meta=np.array(json.dumps(meta or {})))
    tmp.replace(path)
    return path


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sample file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise ValueError(f"{path}: not a diffquant sample file (no 'images' array; has {sorted(z.files)})")
            images = z["images"]
            seeds = z["seeds"] if "seeds" in z else np.arange(images.shape[0], dtype=np.int64)
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"cannot read sample file {str(path)!r}: {e}") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    return images, seeds, meta
