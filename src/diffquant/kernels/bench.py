"""End-to-end and per-layer-type latency of real low-bit models against bf16 (GPU).

Timing: CUDA events around each call, warm-up first, the median of many calls; the call is
captured in a CUDA graph and the graph replayed when capture works (both sides alike; the row
says whether it did). Every variant runs the same model in bf16 with channels-last activations;
the diffquant variants are quantized with :func:`diffquant.convert.config_for_backend`, calibrated
on one batch of the bench inputs (min-max) and converted with ``attention='float'`` (SDPA, as in
the bf16 baseline) unless the name's suffixes say otherwise (:data:`_SUFFIXES`: ``-fp8attn`` FP8 attention, ``-fa``
diffquant's bf16 flash-attention kernel, ``diffquant::flash_attention``).
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# Stable Diffusion 1.5's UNet2DConditionModel config (860M parameters), for random-weight timing
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
MODELS = ("sd15-unet", "ddpm-cifar10-32", "zoo:cifar10-ddpm")
VARIANTS = ("bf16-eager", "bf16-compile", "torchao-int8dyn", "torchao-fp8", "dq-int8", "dq-fp8", "dq-w4a8", "dq-w4a16",
            "dq-fp8-fp8attn", "dq-fp8-dyntoken", "dq-fp8-gn", "dq-int8-gn", "bf16-compile-gn", "dq-fp8-gn-qkv",
            "dq-int8-gn-qkv", "dq-fp8-gn-qkv-ff", "dq-fp8-gn-qkv-tw", "dq-fp8-gn-qkv-ff-tw", "dq-fp8-gn-qkv-te",
            "dq-int8-gn-qkv-te", "dq-fp8-gn-qkv-te-ff", "dq-fp8-gn-qkv-te-ff-tw",
            "dq-fp8-fp8attn-gn-qkv-te-ff-tw", "dq-fp8-gn-qkv-te-ff-twq", "dq-fp8-gn-qkv-te-ff-twq-fa",
            "dq-fp8-gn-qkv-te-ff-twq-ln")


def build_model(name: str) -> nn.Module:
    from diffquant.models.configs import DDPM_CIFAR10_32, build_unet

    if name == "sd15-unet":
        from diffusers import UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return UNet2DConditionModel(**SD15_UNET).eval()
    if name == "ddpm-cifar10-32":
        return build_unet(DDPM_CIFAR10_32).eval()
    if name.startswith("zoo:"):
        from diffquant.models.loading import load_model

        return load_model(name).model.eval()
    raise ValueError(f"model {name!r}; allowed: {', '.join(MODELS)}")


def inputs_for(model: nn.Module, batch: int, device, dtype) -> tuple:
    from diffquant.models.adapter import example_inputs

    x, t, c = example_inputs(model, batch=batch, device="cpu")
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return x, t.to(device), {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                             for k, v in c.items()}


def write_gpu_result(path: str, rows: list, **extra) -> dict:
    """A GPU benchmark script's result file: ``{"command", "date", "device", "torch", "rows", **extra}`` as JSON
    (indent 1) at ``path``, the command being ``python`` and this process's arguments; returns the dict."""
    res = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, **extra}
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return res


def finish_op_bench(path: str, rows: list, total: dict, failures: list) -> None:
    """An op benchmark's end: the per-UNet-call totals printed, the result file written (:func:`write_gpu_result`),
    and a non-zero exit listing ``failures`` if there are any."""
    print("per UNet call (ms):", json.dumps(total))
    write_gpu_result(path, rows, per_unet_call=total, failures=failures)
    if failures:
        raise SystemExit("FAILED:\n" + "\n".join(failures))


def time_call(fn: Callable[[], Any], warmup: int = 5, reps: int = 30, graph: bool = True,
              inner: int = 1) -> tuple[float, bool]:
    """Median ms of ``fn()`` over ``reps`` samples (CUDA events), replaying a CUDA graph if it captures. Each sample
    times ``inner`` calls back to back (one graph holding them all) and reports the time of one: a single kernel of a
    few microseconds is otherwise measured with the graph's launch and the events' own latency, about 10 us on an
    H200, which hides the differences between configs at batch 1. ``inner=0``: chosen so that a sample covers about
    0.2 ms (1 for calls that long, at most 50)."""
    if inner < 0:
        raise ValueError(f"inner must be >= 0, got {inner}")
    if inner == 0:
        one, _ = time_call(fn, warmup=warmup, reps=max(5, reps // 3), graph=graph, inner=1)
        inner = max(1, min(50, int(0.2 / max(one, 1e-4))))
        warmup = 1
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                fn()

        used_graph = False
        if graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                g.replay()
                torch.cuda.synchronize()
                run, used_graph = g.replay, True
            except Exception as e:  # capture refused: time eagerly
                log.warning("CUDA graph capture failed (%s); timing without a graph", str(e).splitlines()[0][:200])
                torch.cuda.synchronize()
        for _ in range(3):
            run()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / inner)
    return statistics.median(times), used_graph


# the dq-* variants' suffixes, last first: the order they are peeled off the name (dq-fp8-gn-qkv-te-ff-twq-fa)
_SUFFIXES = (
    "-ln",  # the transformer blocks' LayerNorms as diffquant::add_layer_norm (convert's fuse_ln)
    "-fa",  # attention through diffquant::flash_attention (convert's attention="flash": the Gluon kernel in bf16)
    "-twq",  # the same, except attention's Q/K/V projections (row-wise: attention reads their output directly)
    "-tw",  # cuBLAS FP8 GEMMs with tensor-wise scales (set_fp8_gemm)
    "-ff",  # GEGLU feed-forwards as diffquant::linear_geglu (fuse_ff)
    "-te",  # the ResNet blocks' time projections as one stacked GEMM (fuse_temb)
    "-qkv",  # the attention blocks' Q/K/V as one stacked GEMM (fuse_qkv)
    "-gn",  # the ResNet blocks' norms + SiLU as diffquant::group_norm_act (fuse_norms)
    "-fp8attn",  # FP8 layers and FP8 attention
    "-dyntoken",  # dynamic per-token activation scales (Linear / 1x1 convs)
)


def split_variant(name: str) -> tuple[str, set]:
    """A dq-* variant's name without its ``dq-`` prefix -> (backend, the suffixes it carries), peeled off the end
    in :data:`_SUFFIXES`' order; a name whose rest is not a backend is refused."""
    from diffquant.kernels.modules import BACKENDS

    backend, on = name, set()
    for suffix in _SUFFIXES:
        if backend.endswith(suffix):
            backend = backend[: -len(suffix)]
            on.add(suffix)
    if backend not in BACKENDS:
        raise ValueError(f"variant dq-{name}: {backend!r} is not a backend ({', '.join(BACKENDS)}) followed by "
                         f"suffixes in the order {''.join(reversed(_SUFFIXES))}")
    if {"-fp8attn", "-fa"} <= on:
        raise ValueError(f"variant dq-{name}: -fp8attn and -fa both choose the attention; take one")
    return backend, on


def _quantized(model: nn.Module, backend: str, calib_inputs: tuple) -> nn.Module:
    from diffquant.convert import config_for_backend, convert
    from diffquant.models.adapter import call_model
    from diffquant.quantize import calibrate, quantize

    backend, on = split_variant(backend)
    q = quantize(model, config_for_backend(backend))
    with torch.no_grad(), calibrate(q):
        call_model(q, *calib_inputs)
    attention = "fp8" if "-fp8attn" in on else "flash" if "-fa" in on else "float"
    cm = convert(q, backend, attention=attention, unsupported="float", inplace=True,
                 fp8_dynamic="token" if "-dyntoken" in on else False, min_channels=BENCH_MIN_CHANNELS,
                 fuse_norms="-gn" in on, fuse_qkv="-qkv" in on, fuse_ff="-ff" in on, fuse_temb="-te" in on,
                 fuse_ln="-ln" in on)
    if "-tw" in on or "-twq" in on:
        from diffquant.kernels.modules import set_fp8_gemm

        set_fp8_gemm(cm, "tensorwise", exclude=("to_qkv", "to_kv", "to_q", "to_k", "to_v") if "-twq" in on else ())
    return cm


# the bench's dq-* variants keep layers with fewer channels than this simulated (conv_in / conv_out: 3-4 channels);
# DIFFQUANT_BENCH_MIN_CHANNELS=0 converts them too
BENCH_MIN_CHANNELS = int(os.environ.get("DIFFQUANT_BENCH_MIN_CHANNELS", "16"))
# DIFFQUANT_BENCH_FREEZE=1: compiled rows (bf16 and diffquant alike) compile with Inductor's freezing, which folds
# parameters and buffers as constants: per-call copies made from static buffers alone (SD-1.5 b8 dq-fp8-gn runs a
# `..._to_copy_clone_expand...` kernel 50 times a call, 0.063 ms in all; H200, 2026-11-28) could fold away. Not yet
# measured on the GPU.
BENCH_FREEZE = os.environ.get("DIFFQUANT_BENCH_FREEZE", "") == "1"


# torch._int_mm (torchao's int8 dynamic matmul on CUDA) needs more than 16 rows
TORCHAO_INT8_MIN_ROWS = 17


def linear_rows(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Rows (tokens x batch) of every nn.Linear's input in one forward pass on ``inputs``, by module name."""
    from diffquant.models.adapter import call_model

    rows: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: rows.__setitem__(name, args[0].numel() // args[0].shape[-1]))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            call_model(model, *inputs)
    finally:
        for h in hooks:
            h.remove()
    return rows


# torchao's configs by default switch on Inductor's coordinate-descent tuning (all directions) for the whole process
# (``set_inductor_config=True``): every row of torchao then spent over 240 s autotuning kernels in its first
# compiled call and never finished (H200, torch 2.11, torchao 0.17, 2026-11-28: benchmarks/torchao_probe.py's stack
# dumps). The bench compiles every variant with the same default Inductor settings; DIFFQUANT_BENCH_TORCHAO_INDUCTOR=1
# restores torchao's.
TORCHAO_INDUCTOR_CONFIG = os.environ.get("DIFFQUANT_BENCH_TORCHAO_INDUCTOR", "0") == "1"


def _torchao(model: nn.Module, which: str, run_inputs: Optional[tuple] = None) -> nn.Module:
    """The torchao variant: its config applied to the nn.Linear layers it supports at this batch size
    (int8 dynamic: inputs of more than 16 rows, the limit of ``torch._int_mm``; the skipped layers stay bf16 and
    are listed in ``model._torchao_skipped``)."""
    from torchao.quantization import quantize_

    m = copy.deepcopy(model)
    skipped: list[str] = []
    if which == "int8dyn":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        rows = linear_rows(m, run_inputs) if run_inputs is not None else {}
        skipped = sorted(n for n, r in rows.items() if r < TORCHAO_INT8_MIN_ROWS)
        quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=TORCHAO_INDUCTOR_CONFIG),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn not in skipped)
    elif which == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                               set_inductor_config=TORCHAO_INDUCTOR_CONFIG))
    else:
        raise ValueError(f"torchao variant {which!r}; known: int8dyn, fp8")
    m._torchao_skipped = skipped
    return m


def make_variant(base_fp32: nn.Module, variant: str, calib_inputs: tuple, run_inputs: Optional[tuple] = None) -> nn.Module:
    """The model of one variant, in bf16, channels-last, on the base model's device (not compiled).
    ``run_inputs``: the inputs it will be timed on (torchao's int8 variant skips the layers it cannot run there)."""
    if variant.startswith("dq-"):
        m = _quantized(base_fp32, variant[3:], calib_inputs)
    else:
        m = copy.deepcopy(base_fp32)
    m = m.to(torch.bfloat16).to(memory_format=torch.channels_last).eval()
    if variant == "bf16-compile-gn":  # bf16 with diffquant's norm kernels: what the norms alone are worth
        from diffquant.kernels.fused_blocks import fuse_group_norms

        fuse_group_norms(m)
    if variant.startswith("torchao-"):
        m = _torchao(m, variant[len("torchao-"):], run_inputs)
    return m


def _tensor_bytes(p: torch.Tensor) -> int:
    # tensor subclasses (torchao) hold their storage in inner tensors
    if hasattr(p, "__tensor_flatten__") and type(p) is not torch.Tensor and type(p) is not nn.Parameter:
        names, _ = p.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(p, n)) for n in names)
    return p.numel() * p.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and low-bit layer buffers (packed weights + scales) as stored."""
    from diffquant.kernels.modules import LowBitLayer

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, LowBitLayer):
            total += m.weight_bytes
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += _tensor_bytes(p)
    return total


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@dataclass
class Task:
    model: str
    batch: int
    variant: str
    compile: bool = True


def run_tasks(tasks: list[Task], budget_s: float = 1e9, reps: int = 30, out_path: Optional[str] = None,
              layer_types: bool = True, progress: Callable[[str], None] = print, profile: bool = True) -> dict:
    """Run the tasks in the given order, starting no new task once ``budget_s`` has passed. Writes the
    result dict to ``out_path`` after every row. ``profile``: GPU time per kernel class of one call
    (``kernel_breakdown``)."""
    from diffquant.models.adapter import call_model

    t0 = time.time()
    dev = torch.device("cuda")
    result: dict = {"device": _device_name(), "torch": torch.__version__, "rows": [], "per_layer_type": [],
                    "kernel_breakdown": [], "skipped": [], "notes": []}
    try:
        import torchao  # noqa: F401

        result["torchao"] = torchao.__version__
    except Exception as e:  # not installed on this machine
        result["torchao"] = None
        result["notes"].append(f"torchao not importable here ({type(e).__name__}): torchao variants skipped")

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)

    # tasks run in the given order (the caller puts the important rows first); the fp32 base of each
    # model is built once and kept (the SD-1.5-sized UNet is 3.4 GB in fp32)
    bases: dict = {}
    for tk in tasks:
        if time.time() - t0 > budget_s:
            result["skipped"].append(vars(tk) | {"why": "budget"})
            continue
        if tk.variant.startswith("torchao-") and result["torchao"] is None:
            result["skipped"].append(vars(tk) | {"why": "torchao missing"})
            continue
        model_name = tk.model
        if model_name not in bases:
            base = build_model(model_name).to(dev)
            bases[model_name] = (base, sum(p.numel() for p in base.parameters()), inputs_for(base, 1, dev, torch.float32))
        base, n_params, calib = bases[model_name]
        ts = time.time()
        row = {"model": model_name, "params_M": round(n_params / 1e6, 1), "batch": tk.batch, "variant": tk.variant}
        try:
            _phase("build the variant")
            x, t, c = inputs_for(base, tk.batch, dev, torch.bfloat16)
            m = make_variant(base, tk.variant, calib, run_inputs=(x, t, c))
            row["weight_bytes"] = weight_bytes(m)
            if getattr(m, "_torchao_skipped", None):
                row["torchao_skipped_layers"] = len(m._torchao_skipped)
            rep = getattr(m, "_diffquant_convert_report", None)
            if rep is not None:
                row["converted_layers"] = len(rep.converted)
                row["kept_layers"] = len(rep.kept)
            do_compile = tk.compile and tk.variant != "bf16-eager"
            if do_compile and BENCH_FREEZE:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                row["inductor_freezing"] = True
            fn_model = torch.compile(m) if do_compile else m
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            tc = time.time()
            graphs0 = _dynamo_graphs()
            _phase("first call" + (" (compiles)" if do_compile else ""))
            with torch.no_grad():
                call_model(fn_model, x, t, c)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.time() - tc, 1)
            graphs1 = _dynamo_graphs()
            _phase("timing (CUDA graph capture, warm-up, reps)")
            ms, graphed = time_call(lambda fm=fn_model: call_model(fm, x, t, c), reps=reps)
            row.update(ms=round(ms, 4), compiled=do_compile, cuda_graph=graphed,
                       act_peak_mb=round((torch.cuda.max_memory_allocated() - before) / 2**20, 1))
            if do_compile:
                # graphs Dynamo captured (more than one: graph breaks); any captured while timing are recompiles,
                # and past the recompile limit the model runs eager: the row says so instead of passing as compiled
                row["dynamo_graphs"] = graphs1 - graphs0
                recompiled = _dynamo_graphs() - graphs1
                if recompiled:
                    row["recompiled_while_timed"] = recompiled
                    result["notes"].append(f"{model_name} b{tk.batch} {tk.variant}: recompiled "
                                           f"{row['recompiled_while_timed']} times while timed (may have run eager)")
            if profile:
                try:
                    result["kernel_breakdown"].append(
                        {"model": model_name, "batch": tk.batch, "variant": tk.variant}
                        | kernel_breakdown(lambda fm=fn_model: call_model(fm, x, t, c)))
                except Exception as e:
                    result["notes"].append(f"kernel breakdown {model_name} b{tk.batch} {tk.variant} failed: {e!r}"[:400])
            # per layer: the uncompiled layers (cuDNN / cuBLAS for bf16, the diffquant op for dq-*)
            if layer_types and (tk.variant in ("bf16-eager", "bf16-compile") or tk.variant.startswith("dq-")):
                try:
                    result["per_layer_type"] += per_layer_type(m, model_name, tk.batch, tk.variant,
                                                               x, t, c, reps=max(10, reps // 2))
                except Exception as e:
                    result["notes"].append(f"per-layer timing {model_name} b{tk.batch} {tk.variant} failed: {e!r}"[:400])
            del fn_model, m
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:600]
            log.exception("task %s failed", tk)
        row["device"] = result["device"]
        row["task_s"] = round(time.time() - ts, 1)
        result["rows"].append(row)
        _speedups(result["rows"])
        progress(json.dumps(row))
        save()
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    bases.clear()
    gc.collect()
    torch.cuda.empty_cache()
    save()
    result["wall_s"] = round(time.time() - t0, 1)
    save()
    return result


_PHASE_MARK = "diffquant-bench-phase:"
_T_START = time.time()


def _phase(what: str) -> None:
    """A progress mark on stderr: a row process killed at its timeout is reported with the last phase it reached."""
    print(f"{_PHASE_MARK} {what} at {time.time() - _T_START:.0f} s", file=sys.stderr, flush=True)


def _last_phase(stderr) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    marks = [ln.split(_PHASE_MARK, 1)[1].strip() for ln in text.splitlines() if _PHASE_MARK in ln]
    return marks[-1] if marks else "none reached"


def _task_spec(tk: Task) -> str:
    return f"{tk.model}:{tk.batch}:{tk.variant}" + ("" if tk.compile else ":eager")


def _spawn_task(tk: Task, timeout_s: Optional[float], reps: int, layer_types: bool, profile: bool, workdir: str,
                gpu: Optional[int] = None) -> dict:
    """One task in a child process (``python -m diffquant.kernels.bench``), on GPU ``gpu`` if given
    (``CUDA_VISIBLE_DEVICES``): its result dict, or raises subprocess.TimeoutExpired / RuntimeError."""
    import subprocess
    import sys

    out = os.path.join(workdir, f"row_{abs(hash(_task_spec(tk)))}.json")
    cmd = [sys.executable, "-m", "diffquant.kernels.bench", "--one", _task_spec(tk), "--out", out, "--reps", str(reps)]
    cmd += [] if layer_types else ["--no-layer-types"]
    cmd += [] if profile else ["--no-profile"]
    env = None if gpu is None else dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    try:
        p = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True, env=env)
    except subprocess.TimeoutExpired as e:
        raise RowTimeout(timeout_s, _last_phase(e.stderr)) from None
    if p.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"row process exited with {p.returncode}: {(p.stderr or '').strip()[-400:]}")
    with open(out) as f:
        return json.load(f)


class RowTimeout(Exception):
    """A row process killed at its timeout; ``phase``: the last progress mark it printed."""

    def __init__(self, timeout_s, phase: str):
        super().__init__(f"no result within {timeout_s} s; last phase: {phase}")
        self.phase = phase


def visible_gpus(spec: str) -> list[int]:
    """``--gpus``: "all" (every visible GPU), a count "N" (the first N) or a comma list of indices "0,2"."""
    n = torch.cuda.device_count()
    spec = spec.strip()
    if spec == "all":
        ids = list(range(n))
    elif "," in spec:
        ids = [int(v) for v in spec.split(",") if v.strip()]
    elif spec.isdigit():
        if int(spec) == 0:
            raise ValueError("--gpus '0' is a count of no GPUs; GPU 0 alone is '1' (a count) or '0,' (a list)")
        ids = list(range(int(spec)))
    else:
        raise ValueError(f"--gpus {spec!r}: 'all', a count, or a comma list of GPU indices")
    bad = [i for i in ids if not 0 <= i < n]
    if not ids or bad:
        raise ValueError(f"--gpus {spec!r}: {n} GPU(s) visible here" + (f"; no GPU {bad}" if bad else ""))
    return ids


def run_tasks_isolated(tasks: list[Task], row_timeout_s: Optional[float], budget_s: float = 1e9, reps: int = 30,
                       out_path: Optional[str] = None, layer_types: bool = True, progress: Callable[[str], None] = print,
                       profile: bool = True, spawn: Optional[Callable[..., dict]] = None,
                       gpus: Optional[list[int]] = None) -> dict:
    """:func:`run_tasks` with every task in its own process, killed after ``row_timeout_s`` (None: never; a compile
    or kernel that stalls costs one row, not the run: on 2026-11-28 a torchao row held an H200 for 430 s).

    ``gpus``: run that many rows at once, each on its own GPU of the list (a queue: the next task starts on the
    first GPU that is free; each row records its ``gpu``). Rows are merged in task order whatever order they finish
    in; speedups use the bf16-compile row of the same model and batch. A task that times out or fails gets a row
    with ``error``; a task not started within ``budget_s`` is listed under ``skipped``."""
    import queue
    import subprocess
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    spawn = spawn or _spawn_task
    t0 = time.time()
    result: dict = {"device": _device_name(), "torch": torch.__version__, "rows": [], "per_layer_type": [],
                    "kernel_breakdown": [], "skipped": [], "notes": [], "row_timeout_s": row_timeout_s}
    if gpus:
        result["gpus"] = list(gpus)
    done: list = [None] * len(tasks)  # per task: ("row", sub-result dict) | ("skipped", dict)
    lock = threading.Lock()
    free: "queue.Queue[Optional[int]]" = queue.Queue()
    for g in (gpus or [None]):
        free.put(g)

    def merge() -> None:
        lists = ("rows", "per_layer_type", "kernel_breakdown", "skipped", "notes")
        res = {k: ([] if k in lists else v) for k, v in result.items()}
        for item in done:
            if item is None:
                continue
            kind, sub = item
            if kind == "skipped":
                res["skipped"].append(sub)
                continue
            for key in lists:
                res[key] += sub.get(key, [])
            for key in ("torchao", "device", "torch"):
                if sub.get(key) is not None:
                    res[key] = sub[key]
        _speedups(res["rows"])
        result.update(res)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)

    def run_one(i: int, tk: Task, work: str) -> None:
        gpu = free.get()
        try:
            if time.time() - t0 > budget_s:
                item = ("skipped", vars(tk) | {"why": "budget"})
            else:
                ts = time.time()
                err = None
                try:
                    kw = {} if gpu is None else {"gpu": gpu}
                    sub = spawn(tk, row_timeout_s, reps, layer_types, profile, work, **kw)
                except RowTimeout as e:
                    err = f"timeout: no result within {row_timeout_s:.0f} s (process killed; last phase: {e.phase})"
                except subprocess.TimeoutExpired:
                    err = f"timeout: no result within {row_timeout_s:.0f} s (process killed)"
                except Exception as e:
                    err = f"{type(e).__name__}: {e}"[:600]
                if err is not None:
                    sub = {"rows": [{"model": tk.model, "batch": tk.batch, "variant": tk.variant, "error": err,
                                     "device": result["device"], "task_s": round(time.time() - ts, 1)}]}
                if gpu is not None:
                    for r in sub.get("rows", []):
                        r["gpu"] = gpu
                item = ("row", sub)
        finally:
            free.put(gpu)
        with lock:
            done[i] = item
            rows = item[1].get("rows", []) if item[0] == "row" else []
            progress(json.dumps(rows[-1]) if rows else f"{_task_spec(tk)}: {item[0]}")
            merge()

    with tempfile.TemporaryDirectory() as work:
        with ThreadPoolExecutor(max_workers=len(gpus) if gpus else 1) as pool:
            for f in [pool.submit(run_one, i, tk, work) for i, tk in enumerate(tasks)]:
                f.result()
    result["wall_s"] = round(time.time() - t0, 1)
    merge()
    return result


def _speedups(rows: list[dict]) -> None:
    """speedup_vs_bf16_compiled of every timed row from the bf16-compile row of its model and batch (if any)."""
    ref = {(r["model"], r["batch"]): r["ms"] for r in rows if r.get("variant") == "bf16-compile" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["model"], r["batch"]) in ref:
            r["speedup_vs_bf16_compiled"] = round(ref[(r["model"], r["batch"])] / r["ms"], 3)


def _layer_type(m: nn.Module) -> Optional[str]:
    from diffquant.kernels.modules import LowBitLayer

    if isinstance(m, LowBitLayer):
        return "linear" if m.kind == "linear" else f"conv{m.kernel_size[0]}x{m.kernel_size[1]}"
    if isinstance(m, nn.Conv2d):
        return f"conv{m.kernel_size[0]}x{m.kernel_size[1]}"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


@torch.no_grad()
def per_layer_type(model: nn.Module, model_name: str, batch: int, variant: str, x, t, c, reps: int = 15) -> list[dict]:
    """Each conv/linear layer timed alone on the input it sees in the model (CUDA graph replay),
    summed per layer type (activation quantization included for the low-bit layers)."""
    from diffquant.models.adapter import call_model

    seen: dict = {}
    hooks = []

    def keep(mod, args, out, name, lt):  # returns None: a forward hook's return value replaces the output
        if name not in seen:
            seen[name] = (mod, lt, args[0].detach().clone())

    for name, m in model.named_modules():
        lt = _layer_type(m)
        if lt is not None:
            hooks.append(m.register_forward_hook(lambda mod, a, o, name=name, lt=lt: keep(mod, a, o, name, lt)))
    try:
        call_model(model, x, t, c)
    finally:
        for h in hooks:
            h.remove()
    cache: dict = {}
    totals: dict = {}
    for name, (mod, lt, inp) in seen.items():
        key = (lt, type(mod).__name__, tuple(inp.shape), str(getattr(mod, "weight", getattr(mod, "parts", None)) is None),
               getattr(mod, "in_channels", getattr(mod, "in_features", None)),
               getattr(mod, "out_channels", getattr(mod, "out_features", None)),
               getattr(mod, "stride", None), inp.is_contiguous(memory_format=torch.channels_last))
        if key not in cache:
            ms, _ = time_call(lambda: mod(inp), warmup=3, reps=reps)
            cache[key] = ms
        tot = totals.setdefault(lt, [0.0, 0])
        tot[0] += cache[key]
        tot[1] += 1
    return [{"model": model_name, "batch": batch, "variant": variant, "layer_type": lt, "ms_sum": round(v[0], 4),
             "layers": v[1]} for lt, v in sorted(totals.items())]


# kernel classes by name (CUDA kernel names of cuDNN, cuBLAS/CUTLASS, FlashAttention, Inductor, diffquant). diffquant's
# Triton kernels are matched by prefix, so a new kernel lands in its class (a test in tests/test_kernels.py checks every one)
_KERNEL_CLASSES = (
    ("dq_qconv", ("_qconv_", "_gconv_")),  # _gconv_: the experimental Gluon conv (gluon_conv.py)
    ("dq_attention", ("_fp8_attn", "_fa_")),  # _fa_: the Gluon bf16 flash attention (gluon_attention.py)
    ("dq_norm", ("_gn_",)),
    ("dq_layernorm", ("_add_ln_",)),  # diffquant::add_layer_norm (triton_layernorm.py)
    ("dq_geglu", ("_linear_geglu", "_gg_kernel")),  # _gg_kernel: the experimental Gluon GEGLU (gluon_geglu.py)
    ("inductor_fused", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("conv_cudnn", ("conv", "fprop", "implicit_convolve", "dgrad", "xmma_fprop")),
    ("gemm", ("gemm", "nvjet", "cutlass", "matmul", "_scaled_mm", "cublas", "sm90_xmma")),
    ("norm", ("norm",)),
    ("copy_layout", ("copy", "transpose", "permute", "cat")),
)


def _kernel_class(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # Inductor's, also where its name holds a diffquant op's (..._linear_geglu_...)
        return "inductor_fused"
    for cls, keys in _KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def _dynamo_graphs() -> int:
    """Graphs torch.compile (Dynamo) has captured in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def kernel_breakdown(fn: Callable[[], Any], calls: int = 2, top: Optional[int] = None) -> dict:
    """GPU time per kernel class over ``calls`` calls of ``fn`` (torch.profiler, no CUDA graph):
    ``{"kernel_ms": {class: ms per call}, "top_kernels": [[name, ms per call, count per call], ...]}``.
    Classes by kernel name (_KERNEL_CLASSES); the sum is GPU busy time, not latency. ``top`` kernels are listed
    (default ``DIFFQUANT_PROFILE_TOP`` or 12; the environment reaches the per-row processes too)."""
    from torch.profiler import ProfilerActivity, profile

    top = top if top is not None else int(os.environ.get("DIFFQUANT_PROFILE_TOP", "12"))

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0)
        if not us or ev.key.startswith("ProfilerStep") or ev.key.startswith("cuda"):
            continue
        cls = _kernel_class(ev.key)
        per[cls] = per.get(cls, 0.0) + us / 1000 / calls
        kernels.append((ev.key[:120], round(us / 1000 / calls, 4), ev.count // calls))
    kernels.sort(key=lambda k: -k[1])
    return {"kernel_ms": {k: round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "busy_ms": round(sum(per.values()), 4), "top_kernels": [list(k) for k in kernels[:top]]}


def plan(models: list[str], batches: dict, variants: list[str], compile: bool = True) -> list[Task]:
    return [Task(m, b, v, compile) for m in models for b in batches[m] for v in variants]


def _main() -> None:  # one task in its own process: what run_tasks_isolated spawns
    import argparse

    ap = argparse.ArgumentParser(prog="python -m diffquant.kernels.bench")
    ap.add_argument("--one", required=True, help="model:batch:variant[:eager]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-layer-types", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    parts = a.one.split(":")
    eager = parts[-1] == "eager"
    if eager:
        parts = parts[:-1]
    model, batch, variant = ":".join(parts[:-2]), int(parts[-2]), parts[-1]
    run_tasks([Task(model, batch, variant, not eager)], reps=a.reps, out_path=a.out, layer_types=not a.no_layer_types,
              profile=not a.no_profile)


if __name__ == "__main__":
    _main()
