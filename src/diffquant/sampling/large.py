"""Sampling at scale: a run of N samples split into seeded shards, written as they finish,
resumable, on one process or on several (``torchrun``, one GPU per rank), with samples that are
byte-identical whatever the number of processes, the shard split or the batch size.

Shards
    Shard ``k`` of a run with seed ``s`` and shard size ``S`` holds the samples with seeds
    ``s + k*S .. s + min((k+1)*S, N) - 1`` (sample ``i`` always has seed ``s + i``, as in
    :func:`~diffquant.sampling.sample`). Each shard is written to ``OUT_DIR/shard-KKKKK.npz``
    (the sample-set format of :mod:`diffquant.sampling.io`) through a temporary file and an atomic
    rename, so a file that exists is complete. Its ``meta`` records the model fingerprint (a hash
    of the state dict), the sampler, the seeds and the numerics (compute batch, device type); on
    resume a shard is kept only if they match, and a folder holding shards of a *different* run
    (other model, sampler or numerics) is refused.

Fixed compute batch (why samples do not depend on the batch size)
    A denoiser's output for one sample is not bitwise independent of how many samples share the
    forward pass: oneDNN on CPU and cuDNN/cuBLAS on GPU choose algorithms by problem size (a UNet
    forward at batch 8 and at batch 3 differ by ~2e-6 on CPU), and DDIM with an epsilon-predicting
    model amplifies such differences until uint8 pixels differ. Here the model is always evaluated
    in chunks of exactly ``compute_batch`` rows: sample ``i`` of the run sits in slot
    ``i mod compute_batch`` of its chunk, and unused slots are filled with copies of a real row.
    The numbers a sample sees therefore depend on ``compute_batch`` and on the device type, never on
    ``batch_size`` (how many samples go through the sampling loop together), the shard size, which
    rank computed the shard, or whether the run was interrupted. Samples are identical for a given
    ``compute_batch``, device type (and GPU model), torch build and TF32 setting, and on CPU for a
    given number of threads (``torch.get_num_threads()``: CPU kernels split their reductions by
    thread count, so 1 and 2 threads give different bits). ``batch_size`` is a
    memory knob; a multiple of ``compute_batch`` wastes no compute on padding.

Several processes
    Under ``torchrun`` (or any initialised ``torch.distributed`` process group) rank ``r`` of ``W``
    computes the shards ``k`` with ``k mod W == r``; all ranks write into the same folder (one
    host, or a shared file system); rank 0 merges the shards, in seed order, into one ``.npz``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from diffquant.models.adapter import call_model
from diffquant.sampling.io import load_samples, save_samples
from diffquant.sampling.samplers import SamplerSpec, sample

log = logging.getLogger(__name__)

SHARD_FORMAT = "diffquant-shard/1"
DEFAULT_COMPUTE_BATCH = 64

__all__ = [
    "DEFAULT_COMPUTE_BATCH",
    "FixedBatchModel",
    "ShardPlan",
    "ShardedRun",
    "merge_shards",
    "model_fingerprint",
    "sample_fixed",
    "sample_sharded",
    "shard_path",
]


# ---------------------------------------------------------------------------------------------
# fixed compute batch


class FixedBatchModel(nn.Module):
    """Wraps a denoiser so that it is always evaluated on exactly ``compute_batch`` rows.

    Row ``j`` of an input goes to slot ``(offset + j) mod compute_batch`` of chunk
    ``(offset + j) // compute_batch``; empty slots hold copies of the chunk's first real row.
    Set :attr:`offset` (the run index of row 0) before each call. Per-row conditioning tensors
    (``class_labels``, ``encoder_hidden_states``, ...: a leading dimension equal to the batch) are
    gathered the same way; other keyword arguments pass through unchanged.
    """

    def __init__(self, model: nn.Module, compute_batch: int) -> None:
        super().__init__()
        if not isinstance(compute_batch, int) or isinstance(compute_batch, bool) or compute_batch < 1:
            raise ValueError(f"compute_batch={compute_batch!r} must be a positive integer")
        self.model = model
        self.compute_batch = compute_batch
        self.offset = 0
        self.forwards = 0  # model evaluations (chunks) so far
        self.padded_rows = 0  # slots filled with copies so far

    @property
    def config(self):  # sample() reads sample_size / in_channels / num_class_embeds from here
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        n, cb = x.shape[0], self.compute_batch
        if t.dim() == 0:
            t = t.expand(n)
        pos = self.offset + np.arange(n)
        outs = []
        for block in range(int(pos[0]) // cb, int(pos[-1]) // cb + 1):
            rows = np.flatnonzero(pos // cb == block)  # rows of this chunk, in slot order
            slots = pos[rows] % cb
            idx = np.full(cb, rows[0], dtype=np.int64)
            idx[slots] = rows
            gather = torch.as_tensor(idx, device=x.device)
            ccond = {k: (v.index_select(0, gather.to(v.device)) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n
                         else v) for k, v in cond.items()}
            out = call_model(self.model, x.index_select(0, gather), t.index_select(0, gather.to(t.device)), ccond)
            outs.append(out.index_select(0, torch.as_tensor(slots, device=out.device)))
            self.forwards += 1
            self.padded_rows += cb - len(rows)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _set_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


@torch.no_grad()
def sample_fixed(
    model: nn.Module,
    scheduler: Any,
    *,
    start: int,
    stop: int,
    seed: int = 0,
    spec: SamplerSpec = SamplerSpec(),
    batch_size: int = DEFAULT_COMPUTE_BATCH,
    compute_batch: int = DEFAULT_COMPUTE_BATCH,
    device: Any = None,
    class_labels: Optional[Sequence[int]] = None,
    cond_fn: Optional[Callable[[np.ndarray], dict]] = None,
    return_float: bool = False,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[np.ndarray, np.ndarray, Optional[torch.Tensor]]:
    """Samples ``start .. stop-1`` of a run with seed ``seed`` (seeds ``seed+start ..``), the model
    evaluated in a fixed compute batch (see the module docstring).

    ``class_labels``: one label per sample of the *run* (indexed by run index), or None.
    ``on_batch(n)`` is called after each sampling batch with its number of samples.
    Returns (uint8 NHWC images, int64 seeds, float NCHW images or None)."""
    if not (0 <= start < stop):
        raise ValueError(f"need 0 <= start < stop; got start={start}, stop={stop}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    wrapper = model if isinstance(model, FixedBatchModel) else FixedBatchModel(model, compute_batch)
    imgs, seeds, floats = [], [], []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        wrapper.offset = lo
        labels = None if class_labels is None else list(class_labels[lo:hi])
        res = sample(wrapper, scheduler, num=hi - lo, seed=seed + lo, spec=spec, batch_size=hi - lo, device=device,
                     class_labels=labels, cond_fn=cond_fn, progress=False, return_float=return_float)
        imgs.append(res.images)
        seeds.append(res.seeds)
        if return_float:
            floats.append(res.float_images)
        if on_batch is not None:
            on_batch(hi - lo)
    return np.concatenate(imgs), np.concatenate(seeds), (torch.cat(floats) if return_float else None)


# ---------------------------------------------------------------------------------------------
# shards


@dataclass(frozen=True)
class ShardPlan:
    """``num`` samples with seeds ``seed ..``, in shards of ``shard_size``."""

    num: int
    seed: int = 0
    shard_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("num", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def bounds(self, k: int) -> tuple[int, int]:
        """Run indices [start, stop) of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise ValueError(f"shard {k} does not exist; the run has shards 0..{self.num_shards - 1}")
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num)

    def seeds(self, k: int) -> np.ndarray:
        a, b = self.bounds(k)
        return np.arange(self.seed + a, self.seed + b, dtype=np.int64)


def shard_path(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / f"shard-{k:05d}.npz"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model class, its quantization config and every tensor
    of its state dict (names, dtypes, shapes, bytes)."""
    if isinstance(model, FixedBatchModel):
        model = model.model
    h = hashlib.sha256(type(model).__name__.encode())
    qcfg = getattr(model, "_diffquant_config", None)
    if qcfg is not None:
        h.update(json.dumps(qcfg.to_dict(), sort_keys=True).encode())
    for name, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}".encode())
        if v.dtype == torch.bfloat16:
            v = v.view(torch.int16)
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def _numerics(device: torch.device, compute_batch: int) -> dict[str, Any]:
    """What decides the bits of a sample besides model, sampler and seed (checked on resume)."""
    d: dict[str, Any] = {"compute_batch": compute_batch, "device_type": device.type}
    if device.type == "cpu":  # CPU kernels split reductions by thread count: results differ between 1 and 2 threads
        d["cpu_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        d["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        d["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    return d


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


@dataclass
class ShardedRun:
    out_dir: str
    out: Optional[str]  # merged file (rank 0 with merge=True), else None
    num: int
    num_shards: int
    computed: list[int] = field(default_factory=list)  # shards this process computed
    reused: list[int] = field(default_factory=list)  # finished shards found on disk (this process's)
    seconds: float = 0.0
    images_computed: int = 0
    images_per_second: Optional[float] = None  # this process; all ranks together on rank 0
    rank: int = 0
    world_size: int = 1
    images_sha256: Optional[str] = None  # of the merged images array (rank 0)
    meta: dict = field(default_factory=dict)
    images: Optional[np.ndarray] = None
    seeds: Optional[np.ndarray] = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("images", "seeds")}
        return d


def _check_shard(path: Path, k: int, plan: ShardPlan, key: dict[str, Any]) -> str:
    """'ok' if the shard on disk is the expected one, 'stale' if it is from the same run
    configuration but other seeds (the run size changed), 'corrupt' if unreadable; raises
    ValueError if it belongs to a different run."""
    try:
        images, seeds, meta = load_samples(path)
    except ValueError as e:
        log.warning("shard %d (%s) is unreadable (%s); it will be recomputed", k, path, e)
        return "corrupt"
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a diffquant shard (format {meta.get('format')!r}); "
                         f"use an empty --out-dir for a sharded run")
    for name, want in key.items():
        have = meta.get(name)
        if have != want:
            raise ValueError(
                f"{path} belongs to a different run: its {name} is {have!r}, this run's is {want!r}. "
                f"Use another --out-dir, or delete the folder's shards to start over")
    want_seeds = plan.seeds(k)
    if not np.array_equal(seeds, want_seeds) or images.shape[0] != want_seeds.shape[0]:
        log.warning("shard %d (%s) holds seeds %s..%s, expected %d..%d (the run size changed); recomputing",
                    k, path, seeds[:1].tolist(), seeds[-1:].tolist(), int(want_seeds[0]), int(want_seeds[-1]))
        return "stale"
    return "ok"


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t.item())


@torch.no_grad()
def sample_sharded(
    model: nn.Module,
    scheduler: Any,
    *,
    num: int,
    out_dir: str | Path,
    seed: int = 0,
    spec: SamplerSpec = SamplerSpec(),
    shard_size: int = 1000,
    batch_size: int = DEFAULT_COMPUTE_BATCH,
    compute_batch: int = DEFAULT_COMPUTE_BATCH,
    device: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    model_id: str = "",
    fingerprint: Optional[str] = None,
    class_labels: Optional[Sequence[int]] = None,
    cond_fn: Optional[Callable[[np.ndarray], dict]] = None,
    extra_meta: Optional[dict] = None,
    distributed: Optional[bool] = None,
    keep_in_memory: bool = True,
    progress: bool = True,
    on_shard: Optional[Callable[[int, Path], None]] = None,
) -> ShardedRun:
    """Draw ``num`` samples (seeds ``seed ..``) in shards of ``shard_size`` written to ``out_dir``;
    merge them into ``out`` (if given) in seed order. See the module docstring.

    ``resume``: keep finished shards found in ``out_dir`` (verified by their metadata) and compute
    only the others; without it a folder that already holds shards is refused.
    ``distributed``: None = use the initialised ``torch.distributed`` process group if there is one.
    ``on_shard(k, path)`` is called after shard ``k`` is written (tests use it to interrupt a run).
    ``keep_in_memory``: return the merged images/seeds in the result (rank 0).
    ``fingerprint``: the model identity recorded in (and checked against) the shards; default
    :func:`model_fingerprint` of the model. Give your own when the same model may come back with other
    state-dict bytes (e.g. rebuilt from a packed checkpoint) and you know it computes the same thing.
    """
    plan = ShardPlan(num, seed, shard_size)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if isinstance(compute_batch, bool) or not isinstance(compute_batch, int) or compute_batch < 1:
        raise ValueError(f"compute_batch={compute_batch!r} must be a positive integer")
    if class_labels is not None and len(class_labels) != num:
        raise ValueError(f"class_labels has {len(class_labels)} entries; expected num={num}")
    inner = model.model if isinstance(model, FixedBatchModel) else model
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    rank, world = _dist() if distributed in (None, True) else (0, 1)
    if distributed and world == 1 and rank == 0:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True but no torch.distributed process group is initialised "
                             "(run under torchrun, or call init_process_group first)")
    if batch_size % compute_batch or shard_size % compute_batch:
        log.info("batch_size=%d / shard_size=%d are not multiples of compute_batch=%d: some forward passes "
                 "carry padding rows (same samples, more compute)", batch_size, shard_size, compute_batch)
    _set_deterministic(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    key = {"model_fingerprint": fingerprint or model_fingerprint(inner), "sampler_spec": spec.to_dict(), "run_seed": seed,
           "shard_size": shard_size, **_numerics(device, compute_batch)}
    if class_labels is not None:
        key["class_labels_sha256"] = hashlib.sha256(np.asarray(class_labels, dtype=np.int64).tobytes()).hexdigest()[:16]
    mine = [k for k in range(plan.num_shards) if k % world == rank]
    todo, reused = [], []
    error: Optional[ValueError] = None
    try:
        existing = [k for k in range(plan.num_shards) if shard_path(out_dir, k).is_file()]
        if existing and not resume:
            raise ValueError(f"{out_dir} already holds {len(existing)} shard files (e.g. "
                             f"{shard_path(out_dir, existing[0]).name}); pass resume=True (--resume) to continue "
                             f"that run, or use an empty folder")
        for k in mine:
            p = shard_path(out_dir, k)
            if p.is_file() and _check_shard(p, k, plan, key) == "ok":
                reused.append(k)
            else:
                todo.append(k)
    except ValueError as e:
        error = e
    if world > 1:
        # every rank has looked at the folder before anyone writes to it; a refusal on any rank stops all
        failed = _all_reduce_sum(float(error is not None), device)
        if failed and error is None:
            error = ValueError(f"another rank refused the shard folder {out_dir} (see its error message)")
    if error is not None:
        raise error
    if reused:
        log.info("rank %d: %d finished shards reused, %d to compute", rank, len(reused), len(todo))

    total = sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in todo)
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"sampling {spec.sampler}-{spec.steps}" + (f" [rank {rank}]" if world > 1 else ""),
                   unit="img", leave=False, position=rank if world > 1 else None)
    wrapper = FixedBatchModel(inner, compute_batch)
    device_name = _device_name(device)
    t_start = time.perf_counter()
    done_imgs = 0
    computed: list[int] = []
    try:
        for i, k in enumerate(todo):
            a, b = plan.bounds(k)
            t0 = time.perf_counter()
            imgs, seeds, _ = sample_fixed(wrapper, scheduler, start=a, stop=b, seed=seed, spec=spec,
                                          batch_size=batch_size, device=device, class_labels=class_labels,
                                          cond_fn=cond_fn, on_batch=(bar.update if bar is not None else None))
            secs = time.perf_counter() - t0
            meta = {"format": SHARD_FORMAT, **key, "shard": k, "num_shards": plan.num_shards, "run_num": num,
                    "model": model_id, "seed": int(seeds[0]), "num": int(len(seeds)), **spec.to_dict(),
                    "device_name": device_name, "torch": torch.__version__, "seconds": secs,
                    **(extra_meta or {})}
            path = save_samples(shard_path(out_dir, k), imgs, seeds, meta)
            computed.append(k)
            done_imgs += b - a
            elapsed = time.perf_counter() - t_start
            rate = done_imgs / elapsed
            left = total - done_imgs
            log.info("rank %d: shard %d/%d (seeds %d..%d) %d images in %.1fs (%.2f img/s); %d/%d of this "
                     "process's shards done, %.2f img/s overall, ETA %.0fs", rank, k + 1, plan.num_shards,
                     int(seeds[0]), int(seeds[-1]), b - a, secs, (b - a) / secs, i + 1, len(todo), rate,
                     left / rate if rate > 0 else float("nan"))
            if bar is not None:
                bar.set_postfix_str(f"{rate:.2f} img/s")
            if on_shard is not None:
                on_shard(k, path)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    run = ShardedRun(str(out_dir), None, num, plan.num_shards, computed, reused, seconds, done_imgs,
                     done_imgs / seconds if done_imgs and seconds > 0 else None, rank, world)
    if world > 1:
        all_imgs = _all_reduce_sum(float(done_imgs), device)  # also waits until every shard is on disk
        wall = time.perf_counter() - t_start
        if rank == 0:
            run.images_per_second = all_imgs / wall if all_imgs else None
            log.info("%d ranks: %d images in %.1fs (%.2f img/s together)", world, int(all_imgs), wall,
                     all_imgs / wall if wall > 0 else float("nan"))
    if rank != 0:
        return run
    run_meta = {"model": model_id, "seed": seed, "num": num, **spec.to_dict(), **key, "num_shards": plan.num_shards,
                "world_size": world, "device_name": device_name, "torch": torch.__version__, **(extra_meta or {})}
    if out is not None or keep_in_memory:
        stats: dict[str, Any] = {}
        images, seeds = merge_shards(out_dir, plan, key, stats)
        run_meta["shard_seconds"] = stats["shard_seconds"]  # sampling time of all shards, when they were computed
        run.images_sha256 = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        run_meta["images_sha256"] = run.images_sha256
        if out is not None:
            save_samples(out, images, seeds, run_meta)
            run.out = str(out)
            log.info("merged %d shards (%d samples) into %s", plan.num_shards, num, out)
        if keep_in_memory:
            run.images, run.seeds = images, seeds
    run.meta = run_meta
    return run


def merge_shards(out_dir: str | Path, plan: ShardPlan, key: Optional[dict[str, Any]] = None,
                 stats: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read every shard of ``plan`` from ``out_dir`` (its metadata checked against ``key`` if given)
    and return the images and seeds in seed order. ``stats`` (a dict) receives ``shard_seconds``:
    the sampling seconds recorded in the shards, summed (whenever and wherever they were computed)."""
    imgs, seeds = [], []
    total_seconds = 0.0
    for k in range(plan.num_shards):
        p = shard_path(out_dir, k)
        if not p.is_file():
            raise ValueError(f"cannot merge: shard {k} ({p}) is missing")
        i, s, meta = load_samples(p)
        if key is not None:
            bad = [name for name, want in key.items() if meta.get(name) != want]
            if bad:
                raise ValueError(f"cannot merge: shard {k} ({p}) is from another run ({', '.join(bad)} differ)")
        if not np.array_equal(s, plan.seeds(k)):
            raise ValueError(f"cannot merge: shard {k} ({p}) does not hold seeds {plan.seeds(k)[0]}..{plan.seeds(k)[-1]}")
        imgs.append(i)
        seeds.append(s)
        total_seconds += float(meta.get("seconds") or 0.0)
    if stats is not None:
        stats["shard_seconds"] = total_seconds
    return np.concatenate(imgs), np.concatenate(seeds)


def init_distributed_from_env(device: Optional[str] = None) -> Optional[torch.device]:
    """If launched by ``torchrun`` (``WORLD_SIZE`` > 1) and no process group exists, create one
    (NCCL on CUDA, gloo on CPU) and return this rank's device; else None."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    if not dist.is_initialized():
        import datetime

        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return dev
