"""Training recipe of ``zoo:cifar10-ddpm`` (and any UNet2DModel DDPM on an image set).

Recipe (DDPM, Ho et al. 2020, at a quarter of the width): epsilon prediction with MSE loss,
linear betas 1e-4..0.02 over 1000 steps, Adam lr 2e-4 with linear warm-up, gradient-norm clip 1.0,
batch 128, dropout 0.1, random horizontal flips, EMA of the weights (decay 0.9999, fp32, with the
usual warm-up ``min(decay, (1+step)/(10+step))``), bf16 autocast + channels_last on CUDA, optional
``torch.compile``.

Chunked runs. :func:`train_ddpm` stops after ``max_minutes`` (or ``until_step``, a stop file, or
SIGTERM/SIGINT) and writes:

* ``RUN/state/`` — the **full state**: fp32 weights, fp32 EMA, Adam moments, step. Resuming from it
  continues *exactly* as an uninterrupted run (every step's randomness — batch order, flips, time
  steps, noise, dropout — is drawn from seeds derived from (seed, step), so no RNG state is needed).
  ~110 MB for the zoo model: it stays on the machine's local disk.
* ``EXPORT/`` (``export_dir``) — the **compact state**: fp16 weights + fp16 EMA in safetensors
  shards of <= 15 MiB and ``state.json`` (step, config, history). ~36 MB: small enough to come back
  from the GPU machine. Resuming from it is a **warm restart**: weights and EMA continue (rounded to
  fp16), Adam's moments are re-estimated over ``moment_steps`` batches with the learning rate at 0,
  then the learning rate re-warms linearly over ``rewarm_steps``. Each warm restart is recorded in
  ``state.json`` under ``warm_restarts``.
* ``RUN/snapshots/ema-stepNNNNNNN/`` — fp16 EMA snapshots at ``snapshot_steps`` (early-training
  models for showing the scale of FD).
* ``RUN/metrics.jsonl`` — one line per ``log_every`` steps: loss, lr, images/s, elapsed.

A watcher (another process) can ask a running trainer for a fresh compact state by creating
``RUN/EXPORT_NOW``; the trainer writes ``EXPORT/`` after its current step and deletes the file.
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffquant.zoo.checkpoint import MiB, load_state, save_state

log = logging.getLogger(__name__)

TINY_DDPM_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,
)


def unet_preset(name: str) -> dict:
    """UNet2DModel configs by name: ``zoo`` (the zoo DDPM, ~9M params) or ``tiny`` (tests)."""
    from diffquant.models.configs import ZOO_CIFAR10_DDPM

    presets = {"zoo": ZOO_CIFAR10_DDPM, "tiny": TINY_DDPM_UNET}
    if name not in presets:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(presets)} or pass a config dict")
    return dict(presets[name])


@dataclass
class DDPMTrainConfig:
    data: str
    run_dir: str
    unet: Any = "zoo"  # preset name or a UNet2DModel config dict
    scheduler: dict = field(default_factory=dict)  # overrides of models.configs.DDPM_SCHEDULER
    dropout: float = 0.1
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 1000
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    hflip: bool = True
    seed: int = 0
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "none"
    compile: bool = False
    channels_last: bool = True
    log_every: int = 100
    save_every_minutes: float = 5.0
    export_dir: str | None = None
    export_every_minutes: float | None = None
    snapshot_steps: list = field(default_factory=list)
    moment_steps: int = 100
    rewarm_steps: int = 1000
    device: str = "auto"

    def to_json(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


def _unet_config(cfg: DDPMTrainConfig) -> dict:
    conf = unet_preset(cfg.unet) if isinstance(cfg.unet, str) else dict(cfg.unet)
    conf["dropout"] = cfg.dropout
    return conf


def _scheduler(cfg: DDPMTrainConfig):
    from diffusers import DDPMScheduler

    from diffquant.models.configs import DDPM_SCHEDULER

    return DDPMScheduler(**{**DDPM_SCHEDULER, **cfg.scheduler})


def _step_seed(seed: int, step: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1)


class _Batches:
    """Batch indices: a fresh permutation per epoch (seeded by (seed, epoch)), drop-last."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if n < batch_size:
            raise ValueError(f"dataset has {n} images, fewer than the batch size {batch_size}")
        self.n, self.bs, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_step_seed(self.seed, epoch, stream=1))
            # one host-to-device copy per epoch; per-step slicing then stays on the device
            self._perm, self._epoch = torch.randperm(self.n, generator=g).to(self.device), epoch
        return self._perm[k * self.bs : (k + 1) * self.bs]


class DDPMTrainer:
    def __init__(self, cfg: DDPMTrainConfig) -> None:
        from diffusers import UNet2DModel

        from diffquant.data import load_images

        self.cfg = cfg
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        cuda = self.device.type == "cuda"
        if cfg.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none'; got {cfg.amp!r}")
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        data = load_images(cfg.data)
        self.data_info = {"path": str(cfg.data), "count": len(data), "shape": list(data.images.shape[1:])}
        self.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(self.device)  # uint8 NHWC
        log.info("loaded %d images from %s in %.1fs", len(data), cfg.data, time.perf_counter() - t0)

        self.unet_config = _unet_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = UNet2DModel(**self.unet_config).to(self.device)
        if cuda and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.ema = [p.detach().clone().float() for p in self.params]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                    fused=cuda or None)
        self.scheduler = _scheduler(cfg)
        ac = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1 - ac).sqrt()
        self.T = int(self.scheduler.config.num_train_timesteps)
        self.batches = _Batches(len(data), cfg.batch_size, cfg.seed, self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self._compiled_ok = False
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.warm_restarts: list[dict] = []
        self.rewarm_from: int | None = None

    # ---------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        lr = self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        if self.rewarm_from is not None:
            lr *= min(1.0, (step - self.rewarm_from + 1) / max(1, self.cfg.rewarm_steps))
        return lr

    def ema_decay_at(self, step: int) -> float:
        if not self.cfg.ema_warmup:
            return self.cfg.ema_decay
        return min(self.cfg.ema_decay, (1 + step) / (10 + step))

    # ---------------------------------------------------------------- one step
    def _loss(self, step: int, stream: int = 0) -> torch.Tensor:
        torch.manual_seed(_step_seed(self.cfg.seed, step, stream))
        idx = self.batches(step)
        x0 = self.images[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        n = x0.shape[0]
        if self.cfg.hflip:
            flip = torch.rand(n, device=self.device) < 0.5
            x0 = torch.where(flip.view(n, 1, 1, 1), x0.flip(3), x0)
        t = torch.randint(0, self.T, (n,), device=self.device)
        noise = torch.randn_like(x0)
        xt = self.sqrt_ac[t].view(n, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(n, 1, 1, 1) * noise
        if self.device.type == "cuda" and self.cfg.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred = self.forward(xt, t).sample
        return F.mse_loss(pred.float(), noise)

    def train_step(self) -> torch.Tensor:
        step = self.step
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        loss = self._loss(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - self.ema_decay_at(step))
        self.step += 1
        return torch.stack([loss.detach(), gnorm.detach().float()])

    def reestimate_moments(self, steps: int) -> None:
        """Warm restart: fill Adam's moments from ``steps`` batches with the learning rate at 0."""
        for g in self.opt.param_groups:
            g["lr"] = 0.0
        for k in range(steps):
            loss = self._loss(self.step + k, stream=2)  # its own randomness: the main stream stays as it was
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()

    # ---------------------------------------------------------------- state
    def _doc(self, kind: str) -> dict:
        return {
            "format": "diffquant-ddpm-train-v1",
            "kind": kind,
            "step": self.step,
            "images_seen": self.step * self.cfg.batch_size,
            "train_seconds": round(self.train_seconds, 1),
            "config": self.cfg.to_json(),
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.unet_config.items()},
            "scheduler_config": dict(self.scheduler.config),
            "data": self.data_info,
            "warm_restarts": self.warm_restarts,
            "rewarm_from": self.rewarm_from,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "history_tail": self.history[-20:],
        }

    def _weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for n, p, e in zip(self.names, self.params, self.ema):
            out[f"model.{n}"] = p.detach().to("cpu", dtype)
            out[f"ema.{n}"] = e.detach().to("cpu", dtype)
        return out

    def save_full(self, folder: str | Path | None = None) -> Path:
        tensors = self._weights(torch.float32)
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p)
            if st:
                for k, v in st.items():
                    tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().to("cpu")
        doc = self._doc("full")
        return save_state(folder or self.run_dir / "state", tensors, doc)

    def save_compact(self, folder: str | Path) -> Path:
        return save_state(folder, self._weights(torch.float16), self._doc("compact"), max_shard_bytes=15 * MiB)

    def save_snapshot(self) -> Path:
        tensors = {f"ema.{n}": e.detach().to("cpu", torch.float16) for n, e in zip(self.names, self.ema)}
        folder = self.run_dir / "snapshots" / f"ema-step{self.step:07d}"
        return save_state(folder, tensors, self._doc("ema-snapshot"), max_shard_bytes=15 * MiB)

    def load(self, folder: str | Path) -> str:
        """Resume from a full state (exact) or a compact one (warm restart). Returns the kind."""
        tensors, doc = load_state(folder)
        if doc.get("format") != "diffquant-ddpm-train-v1":
            raise ValueError(f"{folder}: not a diffquant DDPM training state (format {doc.get('format')!r})")
        kind = doc.get("kind")
        if kind not in ("full", "compact"):
            raise ValueError(f"{folder}: cannot resume from a {kind!r} checkpoint (need 'full' or 'compact')")
        mine = {k: v for k, v in doc["unet_config"].items()}
        if json.dumps(mine, sort_keys=True) != json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in self.unet_config.items()}, sort_keys=True
        ):
            raise ValueError(f"{folder}: the checkpoint's UNet config differs from this run's")
        with torch.no_grad():
            for n, p, e in zip(self.names, self.params, self.ema):
                p.copy_(tensors[f"model.{n}"].to(p.device, p.dtype))
                e.copy_(tensors[f"ema.{n}"].to(e.device, e.dtype))
        self.step = int(doc["step"])
        self.train_seconds = float(doc.get("train_seconds", 0.0))
        self.warm_restarts = list(doc.get("warm_restarts", []))
        self.rewarm_from = doc.get("rewarm_from")
        self.history = list(doc.get("history_tail", []))
        if kind == "full":
            state = {}
            for i in range(len(self.params)):
                st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
                if st:
                    state[i] = st
            self.opt.load_state_dict({"state": state, "param_groups": self.opt.state_dict()["param_groups"]})
        else:
            t0 = time.perf_counter()
            self.reestimate_moments(self.cfg.moment_steps)
            self.rewarm_from = self.step
            self.warm_restarts.append({"step": self.step, "moment_steps": self.cfg.moment_steps,
                                       "rewarm_steps": self.cfg.rewarm_steps,
                                       "seconds": round(time.perf_counter() - t0, 1)})
            log.info("warm restart at step %d (Adam moments from %d batches, lr re-warm over %d steps)",
                     self.step, self.cfg.moment_steps, self.cfg.rewarm_steps)
        return kind

    # ---------------------------------------------------------------- loop
    def train(self, max_minutes: float | None = None, until_step: int | None = None,
              stop_file: str | None = None) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        deadline = t_start + 60 * max_minutes if max_minutes else math.inf
        stop = {"flag": False}

        def _on_signal(signum, frame):  # noqa: ARG001
            stop["flag"] = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _main_thread() else {}
        metrics = open(self.run_dir / "metrics.jsonl", "a")
        last_save = last_export = time.perf_counter()
        acc = torch.zeros(2, device=self.device)
        n_acc = 0
        t_win = time.perf_counter()
        reason = "until_step"
        try:
            while until_step is None or self.step < until_step:
                if stop["flag"] or (stop_file and os.path.exists(stop_file)):
                    reason = "stopped"
                    break
                if time.perf_counter() >= deadline:
                    reason = "max_minutes"
                    break
                if self.forward is not self.model and not self._compiled_ok:
                    try:
                        acc += self.train_step()
                        self._compiled_ok = True
                    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
                        log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(e).__name__, e)
                        self.forward = self.model
                        continue
                else:
                    acc += self.train_step()
                n_acc += 1
                if self.step in set(cfg.snapshot_steps):
                    self.save_snapshot()
                if cfg.export_dir and os.path.exists(self.run_dir / "EXPORT_NOW"):
                    self.save_compact(cfg.export_dir)  # asked for by a watcher: write, then clear the request
                    os.remove(self.run_dir / "EXPORT_NOW")
                    last_export = time.perf_counter()
                if self.step % cfg.log_every == 0:
                    vals = (acc / n_acc).tolist()  # syncs
                    now = time.perf_counter()
                    self.train_seconds += now - t_win
                    rec = {"step": self.step, "loss": round(vals[0], 5), "grad_norm": round(vals[1], 4),
                           "lr": self.lr_at(self.step - 1), "images_per_s": round(n_acc * cfg.batch_size / (now - t_win), 1),
                           "train_seconds": round(self.train_seconds, 1)}
                    self.history.append(rec)
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    log.info("ddpm %s", json.dumps(rec))
                    acc.zero_()
                    n_acc = 0
                    t_win = time.perf_counter()
                    if now - last_save >= 60 * cfg.save_every_minutes:
                        self.save_full()
                        last_save = time.perf_counter()
                    if cfg.export_dir and cfg.export_every_minutes and now - last_export >= 60 * cfg.export_every_minutes:
                        self.save_compact(cfg.export_dir)
                        last_export = time.perf_counter()
                    t_win += time.perf_counter() - now  # saving time is not training time
            if n_acc:
                self.train_seconds += time.perf_counter() - t_win
            self.save_full()
            if cfg.export_dir:
                self.save_compact(cfg.export_dir)
        finally:
            metrics.close()
            for s, h in old.items():
                signal.signal(s, h)
        return {"step": self.step, "reason": reason, "wall_seconds": round(time.perf_counter() - t_start, 1)}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train_ddpm(cfg: DDPMTrainConfig, resume: str | None = "auto", max_minutes: float | None = None,
               until_step: int | None = None, stop_file: str | None = None) -> dict:
    """Build a trainer, resume (``"auto"``: RUN/state if it exists; or a folder: full or compact
    state), train for a chunk, save. Returns a summary dict."""
    tr = DDPMTrainer(cfg)
    resumed = None
    if resume == "auto":
        if (Path(cfg.run_dir) / "state" / "state.json").is_file():
            resumed = tr.load(Path(cfg.run_dir) / "state")
    elif resume:
        resumed = tr.load(resume)
    start = tr.step
    out = tr.train(max_minutes=max_minutes, until_step=until_step, stop_file=stop_file)
    return {**out, "start_step": start, "resumed_from": resumed}


def ema_unet(state_folder: str | Path, which: str = "ema"):
    """A UNet2DModel (fp32, eval) with the ``ema`` (or ``model``) weights of a training state or snapshot."""
    from diffusers import UNet2DModel

    tensors, doc = load_state(state_folder)
    conf = dict(doc["unet_config"])
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()}
    model = UNet2DModel(**conf)
    prefix = f"{which}."
    sd = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(k for k in missing if not k.endswith(("running_mean", "running_var"))):
        raise ValueError(f"{state_folder}: weights do not match the UNet config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), doc


if __name__ == "__main__":  # python -m diffquant.zoo.train_ddpm ...  (same as `diffquant train ddpm`)
    from diffquant.commands.train import ddpm

    ddpm(prog_name="python -m diffquant.zoo.train_ddpm")
