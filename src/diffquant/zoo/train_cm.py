"""Consistency distillation (CD) recipe of ``zoo:cifar10-cm``: a consistency model distilled from a VP
diffusion teacher (``zoo:cifar10-ddpm``) that samples through diffusers' ``CMStochasticIterativeScheduler``
/ ``ConsistencyModelPipeline`` conventions (the same code path as openai/diffusers-cd_imagenet64_l2).

**Parametrisation (the student).** EDM/VE noise levels sigma on the scheduler's grid of N Karras sigmas
(``sigma_min`` 0.002 .. ``sigma_max`` 80, rho 7; N = ``num_train_timesteps`` = 18 for CIFAR-10 as in the
consistency-model paper). For a noisy image ``x = x0 + sigma * z`` the student computes, exactly as the
scheduler does at sampling time::

    F = unet(x / sqrt(sigma^2 + sigma_data^2), t = scheduler.sigma_to_t(sigma) = 250 * ln(sigma))
    f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F      (get_scalings_for_boundary_condition: f(x, sigma_min) = x)

**The teacher in VE coordinates.** A VP model sees ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) z``; with
``sigma^2 = (1 - abar) / abar`` that is ``x_vp = x_ve / sqrt(1 + sigma^2)``. The teacher's discrete time for a
sigma is interpolated (linearly in log sigma) over its ``alphas_cumprod``; sigmas below its smallest
(about 0.01 for the linear betas) use t = 0. The teacher's output is turned into eps (epsilon, sample or
v prediction), and the probability-flow ODE in VE form is ``dx/dsigma = eps(x, sigma)``. Its step from
sigma_{n+1} down to sigma_n is Euler (identical to a DDIM step) or Heun (EDM's second-order step; default,
two teacher evaluations).

**CD loss** (Song et al. 2023, Alg. 2): draw n in 0..N-2, x_{n+1} = x0 + sigma_{n+1} z, one teacher ODE step
to x^_n, loss d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x^_n, sigma_n)) with the target network an EMA of the
student (``target_decay`` mu, 0.95 by default; 0 = the student itself without gradient) and d the
pseudo-Huber distance ``sqrt(|a-b|^2 + c^2) - c`` per image with c = 0.00054 sqrt(C H W) (iCT) or L2. A second
EMA (``ema_decay``) of the student is the model that gets bundled and sampled.

**Initialisation (the time-input question).** The student has the teacher's architecture and starts from the
teacher's weights (``init="teacher"``): the convolution/attention features carry over, but the two networks
read different inputs — the teacher sees ``x / sqrt(1 + sigma^2)`` and an integer t in 0..999, the student sees
``x / sqrt(sigma^2 + 0.25)`` and ``250 ln sigma`` in about -1554..1096, and the student's output is a
c_skip/c_out mixture rather than eps. No weight surgery maps one sinusoidal time embedding onto the other, so
the recipe first runs ``init_steps`` of a **denoiser warm start**: the student regresses the teacher's denoiser
``D(x, sigma) = x - sigma * eps`` (one teacher evaluation per step). After it, the student is the teacher's
x0-predictor in the consistency parametrisation — the situation of EDM-based CD, where student and teacher
coincide at initialisation — and consistency distillation proper begins. ``init="random"`` trains from scratch.

**A smaller student.** ``student`` overrides the teacher's UNet2DModel config for the student (e.g.
``{"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 16}``: 2.25M parameters, 4.5 MB in fp16, a quarter
of the teacher — what fits the project's 40 MB budget of bundled weights next to the DDPM and the feature
network). A student of another shape cannot copy the teacher's weights: it starts from ``init="random"`` and the
denoiser warm start distils the teacher's denoiser into it before CD (give it more ``init_steps``).

**Randomness and world size.** Every step's randomness (batch indices, flips, noise levels, noise) is drawn
for the *global* batch from a generator seeded by (seed, step); each rank takes its slice. A run is therefore
the same on 1 or N processes up to the order of floating-point reductions, and resuming needs no RNG state.

**Chunks and checkpoints.** :func:`train_cm` stops after ``max_minutes`` / ``until_step`` / a stop file /
SIGTERM and writes

* ``RUN/state/`` — the **full state** (fp32 student, target, EMA, Adam moments): resuming from it continues
  *exactly* as an uninterrupted run;
* ``carry_dir/`` — the **carry state**: the EMA weights in fp16 (what gets bundled; 17.9 MB for the zoo
  model, two <= 15 MiB shards) — small because everything that leaves the GPU machine, and everything that
  travels to it, shares a 64 MiB limit with the repository itself. Resuming from it is a **warm restart**:
  student, target and EMA all start from those weights, Adam starts afresh and the learning rate re-warms
  over ``rewarm_steps``; the step count (and so the warm-start/CD phase and the schedules) continues.
  A running trainer writes it on request when ``RUN/EXPORT_NOW`` exists (the file is then removed).

DDP: run under ``torchrun``; the global ``batch_size`` is split over the ranks; rank 0 logs and saves.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from diffquant.zoo.checkpoint import MiB, load_state, save_state
from diffquant.zoo.train_ddpm import _Batches, _main_thread, _step_seed

log = logging.getLogger(__name__)

FORMAT = "diffquant-cm-train-v1"
SOLVERS = ("heun", "euler")
LOSSES = ("huber", "l2")
INITS = ("teacher", "random")


@dataclass
class CMTrainConfig:
    data: str
    run_dir: str
    teacher: str = "zoo:cifar10-ddpm"
    scheduler: dict = field(default_factory=dict)  # overrides of models.configs.ZOO_CIFAR10_CM_SCHEDULER
    solver: str = "heun"
    loss: str = "huber"
    huber_c: Optional[float] = None  # None: 0.00054 * sqrt(C*H*W)
    init: str = "teacher"
    init_steps: int = 1000  # denoiser warm start before CD (0: none)
    student: dict = field(default_factory=dict)  # UNet2DModel config overrides for the student (e.g. narrower)
    dropout: float = 0.0
    batch_size: int = 256  # global batch, split over the ranks
    lr: float = 2e-4
    warmup_steps: int = 500
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    target_decay: float = 0.95
    ema_decay: float = 0.9995
    ema_warmup: bool = True
    hflip: bool = True
    seed: int = 0
    amp: str = "auto"  # student and target: "auto" (bf16 on CUDA), "bf16", "none"
    teacher_amp: Optional[bool] = None  # None: as the student
    compile: bool = False
    channels_last: bool = True
    log_every: int = 100
    save_every_minutes: float = 5.0
    carry_dir: Optional[str] = None
    rewarm_steps: int = 200  # warm restart from a carry state: lr re-warm-up
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, val, allowed in (("solver", self.solver, SOLVERS), ("loss", self.loss, LOSSES),
                                   ("init", self.init, INITS), ("amp", self.amp, ("auto", "bf16", "none"))):
            if val not in allowed:
                raise ValueError(f"{name}={val!r} is not supported; allowed: {', '.join(allowed)}")
        if not (0.0 <= self.target_decay < 1.0):
            raise ValueError(f"target_decay={self.target_decay} must lie in [0, 1)")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.batch_size < 1 or self.init_steps < 0:
            raise ValueError(f"batch_size must be >= 1 and init_steps >= 0; got {self.batch_size}, {self.init_steps}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


# ------------------------------------------------------------------------------------------------
# VP <-> VE conversions


def vp_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of a VP schedule (float64, increasing in t)."""
    ac = alphas_cumprod.double().cpu().numpy()
    return np.sqrt((1.0 - ac) / ac)


def vp_t_from_sigma(sigma, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The VP model's (continuous) time for VE noise levels ``sigma``: linear interpolation in log sigma over
    its discrete schedule, clamped to [0, T-1] (sigmas below the schedule's smallest map to t = 0)."""
    s_vp = vp_sigmas(alphas_cumprod)
    if np.any(np.diff(s_vp) <= 0):
        raise ValueError("the teacher's alphas_cumprod must decrease strictly with t")
    sig = np.asarray(sigma, dtype=np.float64)
    if np.any(sig <= 0):
        raise ValueError("sigmas must be positive")
    return np.interp(np.log(sig), np.log(s_vp), np.arange(len(s_vp), dtype=np.float64))


def ve_to_vp(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_vp = x_ve / sqrt(1 + sigma^2) (sigma broadcast over x)."""
    return x / (1.0 + sigma**2).sqrt()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c."""
    d2 = (a - b).float().pow(2).flatten(1).sum(1)
    return (d2 + c * c).sqrt() - c


class CDGrid:
    """The scheduler's N Karras sigmas (decreasing: index 0 = sigma_max) with everything per level that the
    student, the teacher and the loss need, as device tensors."""

    def __init__(self, scheduler, teacher_scheduler, device: torch.device) -> None:
        conf = scheduler.config
        n = int(conf.num_train_timesteps)
        if n < 2:
            raise ValueError(f"consistency distillation needs num_train_timesteps >= 2; got {n}")
        ramp = np.linspace(0, 1, n)
        sig = scheduler._convert_to_karras(ramp)  # float64, decreasing
        self.n = n
        self.sigma_data = float(conf.sigma_data)
        self.sigma64 = sig
        self.student_t64 = np.asarray(scheduler.sigma_to_t(sig), dtype=np.float64)
        self.teacher_t64 = vp_t_from_sigma(sig, teacher_scheduler.alphas_cumprod)
        f32 = dict(device=device, dtype=torch.float32)
        self.sigma = torch.tensor(sig, **f32)
        self.student_t = torch.tensor(self.student_t64, **f32)
        self.teacher_t = torch.tensor(self.teacher_t64, **f32)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(torch.tensor(sig, dtype=torch.float64))
        self.c_skip = c_skip.to(**f32)
        self.c_out = c_out.to(**f32)
        self.c_in = (1.0 / np.sqrt(sig**2 + self.sigma_data**2))
        self.c_in = torch.tensor(self.c_in, **f32)

    def describe(self) -> dict:
        return {"n": self.n, "sigmas": [round(float(s), 6) for s in self.sigma64],
                "student_t": [round(float(t), 3) for t in self.student_t64],
                "teacher_t": [round(float(t), 3) for t in self.teacher_t64]}


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------
# trainer


def _dist_info() -> tuple[int, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def init_distributed() -> bool:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


class CMTrainer:
    """Consistency distillation of a UNet2DModel student from a VP teacher (see the module docstring).

    ``teacher``: ``(model, scheduler)`` to use instead of loading ``cfg.teacher`` (tests, custom teachers).
    """

    def __init__(self, cfg: CMTrainConfig, teacher: Optional[tuple] = None) -> None:
        from diffusers import UNet2DModel

        from diffquant.data import load_images
        from diffquant.models.configs import ZOO_CIFAR10_CM_SCHEDULER, cm_scheduler

        self.cfg = cfg
        self.rank, self.world, local = _dist_info()
        dev = cfg.device
        if dev == "auto":
            dev = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        self.teacher_amp = self.amp if cfg.teacher_amp is None else bool(cfg.teacher_amp)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {self.world}")
        self.local_bs = cfg.batch_size // self.world
        self.run_dir = Path(cfg.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # teacher
        if teacher is None:
            from diffquant.models.loading import load_model

            loaded = load_model(cfg.teacher, device=self.device)
            if loaded.quantized:
                raise ValueError(f"teacher {cfg.teacher!r} is a quantized checkpoint; distil from the full-precision model")
            teacher = (loaded.model, loaded.scheduler)
        self.teacher, self.teacher_scheduler = teacher
        if not hasattr(self.teacher_scheduler, "alphas_cumprod"):
            raise ValueError(f"the teacher needs a VP scheduler with alphas_cumprod; got {type(self.teacher_scheduler).__name__}")
        self.teacher_pred = self.teacher_scheduler.config.get("prediction_type", "epsilon")
        if self.teacher_pred not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"teacher prediction_type={self.teacher_pred!r} is not supported")
        tconf = {k: v for k, v in dict(self.teacher.config).items() if not k.startswith("_")}
        if tconf.get("num_class_embeds"):
            raise ValueError("class-conditional teachers are not supported by this recipe")
        self.teacher = self.teacher.to(self.device).eval().requires_grad_(False)
        if cuda and cfg.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)

        # data
        t0 = time.perf_counter()
        data = load_images(cfg.data)
        size = tconf["sample_size"] if not isinstance(tconf["sample_size"], (list, tuple)) else tconf["sample_size"][0]
        if tuple(data.images.shape[1:]) != (size, size, tconf["in_channels"]):
            raise ValueError(f"images of {cfg.data} have shape {tuple(data.images.shape[1:])}; the teacher expects "
                             f"{(size, size, tconf['in_channels'])} (H, W, C)")
        self.data_info = {"path": str(cfg.data), "count": len(data), "shape": list(data.images.shape[1:])}
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(self.device)
        if self.rank == 0:
            log.info("loaded %d images from %s in %.1fs", len(data), cfg.data, time.perf_counter() - t0)

        # student (+ target, EMA)
        self.scheduler = cm_scheduler({**ZOO_CIFAR10_CM_SCHEDULER, **cfg.scheduler})
        self.grid = CDGrid(self.scheduler, self.teacher_scheduler, self.device)
        self.unet_config = {k: list(v) if isinstance(v, tuple) else v for k, v in tconf.items()}
        bad = sorted(set(cfg.student) - set(self.unet_config) - {"dropout"})
        if bad:
            raise ValueError(f"student overrides {bad} are not keys of the teacher's UNet2DModel config; "
                             f"allowed: {', '.join(sorted(self.unet_config))}")
        if "dropout" in cfg.student:
            raise ValueError("set the student's dropout with the recipe's dropout, not in student overrides")
        self.unet_config.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.student.items()})
        self.unet_config["dropout"] = cfg.dropout
        conf = {k: tuple(v) if isinstance(v, list) else v for k, v in self.unet_config.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = UNet2DModel(**conf)
        if cfg.init == "teacher":
            own, theirs = self.model.state_dict(), self.teacher.state_dict()
            if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
                raise ValueError(f"init='teacher' copies the teacher's weights, but the student overrides "
                                 f"{cfg.student} change its architecture; use init='random' (the denoiser warm start "
                                 f"then distils the teacher into the new architecture)")
            self.model.load_state_dict(theirs)
        self.model = self.model.to(self.device)
        if cuda and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone().float() for p in self.params]
        if cfg.target_decay > 0:
            with torch.random.fork_rng(devices=[]):
                self.target = UNet2DModel(**conf)
            self.target.load_state_dict(self.model.state_dict())
            self.target = self.target.to(self.device).eval().requires_grad_(False)
            if cuda and cfg.channels_last:
                self.target = self.target.to(memory_format=torch.channels_last)
            self.target_params = [p for p in self.target.parameters()]
        else:
            self.target, self.target_params = None, []
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                    fused=cuda or None)
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if cuda else None, broadcast_buffers=False)
        fwd = self.ddp if self.ddp is not None else self.model
        self.forward = torch.compile(fwd) if cfg.compile else fwd
        self._compiled_ok = not cfg.compile
        c, h, w = tconf["in_channels"], size, size
        self.huber_c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * math.sqrt(c * h * w)
        self.shape = (c, h, w)
        self.batches = _Batches(len(data), cfg.batch_size, cfg.seed, self.device)
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.resumes: list[dict] = []
        self.rewarm_from: Optional[int] = None

    # ---------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        lr = self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        if self.rewarm_from is not None:
            lr *= min(1.0, (step - self.rewarm_from + 1) / max(1, self.cfg.rewarm_steps))
        return lr

    def ema_decay_at(self, step: int) -> float:
        if not self.cfg.ema_warmup:
            return self.cfg.ema_decay
        return min(self.cfg.ema_decay, (1 + step) / (10 + step))

    def phase_at(self, step: int) -> str:
        return "init" if step < self.cfg.init_steps else "cd"

    # ---------------------------------------------------------------- networks
    def student_f(self, net, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """f(x, sigma_idx) = c_skip x + c_out unet(c_in x, sigma_to_t(sigma)) — the scheduler's parametrisation."""
        g = self.grid
        xin = x * _view(g.c_in[idx])
        if self.device.type == "cuda" and self.cfg.channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = net(xin, g.student_t[idx]).sample
        return _view(g.c_skip[idx]) * x + _view(g.c_out[idx]) * out.float()

    @torch.no_grad()
    def teacher_eps(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The teacher's eps for VE inputs x at grid levels idx."""
        from diffquant.sampling.samplers import _to_x0_eps

        s = _view(self.grid.sigma[idx])
        xv = ve_to_vp(x, s)
        if self.device.type == "cuda" and self.cfg.channels_last:
            xv = xv.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.teacher_amp):
            out = self.teacher(xv, self.grid.teacher_t[idx]).sample
        out = out.float()
        if self.teacher_pred == "epsilon":
            return out
        _, eps = _to_x0_eps(out, xv, 1.0 / (1.0 + s**2), self.teacher_pred)
        return eps

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """One probability-flow ODE step dx/dsigma = eps from level hi to hi+1 (the next smaller sigma)."""
        lo = hi + 1
        ds = _view(self.grid.sigma[lo] - self.grid.sigma[hi])
        e1 = self.teacher_eps(x, hi)
        x_e = x + ds * e1
        if self.cfg.solver == "euler":
            return x_e
        e2 = self.teacher_eps(x_e, lo)
        return x + ds * 0.5 * (e1 + e2)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "huber":
            return pseudo_huber(a, b, self.huber_c).mean()
        return F.mse_loss(a.float(), b.float())

    # ---------------------------------------------------------------- one step
    def _draw(self, step: int, stream: int = 0):
        """The global batch's randomness for ``step``, sliced to this rank."""
        g = torch.Generator(device=self.device).manual_seed(_step_seed(self.cfg.seed, step, stream))
        B = self.cfg.batch_size
        idx = self.batches(step)
        flip = torch.rand(B, device=self.device, generator=g) < 0.5
        level = torch.randint(0, self.grid.n - 1, (B,), device=self.device, generator=g)
        z = torch.randn((B, *self.shape), device=self.device, generator=g)
        lo, hi = self.rank * self.local_bs, (self.rank + 1) * self.local_bs
        idx, flip, level, z = idx[lo:hi], flip[lo:hi], level[lo:hi], z[lo:hi]
        x0 = self.images[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if self.cfg.hflip:
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        return x0, level, z

    def loss_at(self, step: int) -> torch.Tensor:
        x0, n, z = self._draw(step)
        x_hi = x0 + _view(self.grid.sigma[n]) * z
        if self.phase_at(step) == "init":  # denoiser warm start: f(x, sigma) -> teacher's D(x, sigma)
            with torch.no_grad():
                target = x_hi - _view(self.grid.sigma[n]) * self.teacher_eps(x_hi, n)
        else:
            x_lo = self.teacher_step(x_hi, n)
            with torch.no_grad():
                target = self.student_f(self.target if self.target is not None else self.model, x_lo, n + 1)
        pred = self.student_f(self.forward, x_hi, n)
        return self.distance(pred, target.detach())

    def train_step(self) -> torch.Tensor:
        step = self.step
        for grp in self.opt.param_groups:
            grp["lr"] = self.lr_at(step)
        loss = self.loss_at(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            cur = [p.detach().float() for p in self.params]
            torch._foreach_lerp_(self.ema, cur, 1.0 - self.ema_decay_at(step))
            if self.target is not None:
                torch._foreach_lerp_(self.target_params, [p.detach() for p in self.params], 1.0 - self.cfg.target_decay)
        self.step += 1
        return torch.stack([loss.detach().float(), gnorm.detach().float()])

    # ---------------------------------------------------------------- state
    def _doc(self, kind: str) -> dict:
        return {
            "format": FORMAT,
            "kind": kind,
            "step": self.step,
            "phase": self.phase_at(self.step),
            "images_seen": self.step * self.cfg.batch_size,
            "train_seconds": round(self.train_seconds, 1),
            "config": self.cfg.to_json(),
            "unet_config": self.unet_config,
            "scheduler_config": _jsonable(dict(self.scheduler.config)),
            "teacher": {"source": self.cfg.teacher, "scheduler_config": _jsonable(dict(self.teacher_scheduler.config))},
            "grid": self.grid.describe(),
            "data": self.data_info,
            "world_size": self.world,
            "resumes": self.resumes,
            "rewarm_from": self.rewarm_from,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "history_tail": self.history[-20:],
        }

    def state_tensors(self, kind: str) -> dict[str, torch.Tensor]:
        """``full``: student, target, EMA and Adam moments in fp32; ``carry``: the EMA in fp16."""
        if kind not in ("full", "carry"):
            raise ValueError(f"kind must be 'full' or 'carry'; got {kind!r}")
        out: dict[str, torch.Tensor] = {}
        for i, (n, p, e) in enumerate(zip(self.names, self.params, self.ema)):
            if kind == "carry":
                out[f"ema.{n}"] = e.detach().to("cpu", torch.float16)
                continue
            out[f"model.{n}"] = p.detach().to("cpu", torch.float32)
            out[f"ema.{n}"] = e.detach().to("cpu", torch.float32)
            if self.target is not None:
                out[f"target.{n}"] = self.target_params[i].detach().to("cpu", torch.float32)
            for k, v in (self.opt.state.get(p) or {}).items():
                out[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().to("cpu")
        return out

    def save(self, folder: str | Path, kind: str = "full") -> Optional[Path]:
        """Write a state (rank 0 only; other ranks return None)."""
        if self.rank != 0:
            return None
        return save_state(folder, self.state_tensors(kind), self._doc(kind), max_shard_bytes=15 * MiB)

    def save_full(self) -> Optional[Path]:
        return self.save(self.run_dir / "state", "full")

    def load(self, folder: str | Path) -> str:
        """Resume from a full (exact) or carry state, or warm-restart from a bundled zoo folder (model.safetensors +
        config.json + card.json, as :func:`bundle_cm` writes it; e.g. ``src/diffquant/zoo/weights/cifar10-cm``).
        Returns the kind."""
        folder = Path(folder)
        if not (folder / "state.json").is_file() and (folder / "model.safetensors").is_file():
            tensors, doc = carry_from_bundle(folder)
        else:
            tensors, doc = load_state(folder)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a diffquant consistency-distillation state (format {doc.get('format')!r})")
        kind = doc.get("kind")
        if kind not in ("full", "carry"):
            raise ValueError(f"{folder}: cannot resume from a {kind!r} state (need 'full' or 'carry')")
        if json.dumps(doc["unet_config"], sort_keys=True) != json.dumps(self.unet_config, sort_keys=True):
            raise ValueError(f"{folder}: the state's UNet config differs from this run's")
        if _public(doc["scheduler_config"]) != _public(_jsonable(dict(self.scheduler.config))):
            raise ValueError(f"{folder}: the state's scheduler config (sigma grid) differs from this run's")
        recipe_keys = ("teacher", "solver", "loss", "huber_c", "init", "init_steps", "batch_size", "lr", "warmup_steps",
                       "target_decay", "ema_decay", "seed")
        was = doc.get("config", {})
        changed = {k: (was.get(k), getattr(self.cfg, k)) for k in recipe_keys if k in was and was[k] != getattr(self.cfg, k)}
        if changed and self.rank == 0:
            log.warning("%s: resuming with a changed recipe (state -> now): %s", folder, changed)
        missing = [n for n in self.names if f"ema.{n}" not in tensors or (kind == "full" and f"model.{n}" not in tensors)]
        if missing:
            raise ValueError(f"{folder}: the state lacks weights for {missing[:3]}")
        with torch.no_grad():
            for i, (n, p, e) in enumerate(zip(self.names, self.params, self.ema)):
                ema = tensors[f"ema.{n}"]
                e.copy_(ema.to(e.device, e.dtype))
                # carry (warm restart): student and target restart from the EMA weights
                p.copy_(tensors.get(f"model.{n}", ema).to(p.device, p.dtype))
                if self.target is not None:
                    self.target_params[i].copy_(tensors.get(f"target.{n}", ema).to(p.device, p.dtype))
        self.step = int(doc["step"])
        self.train_seconds = float(doc.get("train_seconds", 0.0))
        self.history = list(doc.get("history_tail", []))
        self.rewarm_from = doc.get("rewarm_from")
        if kind == "full":
            state = {}
            for i in range(len(self.params)):
                st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                if st:
                    state[i] = st
            self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        else:  # fresh Adam moments, learning rate re-warmed from here
            self.rewarm_from = self.step
        self.resumes = list(doc.get("resumes", [])) + [{"step": self.step, "kind": kind, "world_size": self.world}]
        if self.rank == 0:
            log.info("resumed from the %s state %s at step %d%s", kind, folder, self.step,
                     "" if kind == "full" else f" (warm restart: lr re-warms over {self.cfg.rewarm_steps} steps)")
        return kind

    # ---------------------------------------------------------------- loop
    def _agree(self, flag: bool) -> bool:
        """Any rank wants to stop -> all stop (one tiny all-reduce)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def train(self, max_minutes: float | None = None, until_step: int | None = None,
              stop_file: str | None = None, sync_every: int = 10) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        deadline = t_start + 60 * max_minutes if max_minutes else math.inf
        stop = {"flag": False}

        def _on_signal(signum, frame):  # noqa: ARG001
            stop["flag"] = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.rank == 0 else None
        last_save = time.perf_counter()
        acc = torch.zeros(2, device=self.device)
        n_acc = 0
        t_win = time.perf_counter()
        reason = "until_step"
        every = 1 if self.world == 1 else max(1, sync_every)
        try:
            while until_step is None or self.step < until_step:
                if self.step % every == 0:
                    want = stop["flag"] or bool(stop_file and os.path.exists(stop_file)) or time.perf_counter() >= deadline
                    if self._agree(want):
                        reason = "stopped" if time.perf_counter() < deadline else "max_minutes"
                        break
                if not self._compiled_ok:
                    try:
                        acc += self.train_step()
                        self._compiled_ok = True
                    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
                        log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(e).__name__, e)
                        self.forward = self.ddp if self.ddp is not None else self.model
                        self._compiled_ok = True
                        continue
                else:
                    acc += self.train_step()
                n_acc += 1
                if cfg.carry_dir and self.rank == 0 and (self.run_dir / "EXPORT_NOW").exists():
                    self.save(cfg.carry_dir, "carry")  # asked for by a watcher: write, then clear the request
                    os.remove(self.run_dir / "EXPORT_NOW")
                if self.step == cfg.init_steps and cfg.init_steps and self.rank == 0:
                    log.info("denoiser warm start done at step %d; consistency distillation begins", self.step)
                if self.step % cfg.log_every == 0:
                    if self.world > 1:  # the global batch's mean loss (ranks log the same numbers)
                        import torch.distributed as dist

                        dist.all_reduce(acc)
                        acc /= self.world
                    vals = (acc / n_acc).tolist()
                    now = time.perf_counter()
                    self.train_seconds += now - t_win
                    rec = {"step": self.step, "phase": self.phase_at(self.step - 1), "loss": round(vals[0], 6),
                           "grad_norm": round(vals[1], 4), "lr": self.lr_at(self.step - 1),
                           "images_per_s": round(n_acc * cfg.batch_size / (now - t_win), 1),
                           "train_seconds": round(self.train_seconds, 1)}
                    self.history.append(rec)
                    if metrics is not None:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                        log.info("cm %s", json.dumps(rec))
                    acc.zero_()
                    n_acc = 0
                    if now - last_save >= 60 * cfg.save_every_minutes:
                        self.save_full()
                        last_save = time.perf_counter()
                    t_win = time.perf_counter()
            if n_acc:
                self.train_seconds += time.perf_counter() - t_win
            t_save = time.perf_counter()
            self.save_full()
            if cfg.carry_dir:
                self.save(cfg.carry_dir, "carry")
            save_s = time.perf_counter() - t_save
        finally:
            if metrics is not None:
                metrics.close()
            for s, h in old.items():
                signal.signal(s, h)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return {"step": self.step, "reason": reason, "wall_seconds": round(time.perf_counter() - t_start, 1),
                "save_seconds": round(save_s, 1), "world_size": self.world}


def _public(d: dict) -> str:
    """A scheduler config without diffusers' bookkeeping keys (``_class_name``, ...), as comparable JSON."""
    return json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, sort_keys=True)


def carry_from_bundle(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A bundled zoo folder (:func:`bundle_cm`) read back as a carry state: its fp16 weights become the EMA, the
    step count and recipe come from card.json. Resuming from it is a warm restart (fresh Adam, lr re-warmed)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        card = json.loads((folder / "card.json").read_text())
        unet = json.loads((folder / "config.json").read_text())
        sconf = json.loads((folder / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: not a bundled consistency model (card.json, config.json, scheduler_config.json): {e}") from None
    if card.get("kind") != "cm":
        raise ValueError(f"{folder}: card.json says kind={card.get('kind')!r}, not a consistency model")
    unet.pop("class", None)
    sconf.pop("class", None)
    tensors = {f"ema.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    training, recipe = card.get("training", {}), card.get("recipe", {})
    doc = {"format": FORMAT, "kind": "carry", "step": int(training.get("steps", 0)), "unet_config": unet,
           "scheduler_config": sconf, "config": recipe.get("train_config", {}), "teacher": recipe.get("teacher"),
           "train_seconds": training.get("train_seconds", 0.0), "history_tail": training.get("history_tail", []),
           "resumes": training.get("resumes") or [], "images_seen": training.get("images_seen"),
           "bundle": str(folder)}
    return tensors, doc


def _jsonable(d: dict) -> dict:
    from diffquant.zoo.bundle import _jsonable as j

    return j(d)


def train_cm(cfg: CMTrainConfig, resume: str | None = "auto", max_minutes: float | None = None,
             until_step: int | None = None, stop_file: str | None = None, teacher: Optional[tuple] = None) -> dict:
    """Build a trainer, resume (``"auto"``: RUN/state if present; or a folder: full or carry state), train a
    chunk, save. Returns a summary dict."""
    tr = CMTrainer(cfg, teacher=teacher)
    resumed = None
    if resume == "auto":
        if (Path(cfg.run_dir) / "state" / "state.json").is_file():
            resumed = tr.load(Path(cfg.run_dir) / "state")
    elif resume:
        resumed = tr.load(resume)
    start = tr.step
    out = tr.train(max_minutes=max_minutes, until_step=until_step, stop_file=stop_file)
    return {**out, "start_step": start, "resumed_from": resumed}


# ------------------------------------------------------------------------------------------------
# the trained model: a UNet2DModel + CMStochasticIterativeScheduler


def cm_unet(state_folder: str | Path, which: str = "ema", round_fp16: bool = True):
    """(UNet2DModel fp32 eval, CMStochasticIterativeScheduler, doc) from a CD state. ``round_fp16``: the weights
    as they would be bundled (fp16)."""
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    tensors, doc = load_state(state_folder)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{state_folder}: not a diffquant consistency-distillation state")
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["unet_config"].items()}
    model = UNet2DModel(**conf)
    prefix = f"{which}."
    sd = {k[len(prefix):]: (v.half() if round_fp16 else v).float() for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(sd)
    sconf = {k: v for k, v in doc["scheduler_config"].items() if not k.startswith("_")}
    return model.eval(), CMStochasticIterativeScheduler(**sconf), doc


def bundle_cm(state_folder: str | Path, out: str | Path, which: str = "ema", card: dict | None = None) -> Path:
    """Write the ``which`` weights of a CD state as a zoo folder: model.safetensors (fp16), config.json,
    scheduler_config.json (CMStochasticIterativeScheduler), card.json."""
    from safetensors.torch import save_file

    tensors, doc = load_state(state_folder)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{state_folder}: not a diffquant consistency-distillation state")
    prefix = f"{which}."
    sd = {k[len(prefix):]: v.to(torch.float16).contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{state_folder}: no {which!r} weights in this state")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "dtype": "float16", "weights": which,
                                                             "step": str(doc.get("step"))})
    (out / "config.json").write_text(json.dumps({"class": "UNet2DModel", **doc["unet_config"]}, indent=2) + "\n")
    sconf = {k: v for k, v in doc["scheduler_config"].items() if not k.startswith("_")}
    (out / "scheduler_config.json").write_text(
        json.dumps({"class": "CMStochasticIterativeScheduler", **sconf}, indent=2) + "\n")
    base = {"name": "cifar10-cm", "kind": "cm", "weights": which, "weights_dtype": "float16",
            "parameters": int(sum(v.numel() for v in sd.values())),
            "scheduler": "CMStochasticIterativeScheduler: " + json.dumps(sconf),
            "recipe": {"module": "diffquant.zoo.train_cm", "train_config": doc["config"], "teacher": doc["teacher"]},
            "training": {"steps": doc["step"], "images_seen": doc.get("images_seen"), "resumes": doc.get("resumes"),
                         "train_seconds": doc.get("train_seconds"), "device": doc.get("device"),
                         "torch": doc.get("torch"), "history_tail": doc.get("history_tail")}}
    (out / "card.json").write_text(json.dumps({**base, **(card or {})}, indent=2) + "\n")
    return out


@torch.no_grad()
def quick_eval(model, scheduler, *, n: int = 2000, steps=(1, 2, 4), seed: int = 0, batch_size: int = 500,
               device: Any = "cpu", grid_n: int = 100) -> dict:
    """Sample ``n`` images at each step count (seeds seed..seed+n-1, diffquant.sampling's cm path) and
    measure fd_cifar against the bundled CIFAR-10-JPEG train statistics. Returns {"fd_cifar": {steps: FD},
    "seconds": {...}, "grids": {steps: uint8 images}}. FD from a few thousand samples is biased upwards:
    compare values at equal n only."""
    from diffquant import zoo
    from diffquant.evaluation.features import reference_stats
    from diffquant.evaluation.fid import frechet_distance, statistics_from_features
    from diffquant.sampling import SamplerSpec, sample
    from diffquant.zoo.bundle import classifier_features

    model = model.to(device).eval()
    feat_net = zoo.load("cifar10-features", device=device).model
    ref = reference_stats("cifar10-features", "train")
    res: dict[str, Any] = {"n": n, "seed": seed, "fd_cifar": {}, "seconds": {}, "grids": {}}
    for k in steps:
        t0 = time.perf_counter()
        imgs = sample(model, scheduler, num=n, seed=seed, spec=SamplerSpec("cm", int(k)), batch_size=batch_size,
                      device=device, progress=False).images
        res["seconds"][str(k)] = round(time.perf_counter() - t0, 2)
        st = statistics_from_features(classifier_features(feat_net, imgs, device))
        res["fd_cifar"][str(k)] = float(frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma))
        res["grids"][str(k)] = imgs[:grid_n]
    return res


if __name__ == "__main__":  # python -m diffquant.zoo.train_cm ...  (same as `diffquant train cm`)
    from diffquant.commands.train import cm

    cm(prog_name="python -m diffquant.zoo.train_cm")
