"""Run a sweep: every cell (model x recipe x bits x sampler x steps x sample count, plus the FP
references) is sampled, measured, and cached; one results table (JSON + CSV), plots and a report.

Output folder::

    results.json  results.csv  report.md  report.html  spec.json
    plots/*.png   grids/*.png  cost/*.csv
    cache/cells/<key>.json              one finished cell (row, metrics, fidelity, model info)
    cache/samples/<key>.npz             its samples (merged); shards under cache/samples/<run>/
    cache/calib/<key>.safetensors       calibration sets (shared by every quantized config of a model)
    cache/quantized/<key>/              quantized checkpoints (shared by every sampler/step count)

A cell's key hashes everything that decides its samples (the model's fingerprint, recipe, bits,
calibration, sampler, steps, seeds, sample count, compute batch and device numerics); a cell
whose JSON exists is not recomputed, and only metrics it lacks are added from its saved samples.
The FP samples of a (model, sampler, steps, seeds) are computed once and serve every quantized
cell's PSNR/SSIM. Sample shards are shared between sample counts (seeds ``seed ..``), and a run
interrupted inside a cell resumes from its finished shards.
"""
from __future__ import annotations

import csv
import datetime as _dt
import inspect
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffquant.experiments.spec import Recipe, SweepSpec, config_label, sampler_label, stable_hash
from diffquant.sampling import SamplerSpec, load_samples

log = logging.getLogger(__name__)

__all__ = ["Cell", "SweepResult", "plan_cells", "run_sweep", "write_results", "TABLE_COLUMNS"]

CACHE_VERSION = 1
TABLE_COLUMNS = ("model", "method", "config", "sampler", "steps", "num_samples")


@dataclass(frozen=True)
class Cell:
    model: str
    recipe: Optional[Recipe]  # None: the full-precision reference
    weight_bits: int
    act_bits: int
    sampler: SamplerSpec
    num: int

    @property
    def is_fp(self) -> bool:
        return self.recipe is None

    @property
    def method(self) -> str:
        return "fp" if self.recipe is None else self.recipe.name

    @property
    def config(self) -> str:
        return config_label(self.weight_bits, self.act_bits)

    def describe(self) -> str:
        return (f"{self.model} {self.method} {self.config} {sampler_label(self.sampler)}-{self.sampler.steps} "
                f"n={self.num}")


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """FP references first, then every quantized configuration, in a deterministic order."""
    cells = []
    for model in spec.models:
        for s in spec.samplers:
            for steps in spec.steps:
                for n in spec.num_samples:
                    cells.append(Cell(model, None, 16, 16, SamplerSpec(s.sampler, steps, s.spacing, s.eta), n))
        for r in spec.recipes:
            for w, a in spec.bits:
                for s in spec.samplers:
                    for steps in spec.steps:
                        for n in spec.num_samples:
                            cells.append(Cell(model, r, w, a, SamplerSpec(s.sampler, steps, s.spacing, s.eta), n))
    return cells


@dataclass
class SweepResult:
    out_dir: str
    rows: list[dict]
    cells: list[dict]
    env: dict
    spec: dict
    computed: int = 0
    cached: int = 0
    models: dict = field(default_factory=dict)  # per model: FP size/cost, quantized configs' reports

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "env": self.env, "rows": self.rows, "models": self.models,
                "computed": self.computed, "cached": self.cached, "cells": self.cells}


def _needs_calibration(recipe: Recipe, cfg) -> bool:
    from diffquant.recipes import needs_calibration

    return recipe.method != "naive" or needs_calibration(cfg)


def _env(device: torch.device, command: Optional[str]) -> dict[str, Any]:
    from diffquant import __version__

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cores = None
    try:
        import os

        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return {"device": str(device), "device_name": dev_name, "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffquant": __version__, "date": _dt.date.today().isoformat(),
            "python": platform.python_version(), "command": command}


class _Runner:
    def __init__(self, spec: SweepSpec, out: Path, device: torch.device, progress: bool, extractors: Optional[dict],
                 metric_kwargs: dict):
        self.spec = spec
        self.out = out
        self.cache = out / "cache"
        self.device = device
        self.progress = progress
        self.extractors = dict(extractors or {})
        self.metric_kwargs = metric_kwargs
        self.computed = 0
        self.cached = 0
        for sub in ("cells", "samples", "calib", "quantized"):
            (self.cache / sub).mkdir(parents=True, exist_ok=True)

    # ---- keys -------------------------------------------------------------------------------
    def numerics(self) -> dict[str, Any]:
        from diffquant.sampling.large import _numerics

        return _numerics(self.device, self.spec.compute_batch)

    def calib_key(self, fp: str) -> str:
        return stable_hash({"v": CACHE_VERSION, "model": fp, "calib": self.spec.calibration.to_dict(),
                            "batch_size": self.spec.batch_size, "numerics": self.numerics()})

    def quant_key(self, fp: str, recipe: Recipe, w: int, a: int, calib: Optional[str]) -> str:
        return stable_hash({"v": CACHE_VERSION, "model": fp, "recipe": recipe.to_dict(), "bits": [w, a], "calib": calib,
                            "batch_size": self.spec.batch_size})

    def run_key(self, model_id: str, sampler: SamplerSpec) -> str:
        """The shard folder: everything that decides the samples except their number."""
        return stable_hash({"v": CACHE_VERSION, "model": model_id, "sampler": sampler.to_dict(), "seed": self.spec.seed,
                            "shard_size": self.spec.shard_size, "numerics": self.numerics()})

    def cell_key(self, model_id: str, sampler: SamplerSpec, num: int) -> str:
        return stable_hash({"run": self.run_key(model_id, sampler), "num": num})

    # ---- pieces -------------------------------------------------------------------------------
    def sample(self, model, scheduler, model_id: str, label: str, sampler: SamplerSpec, num: int) -> tuple[np.ndarray, dict]:
        from diffquant.sampling.large import sample_sharded

        key = self.cell_key(model_id, sampler, num)
        path = self.cache / "samples" / f"{key}.npz"
        if path.is_file():
            images, seeds, meta = load_samples(path)
            return images, {"sample_seconds": meta.get("sample_seconds"), "images_per_second": meta.get("images_per_second")}
        t0 = time.perf_counter()
        run = sample_sharded(model, scheduler, num=num, out_dir=self.cache / "samples" / self.run_key(model_id, sampler),
                             seed=self.spec.seed, spec=sampler, shard_size=self.spec.shard_size,
                             batch_size=self.spec.batch_size, compute_batch=self.spec.compute_batch, device=self.device,
                             out=None, resume=True, model_id=label, fingerprint=model_id, progress=self.progress)
        secs = time.perf_counter() - t0
        # shard_seconds: the sampling time recorded in the shards (also those reused from an earlier run)
        shard_secs = run.meta.get("shard_seconds") or run.seconds
        info = {"sample_seconds": shard_secs, "images_per_second": num / shard_secs if shard_secs else None,
                "images_computed": run.images_computed, "wall_seconds": secs}
        from diffquant.sampling import save_samples

        save_samples(path, run.images, run.seeds, {**run.meta, **info})
        return run.images, info

    def get_extractors(self) -> dict:
        from diffquant.evaluation.features import get_extractor
        from diffquant.evaluation.suite import METRICS

        for space in dict.fromkeys(METRICS[m].space for m in self.spec.metrics):
            if space not in self.extractors:
                kw: dict[str, Any] = {"device": str(self.device)}
                if space == "inception":
                    kw["inception_weights"] = self.metric_kwargs.get("inception_weights")
                self.extractors[space] = get_extractor(space, **kw)
        return self.extractors

    def metrics(self, images: np.ndarray, have: dict) -> dict:
        from diffquant.evaluation.suite import evaluate_images, json_safe

        missing = [m for m in self.spec.metrics if not any(k == m or k.startswith(m + ".") for k in have)]
        if not missing:
            return have
        kw = {k: v for k, v in self.metric_kwargs.items() if k != "inception_weights"}
        res = evaluate_images(images, missing, device=str(self.device), extractors=self.get_extractors(),
                              floor=self.spec.floor, seed=self.spec.seed, progress=self.progress, **kw)
        out = dict(have)
        for r in res:
            out[r.metric] = json_safe(r.to_dict())
        return out


def _row(cell: Cell, metrics: dict, fidelity: Optional[dict], info: dict, spec: SweepSpec) -> dict[str, Any]:
    row: dict[str, Any] = {"model": cell.model, "method": cell.method, "config": cell.config,
                           "weight_bits": cell.weight_bits, "act_bits": cell.act_bits,
                           "sampler": sampler_label(cell.sampler), "steps": cell.sampler.steps, "num_samples": cell.num}
    for name in spec.metrics:
        for k, v in metrics.items():
            if k == name or k.startswith(name + "."):
                row[k] = v.get("value")
                if v.get("floor") is not None:
                    row[f"{k}_floor"] = v["floor"]
    if cell.is_fp:
        row["psnr_vs_fp"], row["ssim_vs_fp"] = None, 1.0
    else:
        row["psnr_vs_fp"] = fidelity["psnr_of_mean_mse"] if fidelity else None
        row["ssim_vs_fp"] = fidelity["ssim"]["mean"] if fidelity else None
    row.update({k: info.get(k) for k in ("size_MiB", "compression_vs_fp16", "gbops", "calib_seconds")})
    row["sample_seconds"] = info.get("sample_seconds")
    row["img_per_s"] = info.get("images_per_second")
    return row


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, device: Any = None, progress: bool = True,
              extractors: Optional[dict] = None, command: Optional[str] = None, report: bool = True,
              metric_kwargs: Optional[dict] = None) -> SweepResult:
    """Run (or finish) the sweep ``spec`` into ``out_dir``; see the module docstring.

    ``extractors``: feature networks per space (tests, custom networks) for the metrics.
    ``metric_kwargs``: extra keyword arguments of :func:`~diffquant.evaluation.suite.evaluate_images`
    (``data_dir``, ``cache``, ``inception_weights``, ``fid_ref_stats``, ...)."""
    from diffquant.cost import model_cost
    from diffquant.evaluation.fidelity import paired_fidelity
    from diffquant.evaluation.suite import json_safe
    from diffquant.models.loading import load_model
    from diffquant.quantize import quant_report
    from diffquant.recipes import CalibOptions, build_config, get_calibration, run_ptq
    from diffquant.sampling.large import model_fingerprint

    t_start = time.perf_counter()
    device = torch.device(device or spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(spec, out, device, progress, extractors, dict(metric_kwargs or {}))
    if spec.metrics:
        runner.get_extractors()  # a metric whose network is missing fails now, before any work
    env = _env(device, command)
    cell_env = {k: env[k] for k in ("device", "device_name", "cpu_cores", "torch_threads", "torch", "diffquant", "date")}
    cells = plan_cells(spec)
    records: list[dict] = []
    models_info: dict[str, Any] = {}
    n_total = len(cells)
    done = 0

    def cell_path(key: str) -> Path:
        return runner.cache / "cells" / f"{key}.json"

    def load_cell(key: str) -> Optional[dict]:
        p = cell_path(key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("cached cell %s is unreadable (%s); recomputing", p, e)
            return None

    def save_cell(key: str, rec: dict) -> None:
        p = cell_path(key)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(json_safe(rec), indent=1))
        tmp.replace(p)

    def complete(rec: Optional[dict], needs_fid: bool) -> bool:
        if rec is None:
            return False
        have = rec.get("metrics", {})
        ok = all(any(k == m or k.startswith(m + ".") for k in have) for m in spec.metrics)
        return ok and (not needs_fid or rec.get("fidelity") is not None)

    for model_id in spec.models:
        loaded = load_model(model_id, device=device)
        if loaded.quantized:
            raise ValueError(f"sweep model {model_id!r} is already quantized; sweeps start from the full-precision model")
        if loaded.scheduler is None:
            raise ValueError(f"sweep model {model_id!r} has no scheduler; cannot sample")
        fp_model, sched = loaded.model, loaded.scheduler
        fp_fprint = model_fingerprint(fp_model)
        fp_cost = model_cost(fp_model, float_bits=spec.float_bits)
        fp_report = quant_report(fp_model)
        fp_info = {"size_MiB": fp_cost.param_bytes / 2**20, "compression_vs_fp16": fp_report.fp16_bytes / fp_cost.param_bytes,
                   "gbops": fp_cost.bops / 1e9, "calib_seconds": None}
        minfo: dict[str, Any] = {"fingerprint": fp_fprint, "params": fp_report.params_total,
                                 "model_class": type(fp_model).__name__,
                                 "fp_cost": fp_cost.to_dict(layers=True), "configs": {}}
        models_info[model_id] = minfo
        fp_images: dict[tuple, np.ndarray] = {}

        def fp_samples(sampler: SamplerSpec, num: int) -> np.ndarray:
            k = (sampler, num)
            if k not in fp_images:
                fp_images[k], _ = runner.sample(fp_model, sched, f"fp:{fp_fprint}", model_id, sampler, num)
            return fp_images[k]

        # ---- FP references
        for cell in [c for c in cells if c.model == model_id and c.is_fp]:
            done += 1
            key = runner.cell_key(f"fp:{fp_fprint}", cell.sampler, cell.num)
            rec = load_cell(key)
            if complete(rec, needs_fid=False):
                runner.cached += 1
                log.info("[%d/%d] %s: cached", done, n_total, cell.describe())
            else:
                log.info("[%d/%d] %s: sampling", done, n_total, cell.describe())
                images, sinfo = runner.sample(fp_model, sched, f"fp:{fp_fprint}", model_id, cell.sampler, cell.num)
                fp_images[(cell.sampler, cell.num)] = images
                info = {**fp_info, **sinfo}
                rec = {"key": key, "cell": cell.describe(), "info": info, "fidelity": None, "computed_on": cell_env,
                       "metrics": runner.metrics(images, (rec or {}).get("metrics", {})),
                       "samples": str(Path("cache/samples") / f"{key}.npz")}
                save_cell(key, rec)
                runner.computed += 1
            records.append({"cell": cell, "key": key, "rec": rec})

        # ---- quantized configurations
        calib_cache: dict[str, Any] = {}
        for recipe in spec.recipes:
            for w, a in spec.bits:
                cfg = build_config(w, a, **recipe.config)
                calib_key = runner.calib_key(fp_fprint) if _needs_calibration(recipe, cfg) else None
                qkey = runner.quant_key(fp_fprint, recipe, w, a, calib_key)
                qid = f"q:{qkey}"
                group = [c for c in cells if c.model == model_id and c.recipe == recipe and (c.weight_bits, c.act_bits) == (w, a)]
                keys = [runner.cell_key(qid, c.sampler, c.num) for c in group]
                recs = [load_cell(k) for k in keys]
                qdir = runner.cache / "quantized" / qkey
                qinfo_path = qdir.with_suffix(".json")
                qmodel = None
                qinfo = json.loads(qinfo_path.read_text()) if qinfo_path.is_file() else None

                def get_qmodel():
                    nonlocal qmodel, qinfo
                    if qmodel is not None:
                        return qmodel
                    if (qdir / "diffquant.json").is_file():
                        from diffquant.io import load_quantized

                        log.info("%s %s: loading the cached quantized model %s", recipe.name, config_label(w, a), qdir)
                        qmodel = load_quantized(qdir, device=device).model
                    else:
                        calib = None
                        if calib_key is not None:
                            if calib_key not in calib_cache:
                                c = spec.calibration
                                t0 = time.perf_counter()
                                calib_cache[calib_key] = get_calibration(
                                    fp_model, sched,
                                    CalibOptions(c.num_per_step, c.num_steps, c.sampler_spec(), c.seed, spec.batch_size,
                                                 path=str(runner.cache / "calib" / f"{calib_key}.safetensors"),
                                                 cm_chains=c.chains),
                                    device, progress=progress)
                                minfo["calib_capture_seconds"] = time.perf_counter() - t0
                                minfo["calib_rows"] = len(calib_cache[calib_key])
                            calib = calib_cache[calib_key]
                        opts = dict(recipe.options)
                        params = inspect.signature(__import__("diffquant.algorithms", fromlist=["METHODS"])
                                                   .METHODS[recipe.method]).parameters
                        if "checkpoint_dir" in params and "checkpoint_dir" not in opts:
                            opts["checkpoint_dir"] = str(qdir) + ".work"
                            if "resume" in params:
                                opts.setdefault("resume", True)
                        if "batch_size" in params:
                            opts.setdefault("batch_size", spec.batch_size)
                        log.info("%s %s: quantizing (%s)", recipe.name, config_label(w, a), recipe.method)
                        qmodel = run_ptq(fp_model, cfg, recipe.method, calib, device=device, progress=progress, **opts)
                        if spec.save_quantized:
                            from diffquant.io import save_quantized

                            save_quantized(qmodel, qdir, sched, loaded.source)
                    if qinfo is None:
                        rep = quant_report(qmodel)
                        cost = model_cost(qmodel, float_bits=spec.float_bits)
                        method_info = getattr(qmodel, "_diffquant_method", None) or {}
                        qinfo = {"config": rep.config, "recipe": recipe.to_dict(), "quant_config": cfg.to_dict(),
                                 "summary": rep.summary(), "counts": rep.counts, "float_layers": rep.float_layers,
                                 "quantized_bytes": rep.quantized_bytes, "fp16_bytes": rep.fp16_bytes,
                                 "calib_seconds": method_info.get("calib_seconds"), "calib_key": calib_key,
                                 "cost": cost.to_dict(layers=True)}
                        qinfo_path.write_text(json.dumps(json_safe(qinfo), indent=1))
                    return qmodel

                for cell, key, rec in zip(group, keys, recs):
                    done += 1
                    if complete(rec, needs_fid=True):
                        runner.cached += 1
                        log.info("[%d/%d] %s: cached", done, n_total, cell.describe())
                    else:
                        log.info("[%d/%d] %s: sampling", done, n_total, cell.describe())
                        samples_path = runner.cache / "samples" / f"{key}.npz"
                        if samples_path.is_file():
                            images, sinfo = runner.sample(None, sched, qid, "", cell.sampler, cell.num)
                        else:
                            images, sinfo = runner.sample(get_qmodel(), sched, qid, f"{model_id} {recipe.name} "
                                                          f"{config_label(w, a)}", cell.sampler, cell.num)
                        if qinfo is None:
                            get_qmodel()
                        fid = paired_fidelity(fp_samples(cell.sampler, cell.num), images)
                        cost = qinfo["cost"]
                        info = {"size_MiB": cost["param_bytes"] / 2**20,
                                "compression_vs_fp16": fp_report.fp16_bytes / cost["param_bytes"],
                                "gbops": cost["bops"] / 1e9, "calib_seconds": qinfo.get("calib_seconds"), **sinfo}
                        rec = {"key": key, "cell": cell.describe(), "quant_key": qkey, "info": info,
                               "computed_on": cell_env,
                               "fidelity": {k: v for k, v in fid.items() if k != "per_image"},
                               "metrics": runner.metrics(images, (rec or {}).get("metrics", {})),
                               "samples": str(Path("cache/samples") / f"{key}.npz")}
                        save_cell(key, rec)
                        runner.computed += 1
                    records.append({"cell": cell, "key": key, "rec": rec})
                if qinfo is None and qinfo_path.is_file():
                    qinfo = json.loads(qinfo_path.read_text())
                if qinfo is not None:
                    minfo["configs"][f"{recipe.name} {config_label(w, a)}"] = {k: v for k, v in qinfo.items()}
                qmodel = None
        # sample grids for the report: FP and every configuration from the same seeds
        if spec.grid:
            _grids(spec, out, runner, records, model_id)

    rows = [_row(r["cell"], r["rec"].get("metrics", {}), r["rec"].get("fidelity"), r["rec"]["info"], spec)
            for r in records]
    env["sweep_seconds"] = time.perf_counter() - t_start
    envs = [r["rec"].get("computed_on") for r in records if r["rec"].get("computed_on")]
    env["computed_on"] = [dict(t) for t in dict.fromkeys(tuple(sorted(e.items())) for e in envs)]
    env["sampling_seconds_total"] = sum(r["rec"]["info"].get("sample_seconds") or 0.0 for r in records)
    result = SweepResult(str(out), rows, [{"key": r["key"], "cell": r["rec"]["cell"], "fidelity": r["rec"].get("fidelity"),
                                           "metrics": r["rec"].get("metrics"), "info": r["rec"]["info"],
                                           "computed_on": r["rec"].get("computed_on")} for r in records],
                         env, spec.to_dict(), runner.computed, runner.cached, models_info)
    write_results(result, out)
    if report:
        from diffquant.experiments.report import write_report

        write_report(out)
    log.info("sweep %s: %d cells computed, %d cached, %.0fs", spec.name, runner.computed, runner.cached,
             env["sweep_seconds"])
    return result


def _grids(spec: SweepSpec, out: Path, runner: _Runner, records: list[dict], model_id: str) -> None:
    from diffquant.viz import save_side_by_side

    (out / "grids").mkdir(exist_ok=True)
    n = spec.grid
    nrow = int(np.ceil(np.sqrt(n)))
    for s in spec.samplers:
        for steps in spec.steps:
            panels = []
            for r in records:
                c: Cell = r["cell"]
                if c.model != model_id or (c.sampler.sampler, c.sampler.spacing, c.sampler.eta, c.sampler.steps) != \
                        (s.sampler, s.spacing, s.eta, steps) or c.num != min(spec.num_samples):
                    continue
                p = out / r["rec"]["samples"]
                if not p.is_file():
                    continue
                imgs, _, _ = load_samples(p)
                title = "FP" if c.is_fp else (c.config if len(spec.recipes) == 1 else f"{c.method} {c.config}")
                panels.append((title, imgs[:n]))
            if panels:
                save_side_by_side(panels, out / "grids" / _grid_name(model_id, s, steps), nrow=nrow)


def _grid_name(model_id: str, s: SamplerSpec, steps: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in model_id)
    return f"{safe}_{sampler_label(s)}_{steps}.png"


def write_results(result: SweepResult, out: Path) -> None:
    from diffquant.evaluation.suite import json_safe

    (out / "results.json").write_text(json.dumps(json_safe(result.to_dict()), indent=1))
    (out / "spec.json").write_text(json.dumps(result.spec, indent=2))
    cols = list(dict.fromkeys(k for r in result.rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        for r in result.rows:
            wr.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    (out / "cost").mkdir(exist_ok=True)
    for model_id, m in result.models.items():
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in model_id)
        tables = {"FP": m["fp_cost"], **{k: v["cost"] for k, v in m.get("configs", {}).items()}}
        for name, cost in tables.items():
            path = out / "cost" / f"{safe}_{name.replace(' ', '_')}.csv"
            with open(path, "w", newline="") as f:
                wr = csv.writer(f)
                wr.writerow(["layer", "type", "weight_bits", "act_bits", "macs", "bops", "params", "param_bytes"])
                for layer in cost["layers"]:
                    wr.writerow([layer["name"], layer["type"], layer["weight_bits"] if layer["weight_bits"] is not None else "",
                                 "x".join(map(str, layer["act_bits"])), layer["macs"], layer["bops"], layer["params"],
                                 layer["param_bytes"]])
