"""Issue-5 PTQ table on zoo:cifar10-ddpm: FP (two seed sets), naive and Q-Diffusion cells.

Every cell is resumable and idempotent inside ``--work``: the calibration set, the reconstruction
(per-unit checkpoints), the packed quantized checkpoint, the sample shards and the metrics are
each kept on disk and skipped when present, so a killed run continues where it stopped.

    # one cell (a GPU worker runs several in turn)
    python benchmarks/ptq_cifar10.py cell qdiff-fast-w4a8 --work /tmp/ptq --device cuda:0
    # all rows found in --work -> JSON + markdown table
    python benchmarks/ptq_cifar10.py collect --work /tmp/ptq --out benchmarks/results/ptq_cifar10.json
    python benchmarks/ptq_cifar10.py list

Protocol: DDIM 100 steps (uniform spacing, eta 0), 10k samples, seeds 0..9999 (the second FP seed set
uses 10000..19999), compute batch 500; fd_cifar against the bundled CIFAR-10-JPEG train statistics;
PSNR vs the FP samples of the same seeds (mean over images of the per-image PSNR). Calibration sets
are taken from the FP DDIM-100 sampler with seeds from 1,000,000: 64 x 20 steps for naive and the
fast preset, 256 x 20 for the paper preset. Naive = round-to-nearest with the Lp (MSE-type) range
search for weights (per channel) and activations (per tensor), the same estimators Q-Diffusion starts
from, so the difference between the rows is the reconstruction. In every quantized cell conv_in and conv_out
stay at 8 bits where the cell is narrower (``first_last_bits``), as in BRECQ and Q-Diffusion.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "zoo:cifar10-ddpm"
NUM = 10_000
SEED_SETS = {"fp": 0, "fp-seed2": NUM}


def _cells() -> dict[str, dict]:
    cells = {"fp": dict(method="fp", seed=0), "fp-seed2": dict(method="fp", seed=NUM)}
    for w, a in ((8, 8), (4, 8), (4, 32)):
        cells[f"naive-w{w}a{a}"] = dict(method="naive", preset=None, w=w, a=a, split=True)
        for preset in ("fast", "paper"):
            cells[f"qdiff-{preset}-w{w}a{a}"] = dict(method="qdiffusion", preset=preset, w=w, a=a, split=True)
    for preset in ("fast", "paper"):
        cells[f"qdiff-{preset}-w4a8-nosplit"] = dict(method="qdiffusion", preset=preset, w=4, a=8, split=False)
    # the first fast preset (2,000 / 500 iterations), measured first and kept for comparison
    for w, a in ((8, 8), (4, 8), (4, 32)):
        cells[f"qdiff-fast2k-w{w}a{a}"] = dict(method="qdiffusion", preset="fast-2k", w=w, a=a, split=True)
    cells["qdiff-fast2k-w4a8-nosplit"] = dict(method="qdiffusion", preset="fast-2k", w=4, a=8, split=False)
    # a still shorter variant, measured next to the fast preset (not a library preset)
    for w, a in ((4, 8), (4, 32)):
        cells[f"qdiff-fast1k-w{w}a{a}"] = dict(method="qdiffusion", preset="fast", w=w, a=a, split=True,
                                                recon=dict(weight_iters=1_000, act_iters=250))
    cells["naive-w4a8-minmax"] = dict(method="naive", preset=None, w=4, a=8, split=True, estimator="minmax")
    # the configs that the real low-bit kernels run (diffquant.convert.config_for_backend: symmetric per-channel
    # weights, per-tensor activations, attention matmuls in float), calibrated naively with min-max ranges
    cells["naive-fp8-w8a8"] = dict(method="naive", preset=None, w=8, a=8, split=True, backend="fp8")
    cells["naive-int8sym-w8a8"] = dict(method="naive", preset=None, w=8, a=8, split=True, backend="int8")
    # the same with the 3-channel output convolution left in float (config_for_backend(keep_float=("conv_out",)))
    cells["naive-fp8-w8a8-outfloat"] = dict(method="naive", preset=None, w=8, a=8, split=True, backend="fp8",
                                            keep_float=("conv_out",))
    cells["naive-int8sym-w8a8-outfloat"] = dict(method="naive", preset=None, w=8, a=8, split=True, backend="int8",
                                                keep_float=("conv_out",))
    return cells


CELLS = _cells()
# Q-Diffusion's weight stage runs with activations in floating point, so a W4A8 cell takes the finished
# weight stage of the W4A32 cell of its preset (qdiffusion_ptq(weights_from=...); same result as a run
# from scratch) and only reconstructs activations; its calib_seconds include the reused weight stage.
WEIGHTS_FROM = {f"qdiff-{p}-w4a8": f"qdiff-{p}-w4a32" for p in ("paper", "fast", "fast2k", "fast1k")}
log = logging.getLogger("ptq_cifar10")
FIRST_LAST_BITS = 8  # conv_in/conv_out at 8 bits where the cell is narrower (BRECQ / Q-Diffusion convention)
STEPS = 100  # DDIM steps of calibration and evaluation sampling
COMPUTE_BATCH = 500  # fixed compute batch of every sampling run (numerics independent of the batch)
SMOKE = False  # --smoke: tiny calibration set and 2 iterations per unit (a CPU check of the plumbing)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class _Clock:
    """Accumulated wall time of one stage over several (killed and resumed) processes."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.base = self._read().get(key, 0.0)
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._beat, daemon=True)
        self._th.start()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _write(self) -> None:
        d = self._read()
        d[self.key] = self.base + time.perf_counter() - self.t0
        _atomic_json(self.path, d)

    def _beat(self) -> None:
        while not self._stop.wait(5.0):
            self._write()

    def stop(self) -> float:
        self._stop.set()
        self._th.join()
        self._write()
        return self._read()[self.key]


def _calib(kind: str, work: Path, lm, device):
    from diffquant.recipes import CalibOptions, get_calibration
    from diffquant.sampling.samplers import SamplerSpec

    n = 256 if kind == "paper" else 64
    if SMOKE:
        n = 2
    path = work / "calib" / f"{kind}_{n}x20.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    timing = work / "calib" / f"{kind}.timing.json"
    if path.is_file():
        return __import__("diffquant.calibration.capture", fromlist=["CalibrationSet"]).CalibrationSet.load(str(path)), \
            json.loads(timing.read_text())["seconds"]
    t = time.perf_counter()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.safetensors")
    cal = get_calibration(lm.model, lm.scheduler, CalibOptions(n, 20, SamplerSpec("ddim", STEPS), batch_size=256),
                          device, progress=False)
    cal.save(str(tmp))
    tmp.replace(path)
    secs = time.perf_counter() - t
    _atomic_json(timing, {"seconds": secs})
    return cal, secs


def ensure_model(name: str, work: Path, lm, dev) -> Path:
    """The cell's packed quantized checkpoint (calibration + method), made once: a worker that finds
    another one making it waits for it (file lock), so cells can share a dependency."""
    import fcntl

    from diffquant.io import save_quantized
    from diffquant.recipes import build_config, run_ptq

    c = CELLS[name]
    cdir = work / "cells" / name
    cdir.mkdir(parents=True, exist_ok=True)
    mdir = cdir / "model"
    timing_path = cdir / "timing.json"
    with open(cdir / ".model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (mdir / "diffquant.json").is_file():
            return mdir
        kwargs: dict = {}
        reused = {}
        if c["method"] == "qdiffusion" and name in WEIGHTS_FROM:
            src = WEIGHTS_FROM[name]
            log.info("%s: taking the weight stage of %s", name, src)
            ensure_model(src, work, lm, dev)
            st = json.loads((work / "cells" / src / "timing.json").read_text())
            reused = {"weights_from": src, "weights_reused_seconds": st["method_seconds"],
                      "weights_peak_gpu_bytes": st.get("peak_gpu_bytes")}
            kwargs["weights_from"] = str(work / "cells" / src / "recon")
        cal, cap_s = _calib("paper" if c.get("preset") == "paper" else "fast", work, lm, dev)  # 256 or 64 x 20
        est = c.get("estimator", "lp")
        if c.get("backend"):
            from diffquant.convert import config_for_backend

            cfg = config_for_backend(c["backend"], keep_float=c.get("keep_float", ()))
        else:
            cfg = build_config(c["w"], c["a"], weight_estimator=est, act_estimator=est, split_shortcut=c["split"],
                               first_last_bits=FIRST_LAST_BITS)
        if c["method"] == "qdiffusion":
            kwargs.update(preset=c["preset"], checkpoint_dir=str(cdir / "recon"), resume=True)
            if c.get("recon"):
                import dataclasses

                from diffquant.algorithms.qdiffusion import PRESETS

                kwargs["recon"] = dataclasses.replace(PRESETS[c["preset"]], **c["recon"])
            if SMOKE:
                from diffquant.algorithms.qdiffusion import ReconConfig

                kwargs["recon"] = ReconConfig(weight_iters=2, act_iters=2, batch_size=4)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        clock = _Clock(timing_path, "method_seconds")
        q = run_ptq(lm.model, cfg, c["method"], cal, device=dev, progress=False, **kwargs)
        method_s = clock.stop()
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        prev = json.loads(timing_path.read_text())
        peak = max(peak or 0, prev.get("peak_gpu_bytes") or 0, reused.pop("weights_peak_gpu_bytes", 0) or 0) or None
        _atomic_json(timing_path, {**prev, "method_seconds": method_s, "capture_seconds": cap_s,
                                   "peak_gpu_bytes": peak, "calib_rows": len(cal), **reused})
        tmp = cdir / "model.tmp"
        save_quantized(q, tmp, scheduler=lm.scheduler, source={"model": MODEL})
        tmp.replace(mdir)
        return mdir


def run_cell(name: str, work: Path, device: str, num: int) -> dict:
    from diffquant.evaluation.suite import evaluate_images
    from diffquant.io import load_quantized
    from diffquant.models.loading import load_model
    from diffquant.sampling.large import sample_sharded
    from diffquant.sampling.samplers import SamplerSpec

    if name not in CELLS:
        raise SystemExit(f"unknown cell {name!r}; known: {', '.join(CELLS)}")
    c = CELLS[name]
    cdir = work / "cells" / name
    cdir.mkdir(parents=True, exist_ok=True)
    row_path = cdir / "row.json"
    if row_path.is_file():
        log.info("%s: done already", name)
        return json.loads(row_path.read_text())
    dev = torch.device(device)
    lm = load_model(MODEL, device=dev)
    row = {"cell": name, "method": c["method"], "preset": c.get("preset"), "weight_bits": c.get("w", 32),
           "act_bits": c.get("a", 32), "split_shortcut": c.get("split"), "num_samples": num,
           "recon_overrides": c.get("recon"),
           "config": (f"config_for_backend({c['backend']!r}, keep_float={c.get('keep_float', ())!r})"
                      if c.get("backend") else None),
           "first_last_bits": FIRST_LAST_BITS if c["method"] != "fp" else None,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    timing_path = cdir / "timing.json"
    model = lm.model
    if c["method"] != "fp":
        mdir = ensure_model(name, work, lm, dev)
        model = load_quantized(mdir, device=dev).model  # sample from the checkpoint: proves the round trip
        t = json.loads(timing_path.read_text())
        reused = t.get("weights_reused_seconds", 0.0)
        row.update(calib_seconds=round(t["capture_seconds"] + t["method_seconds"] + reused, 1),
                   capture_seconds=round(t["capture_seconds"], 1), method_seconds=round(t["method_seconds"], 1),
                   peak_gpu_mem_gb=round(t["peak_gpu_bytes"] / 2**30, 3) if t.get("peak_gpu_bytes") else None,
                   calib_rows=t["calib_rows"], checkpoint_bytes=sum(f.stat().st_size for f in mdir.iterdir()))
        if t.get("weights_from"):
            row.update(weights_from=t["weights_from"], weights_reused_seconds=round(reused, 1))
    else:
        row.update(calib_seconds=0.0, peak_gpu_mem_gb=None)
    seed = c.get("seed", 0)
    samples = cdir / "samples.npz"

    def draw(m, folder: Path, seed: int, model_id: str) -> None:
        out = folder / "samples.npz"
        if out.is_file():
            return
        t = time.perf_counter()
        run = sample_sharded(m, lm.scheduler, num=num, out_dir=folder / "shards", seed=seed,
                             spec=SamplerSpec("ddim", STEPS), shard_size=1000, batch_size=COMPUTE_BATCH,
                             compute_batch=COMPUTE_BATCH,
                             device=dev, out=out, resume=True, model_id=model_id, progress=False, distributed=False)
        _atomic_json(folder / "sampling.json", {"seconds": time.perf_counter() - t,
                                                "images_per_second": run.images_per_second})

    if name == "fp":  # other workers may be drawing the same FP samples for their PSNR: wait for them
        import fcntl

        with open(cdir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            draw(model, cdir, seed, name)
    else:
        draw(model, cdir, seed, name)
    if c["method"] != "fp":  # the FP samples of the same seeds, for PSNR (re-drawn on a fresh machine)
        import fcntl

        fpdir = work / "cells" / "fp"
        fpdir.mkdir(parents=True, exist_ok=True)
        with open(fpdir / ".lock", "w") as lock:
            try:  # another worker drawing them: leave the PSNR to `collect`
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                draw(lm.model, fpdir, 0, "fp")
            except BlockingIOError:
                pass
    data = np.load(samples)
    images, seeds = data["images"], data["seeds"]
    fd = evaluate_images(images, "fd_cifar", device=str(dev), floor=False, progress=False)[0]
    row.update(fd_cifar=round(float(fd.value), 2), seed_start=seed)
    s = json.loads((cdir / "sampling.json").read_text()) if (cdir / "sampling.json").is_file() else {}
    row["sample_images_per_second"] = round(s["images_per_second"], 1) if s.get("images_per_second") else None
    row["psnr_vs_fp"] = _psnr(work, name, images, seeds)
    row["date"] = _dt.date.today().isoformat()
    _atomic_json(row_path, row)
    log.info("%s: %s", name, json.dumps(row))
    return row


def worker(names: list[str], work: Path, device: str, num: int) -> None:
    """Work through ``names`` in order together with other workers (one per GPU) on the same ``--work``:
    a cell is claimed by a file lock held while it runs (released if the worker dies), cells done or
    claimed by another worker are passed over, and after every cell the list is scanned again from the
    top. A cell that needs another's result (WEIGHTS_FROM) waits for it."""
    import fcntl

    for n in names:
        if n not in CELLS:
            raise SystemExit(f"unknown cell {n!r}; known: {', '.join(CELLS)}")
    while True:
        ran = False
        for n in names:
            cdir = work / "cells" / n
            if (cdir / "row.json").is_file():
                continue
            cdir.mkdir(parents=True, exist_ok=True)
            with open(cdir / ".claim", "w") as claim:
                try:
                    fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker runs it
                if (cdir / "row.json").is_file():
                    continue
                log.info("claimed %s", n)
                run_cell(n, work, device, num)
                ran = True
                break
        if not ran:
            log.info("nothing left to claim")
            return


def _psnr(work: Path, name: str, images, seeds):
    from diffquant.evaluation.fidelity import paired_fidelity

    if CELLS[name]["method"] == "fp":
        return None
    ref = work / "cells" / "fp" / "samples.npz"
    if (work / "cells" / "fp" / ".lock").is_file():
        import fcntl

        with open(work / "cells" / "fp" / ".lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # still being drawn
    if not ref.is_file():
        return None
    r = np.load(ref)
    res = paired_fidelity(r["images"], images, r["seeds"], seeds)
    return round(res["psnr"]["mean"], 2)


def collect(work: Path, out: Path) -> list[dict]:
    rows = []
    for name in CELLS:
        p = work / "cells" / name / "row.json"
        if not p.is_file():
            continue
        row = json.loads(p.read_text())
        if row.get("psnr_vs_fp") is None and CELLS[name]["method"] != "fp" and (work / "cells" / name / "samples.npz").is_file():
            d = np.load(work / "cells" / name / "samples.npz")
            row["psnr_vs_fp"] = _psnr(work, name, d["images"], d["seeds"])
            _atomic_json(p, row)
        rows.append(row)
    by = {r["cell"]: r for r in rows}
    meta = {"model": MODEL, "sampler": "DDIM 100 steps, uniform spacing, eta 0", "num_samples": NUM,
            "metric": "fd_cifar vs CIFAR-10-JPEG train statistics; psnr_vs_fp = mean per-image PSNR vs FP, same seeds",
            "command": "bash scripts/gpu/ptq_cifar10.sh (cells: python benchmarks/ptq_cifar10.py cell NAME)"}
    if "fp" in by and "fp-seed2" in by:
        meta["fd_noise_two_fp_seed_sets"] = round(abs(by["fp"]["fd_cifar"] - by["fp-seed2"]["fd_cifar"]), 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(out, {"meta": meta, "rows": rows})
    keys = ["cell", "method", "preset", "weight_bits", "act_bits", "split_shortcut", "fd_cifar", "psnr_vs_fp",
            "calib_seconds", "peak_gpu_mem_gb", "num_samples", "device"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k)) for k in keys) + " |")
    print(json.dumps(meta))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cell")
    c.add_argument("names", nargs="+")
    c.add_argument("--work", required=True)
    c.add_argument("--device", default="cuda")
    c.add_argument("--num-samples", type=int, default=NUM)
    c.add_argument("--smoke", action="store_true")
    w = sub.add_parser("worker", help="claim and run cells in the given order alongside other workers")
    w.add_argument("names", nargs="+")
    w.add_argument("--work", required=True)
    w.add_argument("--device", default="cuda")
    w.add_argument("--num-samples", type=int, default=NUM)
    w.add_argument("--smoke", action="store_true")
    k = sub.add_parser("collect")
    k.add_argument("--work", required=True)
    k.add_argument("--out", required=True)
    sub.add_parser("list")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if a.cmd == "list":
        print("\n".join(CELLS))
    elif a.cmd in ("cell", "worker"):
        global SMOKE, COMPUTE_BATCH, STEPS
        SMOKE = a.smoke
        if SMOKE:
            COMPUTE_BATCH, STEPS = 4, 20
        if a.cmd == "worker":
            worker(a.names, Path(a.work), a.device, a.num_samples)
        else:
            for n in a.names:
                run_cell(n, Path(a.work), a.device, a.num_samples)
    else:
        collect(Path(a.work), Path(a.out))


if __name__ == "__main__":
    main()
