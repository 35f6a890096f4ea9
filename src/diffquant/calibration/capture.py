"""Time-step-aware calibration data: the full-precision sampler's model inputs (x_t, t, cond).

The full-precision model samples ``num_per_step`` trajectories; at ``num_steps`` sampler steps
spaced uniformly over the trajectory (``k_i = floor(i * steps / num_steps)``), the model's
input is recorded. Memory is bounded and known up front: the whole set is preallocated, and a
set larger than ``max_bytes`` is refused before sampling starts. Saved as safetensors (tensors)
with the metadata as JSON in the safetensors header.

Consistency models (``SamplerSpec("cm", k)``): "time-step aware" with 1-4 sampler steps means the
noise levels the multistep consistency chain visits. The inputs are taken from the chains of the step
counts in ``cm_chains`` (default: ``spec.steps`` alone; e.g. ``(1, 2, 4)`` for a model that will be run
at 1, 2 and 4 steps): the union of their noise levels (the scheduler's sigmas, recorded as its
``sigma_to_t`` time steps), each level filled with ``num_per_step`` inputs from the first chain in
``cm_chains`` order that visits it — the model's own denoised estimate re-noised to that level, exactly
what the sampler feeds the model there. The inputs are stored scaled (``scale_model_input``), i.e. as the
UNet sees them; class labels (class-conditional models) are stored as conditioning per row.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

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


def cm_chain_levels(scheduler, chains: Sequence[int]) -> list[dict]:
    """The noise levels visited by the multistep consistency chains of ``chains`` step counts, in
    decreasing sigma order: dicts ``{"t", "sigma", "chain", "step"}`` naming the first chain (in
    ``chains`` order) that visits the level and the step index at which it does."""
    from diffusers import CMStochasticIterativeScheduler

    if not isinstance(scheduler, CMStochasticIterativeScheduler):
        raise ValueError(f"consistency-chain calibration needs a CMStochasticIterativeScheduler; got {type(scheduler).__name__}")
    if not chains:
        raise ValueError("cm_chains must name at least one step count")
    n_train = int(scheduler.config.num_train_timesteps)
    levels: dict[float, dict] = {}
    for k in chains:
        if not isinstance(k, (int, np.integer)) or not (1 <= int(k) <= n_train):
            raise ValueError(f"cm_chains entry {k!r} must be an integer in 1..{n_train} (the scheduler's num_train_timesteps)")
        s = CMStochasticIterativeScheduler.from_config(scheduler.config)
        s.set_timesteps(int(k))
        for j, t in enumerate(s.timesteps.tolist()):
            key = round(float(t), 6)
            if key not in levels:
                levels[key] = {"t": float(t), "sigma": float(s.sigmas[j]), "chain": int(k), "step": j}
    return sorted(levels.values(), key=lambda d: -d["sigma"])


@torch.no_grad()
def capture_calibration_set(
    model: nn.Module,
    scheduler,
    *,
    num_per_step: int,
    num_steps: Optional[int] = None,
    spec: SamplerSpec = SamplerSpec("ddim", 100),
    cm_chains: Optional[Sequence[int]] = None,
    seed: int = 1_000_000,
    batch_size: int = 64,
    device: Any = None,
    max_bytes: int = 4 << 30,
    progress: bool = True,
) -> CalibrationSet:
    """Sample ``num_per_step`` trajectories with the (full-precision) model and keep its inputs at
    ``num_steps`` uniformly spaced steps (``None``: every step): ``num_per_step * num_steps`` rows in all.

    Consistency models (``spec.sampler == "cm"``): the steps are the noise levels visited by the chains
    of ``cm_chains`` step counts (default ``(spec.steps,)``; see the module docstring); ``num_steps``
    levels are kept, spread uniformly over them in decreasing-sigma order (``None``: all).

    The default seed range (1,000,000+) is disjoint from the default evaluation seeds (0+), so
    calibration never sees the evaluation's initial noise.
    """
    if num_per_step < 1:
        raise ValueError(f"num_per_step={num_per_step} must be >= 1")
    if spec.sampler == "cm":
        return _capture_cm(model, scheduler, num_per_step=num_per_step, num_steps=num_steps, spec=spec,
                           chains=tuple(cm_chains) if cm_chains is not None else (spec.steps,), seed=seed,
                           batch_size=batch_size, device=device, max_bytes=max_bytes, progress=progress)
    if cm_chains is not None:
        raise ValueError(f"cm_chains applies to the consistency sampler ('cm') only; the spec's sampler is {spec.sampler!r}")
    cfg = model.config
    size = cfg.sample_size if not isinstance(cfg.sample_size, (tuple, list)) else cfg.sample_size[0]
    keep = step_indices(spec.steps, spec.steps if num_steps is None else num_steps)
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


def _capture_cm(model, scheduler, *, num_per_step, num_steps, spec, chains, seed, batch_size, device, max_bytes,
                progress) -> CalibrationSet:
    chains = tuple(dict.fromkeys(chains))  # duplicates removed, order kept
    levels = cm_chain_levels(scheduler, chains)
    if num_steps is not None:
        levels = [levels[int(i)] for i in step_indices(len(levels), num_steps)]
    cfg = model.config
    size = cfg.sample_size if not isinstance(cfg.sample_size, (tuple, list)) else cfg.sample_size[0]
    n = num_per_step * len(levels)
    row_bytes = cfg.in_channels * size * size * 4
    if n * row_bytes > max_bytes:
        raise ValueError(
            f"calibration set of {n} inputs needs {n * row_bytes / 2**30:.2f} GiB > max_bytes "
            f"{max_bytes / 2**30:.2f} GiB; lower num_per_step/num_steps or raise max_bytes"
        )
    xs = torch.empty(n, cfg.in_channels, size, size, dtype=torch.float32)
    ts = torch.empty(n, dtype=torch.float64)
    conds: dict[str, torch.Tensor] = {}
    # chain -> {step index -> slot}
    plan: dict[int, dict[int, int]] = {}
    for slot, lv in enumerate(levels):
        plan.setdefault(lv["chain"], {})[lv["step"]] = slot
    state = {"offset": 0, "slots": {}}

    def cb(k: int, t: Any, x: torch.Tensor, cond: dict) -> None:
        slot = state["slots"].get(k)
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

    log.info("capturing consistency-chain calibration data: %d trajectories x %d noise levels (chains %s)",
             num_per_step, len(levels), list(chains))
    jobs = [(k, start) for k in chains if k in plan for start in range(0, num_per_step, batch_size)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="calibration capture (cm)", unit="batch", leave=False)
    for k, start in jobs:
        b = min(batch_size, num_per_step - start)
        state["offset"], state["slots"] = start, plan[k]
        sample(model, scheduler, num=b, seed=seed + start, spec=SamplerSpec("cm", int(k)), batch_size=b,
               device=device, callback=cb, progress=False)
    meta = {"spec": spec.to_dict(), "num_per_step": num_per_step, "seed": seed, "cm_chains": [int(c) for c in chains],
            "levels": levels, "step_indices": list(range(len(levels)))}
    return CalibrationSet(xs, ts, conds, meta)
