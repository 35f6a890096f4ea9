"""Q-Diffusion post-training quantization (Li et al., ICCV 2023): time-step-aware calibration
data + BRECQ-style block reconstruction + split shortcut quantization.

Recipe, unit by unit in forward order (see :mod:`diffquant.algorithms.blocks`):

1. **Weights** (activations in floating point): AdaRound. The unit's input comes from the model
   whose earlier units are already reconstructed; its target is the full-precision model's output of
   the same unit. Loss ``mean_over_rest(sum_over_channels |out - target|^p)`` (p = 2) plus
   ``lambda * sum(1 - |2h - 1|^beta)`` after a warm-up, beta annealed 20 -> 2; Adam (lr 1e-3) on
   alpha; then hard rounding, baked into the weights.
2. **Activation ranges** initialised on the calibration data with the config's estimator (the Lp
   search of Q-Diffusion by default) with all weights quantized.
3. **Activations**: LSQ-style learned step sizes per unit (Adam lr 4e-4, cosine schedule, p = 2.4),
   with weights and activations quantized upstream.

Split-shortcut quantizers take part in both stages (both halves of the input and of the weight,
including the rounding regulariser of the second half).

Resumable: with ``checkpoint_dir`` the model state and progress are written after every unit;
``resume=True`` continues from there and gives the same result as an uninterrupted run (each unit
draws its minibatches from its own seeded generator).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from diffquant.algorithms.blocks import Unit, capture_unit_data, find_units
from diffquant.calibration.capture import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.models.adapter import call_model
from diffquant.quant.adaround import BetaSchedule, round_regularizer
from diffquant.quantize import act_quantizers, calibrate, quantize, set_quant_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconConfig:
    weight_iters: int = 20_000
    act_iters: int = 5_000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-4
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    weight_p: float = 2.0
    act_p: float = 2.4
    act_init_rows: int = 1024  # calibration rows used to initialise activation ranges
    max_cache_bytes: int = 8 << 30
    cache_dtype: str = "float32"
    seed: int = 0
    cuda_graphs: bool = True  # replay each unit's optimisation step from a CUDA graph (CUDA only)
    capture_batch: Optional[int] = None  # batch of the unit-data capture passes (None: max(batch_size, 64))
    # after the activation stage, compare the unit's reconstruction loss on up to this many captured rows (spread over
    # the calibration set) with the initial and the learned step sizes and keep the better. 0 (default): always keep
    # the learned ones, as Q-Diffusion does. On zoo:cifar10-cm W4A8 it kept the initial step sizes in 10 of
    # 38 units and changed nothing measurable (BENCHMARKS.md, "Keeping the better ... step sizes").
    act_keep_best_rows: int = 0

    def __post_init__(self) -> None:
        for k in ("weight_iters", "act_iters", "act_init_rows", "act_keep_best_rows"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.capture_batch is not None and self.capture_batch < 1:
            raise ValueError(f"capture_batch={self.capture_batch} must be >= 1 (or None)")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"cache_dtype={self.cache_dtype!r}; allowed: float32, bfloat16, float16")


# "paper": the paper's hyper-parameters. "fast": 6 % of the paper's weight iterations at twice the batch,
# a quarter of the calibration rows, half the rows for the activation-range search and larger capture
# batches; "fast-2k", the first fast preset, is kept for comparison. Their quality and calibration time
# against "paper" on zoo:cifar10-ddpm are in BENCHMARKS.md (issue-5 table).
PRESETS: dict[str, ReconConfig] = {
    "paper": ReconConfig(),
    "fast": ReconConfig(weight_iters=1_200, act_iters=300, batch_size=64, act_init_rows=512, capture_batch=256),
    "fast-2k": ReconConfig(weight_iters=2_000, act_iters=500, batch_size=64),
}
PRESET_CALIB = {"paper": {"num_per_step": 256, "num_steps": 20}, "fast": {"num_per_step": 64, "num_steps": 20},
                "fast-2k": {"num_per_step": 64, "num_steps": 20}}


def recon_loss(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's lp_loss: |out - target|^p summed over dim 1 (channels), averaged over the rest."""
    d = (out.float() - target.float()).abs().pow(p)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _unit_forward(unit: Unit, args: list, kwargs: dict) -> torch.Tensor:
    out = unit.module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _gen(seed: int, phase: str, index: int) -> torch.Generator:
    h = int(hashlib.sha256(f"{seed}/{phase}/{index}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(h)


class _Progress:
    """Per-unit checkpoints: progress JSON + a compact model state, both written atomically.

    The state holds every tensor that reconstruction can change except the float weights of layers
    whose unit is not finished yet (those still equal the full-precision weights, and resuming
    rebuilds them from the model), and stores finished layers' weights as their packed integer
    codes (exact: reconstructed weights lie on the quantization grid). A W4 checkpoint of a
    35 MB fp32 model is thus ~5 MB, small enough to move between machines after every unit.
    """

    def __init__(self, folder: Optional[Path], fingerprint: str, resume: bool, weights_fingerprint: str = ""):
        self.folder = folder
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "weights_fingerprint": weights_fingerprint,
                                      "done": {"weights": [], "act_init": [], "acts": []}, "losses": [], "packed": {}}
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        pj = folder / "progress.json"
        if resume and pj.is_file():
            st = json.loads(pj.read_text())
            if st.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{folder}: the checkpoint was made with another model, calibration set or config "
                    f"(fingerprint {st.get('fingerprint')} != {fingerprint}); use a fresh folder or resume=False"
                )
            self.state = st
        elif pj.is_file() and not resume:
            raise ValueError(f"{folder} already holds a reconstruction checkpoint; pass resume=True or another folder")

    def done(self, phase: str, name: str) -> bool:
        return name in self.state["done"][phase]

    @staticmethod
    def _layer_names(model: nn.Module) -> list[str]:
        from diffquant.nn.modules import QUANT_LAYER_TYPES

        return [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]

    def _finished_layers(self, model: nn.Module) -> set[str]:
        units = self.state["done"]["weights"]
        return {n for n in self._layer_names(model) if any(n == u or n.startswith(u + ".") for u in units)}

    def load_into(self, model: nn.Module) -> None:
        if self.folder is None or not (self.folder / "state.safetensors").is_file():
            return
        from safetensors import safe_open
        from safetensors.torch import load_file

        from diffquant.io import _unpack_weights

        path = self.folder / "state.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("progress")
        if meta is not None:  # the state file's own progress wins (a kill may fall between the two writes)
            st = json.loads(meta)
            if st.get("fingerprint") != self.state["fingerprint"]:
                raise ValueError(f"{path}: made with another model, calibration set or config")
            self.state = st
        state = load_file(str(path))
        _unpack_weights(model, state, self.state.get("packed", {}))
        missing, unexpected = model.load_state_dict(state, strict=False)
        finished = self._finished_layers(model)
        allowed = {f"{n}.weight" for n in self._layer_names(model) if n not in finished}
        bad = [k for k in missing if k not in allowed]
        if bad or unexpected:
            raise ValueError(f"{self.folder}: the reconstruction checkpoint does not match the model "
                             f"(missing {bad[:5]}, unexpected {list(unexpected)[:5]})")

    def adopt_weights(self, model: nn.Module, source: Path, unit_names: list[str]) -> dict:
        """Take the finished weight stage of another reconstruction (``source``: its checkpoint
        folder) whose weight view is the same as this run's: its reconstructed weights and weight
        quantizer parameters are loaded into ``model`` and the weight stage is marked done. The
        activation quantizers keep their own (uncalibrated) state. Returns the source's record."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from diffquant.io import _unpack_weights
        from diffquant.nn.quantizers import ActQuantizer

        path = Path(source) / "state.safetensors"
        if not path.is_file():
            raise ValueError(f"weights_from={source}: no reconstruction checkpoint (state.safetensors) there")
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("progress")
        src = json.loads(meta) if meta else {}
        want = self.state.get("weights_fingerprint")
        if src.get("weights_fingerprint") != want:
            raise ValueError(
                f"weights_from={source}: its weight stage was made with another model, calibration set, weight "
                f"config or weight-reconstruction settings (weights fingerprint {src.get('weights_fingerprint')} != "
                f"{want}); only the activation settings may differ")
        missing_units = [u for u in unit_names if u not in src.get("done", {}).get("weights", [])]
        if missing_units:
            raise ValueError(f"weights_from={source}: its weight stage is not finished "
                             f"({len(missing_units)} units left, first {missing_units[0]}); finish or resume it first")
        state = load_file(str(path))
        _unpack_weights(model, state, src.get("packed", {}))
        act_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, ActQuantizer))
        own = model.state_dict()
        take = {k: v for k, v in state.items() if k in own and not k.startswith(act_prefixes)}
        not_there = [k for k in own if not k.startswith(act_prefixes) and k not in take]
        if not_there:
            raise ValueError(f"weights_from={source}: the checkpoint lacks {not_there[:5]}")
        model.load_state_dict(take, strict=False)
        self.state["done"]["weights"] = list(src["done"]["weights"])
        self.state["losses"] = [x for x in src.get("losses", []) if x.get("phase") == "weights"]
        self.state["weights_from"] = {"folder": str(source), "fingerprint": src.get("fingerprint")}
        return src

    def mark(self, model: nn.Module, phase: Optional[str], name: str = "", info: Optional[dict] = None) -> None:
        """Record ``name`` as done in ``phase`` (None: record nothing new) and write the checkpoint."""
        if phase is not None:
            self.state["done"][phase].append(name)
        if info:
            self.state["losses"].append({"phase": phase, "unit": name, **info})
        if self.folder is None:
            return
        from safetensors.torch import save_file

        from diffquant.io import _pack_weights

        finished = self._finished_layers(model)
        st = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        for n in self._layer_names(model):
            if n not in finished:
                st.pop(f"{n}.weight", None)  # still the full-precision weight
        self.state["packed"] = _pack_weights(model, st, only=finished)
        tmp = self.folder / "state.tmp.safetensors"
        save_file(st, str(tmp), metadata={"progress": json.dumps(self.state)})  # self-consistent on its own
        tmp.replace(self.folder / "state.safetensors")
        pj = self.folder / "progress.tmp.json"
        pj.write_text(json.dumps(self.state, indent=1))
        pj.replace(self.folder / "progress.json")


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


# ReconConfig fields that only the activation stages read: the weight stage does not depend on them.
_ACT_ONLY_FIELDS = ("act_iters", "act_lr", "act_p", "act_init_rows", "act_keep_best_rows")


def _weight_view(config: QuantConfig, rc: ReconConfig) -> tuple[QuantConfig, ReconConfig]:
    """The parts of a config that the weight stage depends on: activations in floating point, the
    activation-only reconstruction settings neutralised. Two runs with equal weight views produce the
    same weight stage (AdaRound runs with every activation quantizer passed through)."""
    from diffquant.config import LayerOverride

    ovs = tuple(LayerOverride(o.pattern, skip=o.skip, weight=o.weight, weight_off=o.weight_off) for o in config.overrides)
    wc = config.replace(act=None, attention=None, quantize_attention=False, softmax_bits=16, overrides=ovs)
    return wc, dataclasses.replace(rc, **{k: 0 for k in _ACT_ONLY_FIELDS})


def _fingerprint(model: nn.Module, config: QuantConfig, calib: CalibrationSet, rc: ReconConfig) -> str:
    h = hashlib.sha256()
    h.update(config.to_json().encode())
    h.update(json.dumps(dataclasses.asdict(rc), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
    h.update(calib.xs[:: max(len(calib) // 64, 1)].numpy().tobytes())
    h.update(calib.ts.numpy().tobytes())
    return h.hexdigest()[:16]


def _iter_bar(n: int, desc: str, progress: bool):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(range(n), desc=desc, leave=False, unit="it")
    return range(n)


class _StepLoop:
    """Runs ``iters`` optimisation steps of one unit, eagerly or replayed from a CUDA graph.

    Every step draws its minibatch indices from a table made up front with the unit's seeded
    generator and copies them into a static index tensor, so the step has no host synchronisation
    and the same body serves both paths: on CUDA (``cuda_graphs``) the step is run eagerly for a
    few warm-up iterations on a side stream, then captured once and replayed; elsewhere it runs
    eagerly. Per-step scalars (regulariser weight, beta, learning rate) live in device tensors that
    are filled before each step.
    """

    WARMUP = 3

    def __init__(self, data, rc: ReconConfig, iters: int, gen: torch.Generator, device, graphs: bool):
        self.data, self.iters, self.device = data, iters, torch.device(device)
        bs = min(rc.batch_size, data.n)
        self.idx_all = torch.randint(data.n, (iters, bs), generator=gen).to(data.target.device)
        self.idx = self.idx_all[0].clone()
        self.graphs = (graphs and self.device.type == "cuda" and data.target.device.type == "cuda"
                       and iters > self.WARMUP + 1)
        # the same (capturable) optimiser arithmetic on CUDA with and without graphs
        self.capturable = self.device.type == "cuda"
        self.first: Optional[torch.Tensor] = None
        self.last: Optional[torch.Tensor] = None

    def batch(self):
        return _batch_on(self.data, self.idx, self.device)

    def run(self, body, before_step, desc: str, progress: bool) -> dict:
        """``body()`` computes the loss, back-propagates and steps the optimiser, returning the
        reconstruction loss (a tensor); ``before_step(it)`` fills the per-step scalars."""
        graph = None
        stream = None
        bar = _iter_bar(self.iters, desc, progress)
        for it in bar:
            self.idx.copy_(self.idx_all[it], non_blocking=True)
            before_step(it)
            if not self.graphs:
                rec = body()
            elif it < self.WARMUP:
                if stream is None:
                    stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    rec = body()
                torch.cuda.current_stream(self.device).wait_stream(stream)
            else:
                if graph is None:
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self._static_rec = body()
                graph.replay()
                rec = self._static_rec
            if it == 0:
                self.first = rec.detach().clone()
        self.last = rec.detach().clone() if self.iters else None
        del graph
        return {"rec_loss_first": _f(self.first), "rec_loss_last": _f(self.last), "cuda_graph": bool(self.graphs)}


def _f(t: Optional[torch.Tensor]) -> float:
    return float("nan") if t is None else float(t)


def _reconstruct_weights(unit: Unit, data, rc: ReconConfig, gen: torch.Generator, device, progress: bool) -> dict:
    wqs = unit.weight_quantizers()
    if not wqs or rc.weight_iters == 0:
        return {}
    slices = {}
    for layer in unit.quant_layers():
        if layer.split is None:
            slices[id(layer.weight_quantizer)] = (layer, None)
        else:
            slices[id(layer.weight_quantizer)] = (layer, slice(0, layer.split))
            slices[id(layer.weight_quantizer_b)] = (layer, slice(layer.split, None))

    def wslice(wq):
        layer, sl = slices[id(wq)]
        return layer.weight if sl is None else layer.weight[:, sl]

    loop = _StepLoop(data, rc, rc.weight_iters, gen, device, rc.cuda_graphs)
    alphas = [wq.start_adaround(wslice(wq)) for wq in wqs]
    opt = torch.optim.Adam(alphas, lr=rc.weight_lr, capturable=loop.capturable)
    sched = BetaSchedule(rc.weight_iters, rc.warmup, rc.beta_start, rc.beta_end)
    lam = torch.zeros((), device=device)  # regulariser weight: 0 during the warm-up
    beta = torch.full((), rc.beta_start, device=device)

    def before_step(it: int) -> None:
        count = it + 1  # BRECQ/Q-Diffusion count iterations from 1
        lam.fill_(rc.round_weight if sched.regularizer_on(count) else 0.0)
        beta.fill_(sched.beta(count))

    def body() -> torch.Tensor:
        args, kwargs, target = loop.batch()
        rec = recon_loss(_unit_forward(unit, args, kwargs), target, rc.weight_p)
        loss = rec + lam * sum(round_regularizer(a, beta) for a in alphas)
        opt.zero_grad(set_to_none=not loop.graphs)
        loss.backward()
        opt.step()
        return rec.detach()  # nothing may keep this step's autograd graph alive

    with torch.enable_grad():
        info = loop.run(body, before_step, f"AdaRound {unit.name}", progress)
    with torch.no_grad():
        for wq in wqs:
            layer, sl = slices[id(wq)]
            baked = wq.bake_adaround(wslice(wq))
            if sl is None:
                layer.weight.data.copy_(baked)
            else:
                layer.weight.data[:, sl] = baked
    return info


def _cosine_lr(base: float, it: int, total: int) -> float:
    """CosineAnnealingLR (eta_min 0) in closed form: the learning rate used at step ``it``."""
    return base * (1.0 + math.cos(math.pi * it / total)) / 2.0


def _reconstruct_acts(unit: Unit, data, rc: ReconConfig, gen: torch.Generator, device, progress: bool) -> dict:
    aqs = unit.act_quantizers()
    if not aqs or rc.act_iters == 0:
        return {}
    loop = _StepLoop(data, rc, rc.act_iters, gen, device, rc.cuda_graphs)
    eval_rows = min(rc.act_keep_best_rows, data.n)
    initial = [q.scale.detach().clone() for q in aqs]
    loss_initial = _eval_loss(unit, data, eval_rows, rc, device) if eval_rows else None
    params = [q.make_scale_learnable() for q in aqs]
    lr: Any = torch.full((), rc.act_lr, device=device) if loop.capturable else rc.act_lr
    opt = torch.optim.Adam(params, lr=lr, capturable=loop.capturable)

    def before_step(it: int) -> None:
        value = _cosine_lr(rc.act_lr, it, rc.act_iters)
        if loop.capturable:
            lr.fill_(value)
        else:
            opt.param_groups[0]["lr"] = value

    def body() -> torch.Tensor:
        args, kwargs, target = loop.batch()
        loss = recon_loss(_unit_forward(unit, args, kwargs), target, rc.act_p)
        opt.zero_grad(set_to_none=not loop.graphs)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min=1e-8)
        return loss.detach()

    try:
        with torch.enable_grad():
            info = loop.run(body, before_step, f"LSQ {unit.name}", progress)
    finally:
        for q in aqs:
            q.freeze_scale()
    if eval_rows:
        # the minibatch losses of the loop are noisy; decide on the same fixed rows for both
        loss_learned = _eval_loss(unit, data, eval_rows, rc, device)
        keep = "learned" if loss_learned <= loss_initial else "initial"
        if keep == "initial":
            with torch.no_grad():
                for q, v in zip(aqs, initial):
                    q.scale.copy_(v)
        info.update(eval_rows=eval_rows, eval_loss_initial=loss_initial, eval_loss_learned=loss_learned, kept=keep)
    return info


@torch.no_grad()
def _eval_loss(unit: Unit, data, rows: int, rc: ReconConfig, device) -> float:
    """The unit's activation-stage reconstruction loss over ``rows`` captured rows spread evenly over the
    calibration set (every time step is represented), a row-weighted mean."""
    total = 0.0
    bs = max(rc.batch_size, 64)
    pick = torch.linspace(0, data.n - 1, rows).round().long().to(data.target.device)
    for start in range(0, rows, bs):
        idx = pick[start:start + bs]
        args, kwargs, target = _batch_on(data, idx, device)
        total += float(recon_loss(_unit_forward(unit, args, kwargs), target, rc.act_p)) * len(idx)
    return total / rows


def _batch_on(data, idx: torch.Tensor, device) -> tuple[list, dict, torch.Tensor]:
    """Rows ``idx`` of a unit's captured data (args, kwargs, target), on ``device``."""
    args, kwargs, target = data.batch(idx)
    args = [a.to(device) if torch.is_tensor(a) else a for a in args]
    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    return args, kwargs, target.to(device)


def qdiffusion_ptq(
    model: nn.Module,
    config: QuantConfig,
    calib: Optional[CalibrationSet],
    *,
    preset: str = "paper",
    recon: Optional[ReconConfig] = None,
    device: Any = None,
    checkpoint_dir: Optional[str | Path] = None,
    resume: bool = False,
    progress: bool = True,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    weights_from: Optional[str | Path] = None,
    weight_iters: Optional[int] = None,
    act_iters: Optional[int] = None,
    act_keep_best_rows: Optional[int] = None,
) -> nn.Module:
    """Quantize ``model`` (a copy) with the Q-Diffusion recipe on the calibration set ``calib``.

    ``weight_iters`` / ``act_iters`` / ``act_keep_best_rows`` override the preset's (see :class:`ReconConfig`).

    ``weights_from``: the checkpoint folder of a finished weight stage to start from instead of
    running AdaRound again, e.g. the W4A32 run when quantizing W4A8 (the weight stage runs with
    activations in floating point, so it does not depend on the activation settings). It must come
    from the same model, calibration set, weight config and weight-stage settings (checked by a
    fingerprint); the result equals a run from scratch."""
    if calib is None or len(calib) == 0:
        raise ValueError("Q-Diffusion needs calibration data (a non-empty CalibrationSet)")
    if recon is None:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not defined; allowed: {', '.join(PRESETS)}")
        recon = PRESETS[preset]
    if seed is not None:
        recon = dataclasses.replace(recon, seed=seed)
    if weight_iters is not None:  # overrides of the preset's iteration counts (CLI, sweep options)
        recon = dataclasses.replace(recon, weight_iters=weight_iters)
    if act_iters is not None:
        recon = dataclasses.replace(recon, act_iters=act_iters)
    if act_keep_best_rows is not None:
        recon = dataclasses.replace(recon, act_keep_best_rows=act_keep_best_rows)
    if config.weight is not None and config.weight.dtype != "int":
        raise ValueError("Q-Diffusion block reconstruction needs integer weight schemes (AdaRound)")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else _device(model)
    cache_dtype = getattr(torch, recon.cache_dtype)
    fp = model.to(device).eval()
    q = quantize(fp, config).to(device).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    w_config, w_recon = _weight_view(config, recon)
    prog = _Progress(Path(checkpoint_dir) if checkpoint_dir else None, _fingerprint(fp, config, calib, recon), resume,
                     weights_fingerprint=_fingerprint(fp, w_config, calib, w_recon))
    prog.load_into(q)
    ex = calib.batch(torch.arange(min(2, len(calib))), device)
    units = find_units(q, ex)
    if weights_from is not None and config.weight is not None and not prog.state["done"]["weights"]:
        prog.adopt_weights(q, Path(weights_from), [u.name for u in units if u.weight_quantizers()])
        prog.mark(q, None)
        log.info("weight stage taken from %s (%d units)", weights_from, len(prog.state["done"]["weights"]))
    fp_units = {u.name: fp.get_submodule(u.name) for u in units}
    cap_bs = batch_size or recon.capture_batch or max(recon.batch_size, 64)
    cap = dict(batch_size=cap_bs, device=device, cache_device=device, max_bytes=recon.max_cache_bytes, dtype=cache_dtype)
    log.info("Q-Diffusion: %d units (%d blocks), %d calibration rows, preset %s", len(units),
             sum(u.kind == "block" for u in units), len(calib), preset)

    def run_phase(phase: str, tag: str, reconstruct) -> None:
        """One reconstruction pass over all units, in forward order, skipping finished ones."""
        for i, unit in enumerate(units):
            if prog.done(phase, unit.name):
                continue
            t_unit = time.perf_counter()
            data = capture_unit_data(q, unit.module, fp, fp_units[unit.name], calib, **cap)
            t_cap = time.perf_counter() - t_unit
            info = reconstruct(unit, data, recon, _gen(recon.seed, tag, i), device, progress)
            del data
            if info:
                info = {**info, "capture_seconds": round(t_cap, 3),
                        "seconds": round(time.perf_counter() - t_unit, 3)}
            prog.mark(q, phase, unit.name, info)
            log.info("%s %d/%d %s %s", phase, i + 1, len(units), unit.name, info)

    # 1. weights, activations in floating point
    if config.weight is not None:
        set_quant_mode(q, "fp", weights=False, acts=True)
        run_phase("weights", "w", _reconstruct_weights)
        set_quant_mode(q, "quant", weights=False, acts=True)

    # 2. activation ranges
    aqs = act_quantizers(q)
    if aqs and not prog.done("act_init", "*"):
        rows = calib.subset(min(recon.act_init_rows, len(calib)), seed=recon.seed)
        with calibrate(q, seed=recon.seed):
            for x, t, cond in rows.batches(cap_bs, device=device):
                call_model(q, x, t, cond)
        prog.mark(q, "act_init", "*")

    # 3. activation step sizes
    if aqs and recon.act_iters > 0:
        run_phase("acts", "a", _reconstruct_acts)

    q._diffquant_method = {  # type: ignore[attr-defined]
        "method": "qdiffusion", "preset": preset, "recon": dataclasses.asdict(recon),
        "units": len(units), "calib_rows": len(calib), "calib_seconds": time.perf_counter() - t0,
        "weights_from": prog.state.get("weights_from"),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    return q


__all__ = ["PRESETS", "PRESET_CALIB", "ReconConfig", "qdiffusion_ptq", "recon_loss"]
