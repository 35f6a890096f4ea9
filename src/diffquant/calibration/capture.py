"""Time-step-aware calibration data: the full-precision sampler's model inputs (x_t, t, cond).

The full-precision model samples ``num_per_step`` trajectories; at ``num_steps`` sampler steps
spaced uniformly over the trajectory (``k_i = floor(i * steps / num_steps)``), the model's
input is recorded. Memory is bounded and known up front: the whole set is preallocated, and a
set larger than ``max_bytes`` is refused before sampling starts. Saved as safetensors (tensors)
with the metadata as JSON in the safetensors header.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from diffquant.sampling.samplers import SamplerSpec, sample

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    xs: torch.Tensor  # (N, C, H, W) float32: model inputs
    ts: torch.Tensor  # (N,) float64: time steps (integers for DDPM/DDIM, sigma-derived for CM)
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. class_labels (N,)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.xs.shape[0]
        if self.ts.shape != (n,):
            raise ValueError(f"ts must have shape ({n},); got {tuple(self.ts.shape)}")
        for k, v in self.cond.items():
            if v.shape[0] != n:
                raise ValueError(f"cond[{k!r}] has {v.shape[0]} rows; expected {n}")

    def __len__(self) -> int:
        return self.xs.shape[0]

    @property
    def nbytes(self) -> int:
        return self.xs.numel() * self.xs.element_size() + sum(v.numel() * v.element_size() for v in self.cond.values())

    def timesteps_tensor(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.ts[idx]
        return t.long() if torch.all(t == t.round()) else t.float()

    def batch(self, idx: torch.Tensor, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
        x = self.xs[idx].to(device)
        t = self.timesteps_tensor(idx).to(device)
        cond = {k: v[idx].to(device) for k, v in self.cond.items()}
        return x, t, cond

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, device: Any = "cpu") -> Iterator[tuple]:
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield self.batch(order[s : s + batch_size], device)

    def subset(self, n: int, seed: int = 0) -> "CalibrationSet":
        """A random subset of ``n`` rows (stratified over time steps is not guaranteed)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return CalibrationSet(self.xs[idx], self.ts[idx], {k: v[idx] for k, v in self.cond.items()}, dict(self.meta))

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"xs": self.xs.contiguous(), "ts": self.ts.contiguous()}
        tensors.update({f"cond.{k}": v.contiguous() for k, v in self.cond.items()})
        save_file(tensors, str(path), metadata={"diffquant": "calibration-set", "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"calibration file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("diffquant") != "calibration-set":
                    raise ValueError(f"{path} is not a diffquant calibration set (header says {md.get('diffquant')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            if isinstance(e, ValueError) and str(path) in str(e):
                raise
            raise ValueError(f"cannot read calibration file {str(path)!r}: {e}") from e
        cond = {k[5:]: v for k, v in tensors.items() if k.startswith("cond.")}
        return cls(tensors["xs"], tensors["ts"], cond, json.loads(md.get("meta", "{}")))


def step_indices(total_steps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` indices spread uniformly over a trajectory of ``total_steps`` steps."""
    if not (1 <= num_steps <= total_steps):
        raise ValueError(f"num_steps={num_steps} must lie in 1..{total_steps} (the sampler's steps)")
    return np.floor(np.arange(num_steps) * total_steps / num_steps).astype(np.int64)


@torch.no_grad()
def capture_calibration_set(
    model: nn.Module,
    scheduler,
    *,
    num_per_step: int,
    num_steps: int,
    spec: SamplerSpec = SamplerSpec("ddim", 100),
    seed: int = 1_000_000,
    batch_size: int = 64,
    device: Any = None,
    max_bytes: int = 4 << 30,
    progress: bool = True,
) -> CalibrationSet:
    """Sample ``num_per_step`` trajectories with the (full-precision) model and keep its inputs at
    ``num_steps`` uniformly spaced steps: ``num_per_step * num_steps`` rows in all.

    The default seed range (1,000,000+) is disjoint from the default evaluation seeds (0+), so
    calibration never sees the evaluation's initial noise.
    """
    cfg = model.config
    size = cfg.sample_size if not isinstance(cfg.sample_size, (tuple, list)) else cfg.sample_size[0]
    keep = step_indices(spec.steps, num_steps)
    slot_of = {int(k): i for i, k in enumerate(keep)}
    n = num_per_step * len(keep)
    row_bytes = cfg.in_channels * size * size * 4
    if n * row_bytes > max_bytes:
        raise ValueError(
            f"calibration set of {n} inputs needs {n * row_bytes / 2**30:.2f} GiB > max_bytes "
            f"{max_bytes / 2**30:.2f} GiB; lower num_per_step/num_steps or raise max_bytes"
        )
    xs = torch.empty(n, cfg.in_channels, size, size, dtype=torch.float32)
    ts = torch.empty(n, dtype=torch.float64)
    conds: dict[str, torch.Tensor] = {}
    state = {"offset": 0}

    def cb(k: int, t: Any, x: torch.Tensor, cond: dict) -> None:
        slot = slot_of.get(k)
        if slot is None:
            return
        b = x.shape[0]
        rows = slot * num_per_step + state["offset"] + torch.arange(b)
        xs[rows] = x.detach().float().cpu()
        ts[rows] = float(t)
        for key, v in cond.items():
            if key not in conds:
                conds[key] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
            conds[key][rows] = v.detach().cpu()

    log.info("capturing calibration data: %d trajectories x %d steps of %s", num_per_step, len(keep), spec)
    starts = range(0, num_per_step, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="calibration capture", unit="batch", leave=False)
    for start in starts:
        b = min(batch_size, num_per_step - start)
        state["offset"] = start
        sample(model, scheduler, num=b, seed=seed + start, spec=spec, batch_size=b, device=device,
               callback=cb, progress=False)
    meta = {"spec": spec.to_dict(), "num_per_step": num_per_step, "step_indices": keep.tolist(), "seed": seed}
    return CalibrationSet(xs, ts, conds, meta)
