"""Sampling loops: DDIM (uniform or quadratic time-step spacing, eta), DDPM ancestral, and
consistency-model multistep, over diffusers schedulers.

Reproducibility: sample ``i`` of a run with seed ``s`` owns a CPU ``torch.Generator`` seeded
with ``s + i``; its initial noise and every noise draw of later steps come from that generator
alone, so a sample does not depend on the batch size or on the device (up to the model's own
floating-point differences).

DDIM follows the generalized DDIM update of Song et al. (the "ermongroup/ddim" code used by
Q-Diffusion): ``uniform`` spacing takes every ``T/steps``-th step, ``quad`` spacing takes
``int((i * sqrt(0.8 T) / (steps-1))^2)``; the last step goes to alpha_bar = 1. The noise
schedule (alphas_cumprod) and prediction type come from the model's diffusers scheduler.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from diffquant.models.adapter import call_model

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm", "cm")
SPACINGS = ("uniform", "quad")

# callback(step_index, timestep, x_t, cond) is called before every model evaluation.
StepCallback = Callable[[int, Any, torch.Tensor, dict], None]


@dataclass(frozen=True)
class SamplerSpec:
    sampler: str = "ddim"
    steps: int = 100
    spacing: str = "uniform"
    eta: float = 0.0
    clip_sample: Optional[bool] = None  # None: the scheduler config's clip_sample

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not supported; allowed: {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing={self.spacing!r} is not supported; allowed: {', '.join(SPACINGS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a positive integer")
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta={self.eta} must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "spacing": self.spacing, "eta": self.eta}


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str) -> np.ndarray:
    """Increasing sequence of training time steps visited by DDIM."""
    if steps > num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the model's {num_train_timesteps} training time steps")
    if spacing == "uniform":
        seq = np.arange(steps) * (num_train_timesteps // steps)
    elif spacing == "quad":
        seq = (np.linspace(0, math.sqrt(num_train_timesteps * 0.8), steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"spacing={spacing!r}; allowed: {', '.join(SPACINGS)}")
    return seq.astype(np.int64)


def _per_sample_noise(shape: Sequence[int], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]).to(device, dtype)


def _to_x0_eps(out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, prediction_type: str):
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported by DDIM here")
    return x0, eps


@torch.no_grad()
def run_ddim(model, scheduler, x, generators, spec: SamplerSpec, cond: dict, callback: Optional[StepCallback] = None):
    cfg = scheduler.config
    acp = scheduler.alphas_cumprod.to(torch.float64)
    seq = ddim_timesteps(cfg.num_train_timesteps, spec.steps, spec.spacing)
    seq_next = np.concatenate([[-1], seq[:-1]])
    clip = cfg.get("clip_sample", False) if spec.clip_sample is None else spec.clip_sample
    clip_range = cfg.get("clip_sample_range", 1.0)
    for k, (t, t_next) in enumerate(zip(reversed(seq), reversed(seq_next))):
        t_vec = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if callback is not None:
            callback(k, int(t), x, cond)
        out = call_model(model, x, t_vec, cond).to(torch.float32)
        a_t = acp[int(t)].to(x.device, torch.float32)
        a_n = (acp[int(t_next)] if t_next >= 0 else torch.tensor(1.0, dtype=torch.float64)).to(x.device, torch.float32)
        x0, eps = _to_x0_eps(out, x, a_t, cfg.get("prediction_type", "epsilon"))
        if clip:
            x0 = x0.clamp(-clip_range, clip_range)
        c1 = spec.eta * ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)).clamp_min(0).sqrt()
        c2 = (1 - a_n - c1**2).clamp_min(0).sqrt()
        x = a_n.sqrt() * x0 + c2 * eps
        if spec.eta > 0 and t_next >= 0:
            x = x + c1 * _per_sample_noise(x.shape[1:], generators, x.device, x.dtype)
    return x


@torch.no_grad()
def run_scheduler(model, scheduler, x, generators, spec: SamplerSpec, cond: dict, callback: Optional[StepCallback] = None):
    """DDPM / consistency multistep through the diffusers scheduler's own ``step``."""
    scheduler.set_timesteps(spec.steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    for k, t in enumerate(scheduler.timesteps):
        xin = scheduler.scale_model_input(x, t)
        if callback is not None:
            callback(k, t.item() if torch.is_tensor(t) else t, xin, cond)
        t_vec = t.expand(x.shape[0]) if torch.is_tensor(t) and t.dim() == 0 else torch.full((x.shape[0],), t, device=x.device)
        out = call_model(model, xin, t_vec, cond)
        x = scheduler.step(out, t, x, generator=generators).prev_sample
    return x


def make_scheduler_for(spec: SamplerSpec, scheduler):
    """The scheduler instance a sampler needs, built from the model's scheduler config."""
    from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

    if spec.sampler in ("ddim", "ddpm") and isinstance(scheduler, CMStochasticIterativeScheduler):
        raise ValueError(f"this is a consistency model (CMStochasticIterativeScheduler): sample it with sampler 'cm' "
                         f"(1..{scheduler.config.num_train_timesteps} steps), not {spec.sampler!r}")
    if spec.sampler == "ddim":
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"DDIM needs a scheduler with alphas_cumprod; got {type(scheduler).__name__}")
        return scheduler
    if spec.sampler == "ddpm":
        if spec.spacing != "uniform":
            raise ValueError("DDPM sampling supports spacing 'uniform' only")
        return DDPMScheduler.from_config(scheduler.config)
    if isinstance(scheduler, CMStochasticIterativeScheduler):
        n = int(scheduler.config.num_train_timesteps)
        if spec.steps > n:
            raise ValueError(f"steps={spec.steps}: this consistency model's scheduler has {n} noise levels "
                             f"(num_train_timesteps); use 1..{n} steps")
        # ConsistencyModelPipeline's multistep schedule: set_timesteps(steps) takes every (N // steps)-th of the
        # N Karras sigmas from sigma_max down, then the chain ends at sigma_min.
        return CMStochasticIterativeScheduler.from_config(scheduler.config)
    raise ValueError(f"sampler 'cm' needs a CMStochasticIterativeScheduler; the model has {type(scheduler).__name__}")


@dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, C)
    seeds: np.ndarray  # int64 (N,)
    meta: dict
    float_images: Optional[torch.Tensor] = None  # [-1, 1] NCHW, when asked for


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> uint8 NHWC."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler,
    *,
    num: int,
    seed: int = 0,
    spec: SamplerSpec = SamplerSpec(),
    batch_size: int = 64,
    device: Any = None,
    class_labels: Optional[Sequence[int]] = None,
    cond_fn: Optional[Callable[[np.ndarray], dict]] = None,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
    return_float: bool = False,
) -> Samples:
    """Draw ``num`` samples with seeds ``seed .. seed+num-1``.

    ``class_labels``: one label per sample for class-conditional models (default: drawn from each
    sample's own generator). ``cond_fn(seeds) -> dict`` supplies other conditioning per batch.
    """
    if num < 1:
        raise ValueError(f"num={num} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sched = make_scheduler_for(spec, scheduler)
    cfg = model.config if hasattr(model, "config") else None
    if cfg is None:
        raise ValueError("sample() needs a model with a diffusers-style config (sample_size, in_channels)")
    size = cfg.sample_size if not isinstance(cfg.sample_size, (tuple, list)) else cfg.sample_size[0]
    shape = (cfg.in_channels, size, size)
    num_classes = getattr(cfg, "num_class_embeds", None)
    if class_labels is not None and len(class_labels) != num:
        raise ValueError(f"class_labels has {len(class_labels)} entries; expected num={num}")
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    outs, floats = [], []
    it = range(0, num, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"sampling {spec.sampler}-{spec.steps}", unit="batch", leave=False)
    for start in it:
        bseeds = seeds[start : start + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in bseeds]
        x = _per_sample_noise(shape, gens, device, torch.float32)
        cond: dict = {}
        if num_classes:
            if class_labels is not None:
                labels = torch.as_tensor(np.asarray(class_labels[start : start + batch_size]), dtype=torch.long)
            else:
                labels = torch.stack([torch.randint(int(num_classes), (), generator=g) for g in gens])
            cond["class_labels"] = labels.to(device)
        if cond_fn is not None:
            cond.update(cond_fn(bseeds))
        if spec.sampler == "ddim":
            x = run_ddim(model, sched, x, gens, spec, cond, callback)
        else:
            x = run_scheduler(model, sched, x, gens, spec, cond, callback)
        outs.append(to_uint8(x))
        if return_float:
            floats.append(x.float().cpu())
    meta = {"seed": int(seed), "num": int(num), **spec.to_dict()}
    return Samples(np.concatenate(outs), seeds, meta, torch.cat(floats) if return_float else None)
