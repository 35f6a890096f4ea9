"""Bundled reference models (``zoo:NAME``).

Contract used by the rest of the package (keep it stable):

* ``available() -> list[str]``: names that ``load`` accepts.
* ``load(name, device="cpu") -> ZooModel``: builds the model from its bundled fp16
  safetensors + JSON config (never unpickles anything).
* ``ZooModel`` has ``name``, ``kind`` ("ddpm" | "classifier" | "cm" | "random"),
  ``model`` (an ``nn.Module``; for diffusion kinds a diffusers ``UNet2DModel``),
  ``scheduler`` (a diffusers scheduler instance, or None for classifiers),
  ``card`` (dict: the model card), and ``path`` (folder of the bundled files, or None).

Entries are registered in ``_REGISTRY`` below. ``tiny-random`` is a small randomly
initialised UNet2DModel built from a fixed seed: it exists so that demos and tests
run before (and without) trained weights; it produces noise, not images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class ZooModel:
    name: str
    kind: str
    model: torch.nn.Module
    scheduler: Any = None
    card: dict = field(default_factory=dict)
    path: Path | None = None


_REGISTRY: dict[str, Callable[..., ZooModel]] = {}


def register(name: str) -> Callable[[Callable[..., ZooModel]], Callable[..., ZooModel]]:
    def deco(fn: Callable[..., ZooModel]) -> Callable[..., ZooModel]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _load_entries()
    return sorted(_REGISTRY)


def load(name: str, device: str | torch.device = "cpu") -> ZooModel:
    _load_entries()
    if name.startswith("zoo:"):
        name = name[4:]
    if name not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    zm = _REGISTRY[name]()
    zm.model.to(device).eval()
    return zm


_loaded = False


def _load_entries() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from diffquant.zoo import entries  # noqa: F401  (registers the entries)
