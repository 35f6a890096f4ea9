"""Per-shape block configurations for the implicit-GEMM conv kernel (``diffquant::qconv``).

The kernel's default block shapes come from a fixed heuristic (:func:`.triton_conv.pick_config`).
A *tuned table* replaces the heuristic for the exact layer shapes it lists: it is measured once per
GPU model by :func:`tune_calls` (``diffquant tune-kernels`` runs it on whole models) and read from

- :func:`use_table` (a path or a dict), else
- the JSON file named by the environment variable ``DIFFQUANT_QCONV_TUNED`` (``off``: no table at all), else
- the tables shipped with the package (``diffquant/kernels/tuned/*.json``, measured by this project).

A table is used only on the GPU model it was measured on (its ``device`` field); shapes it does not
list fall back to the heuristic. Format::

    {"format": "diffquant-qconv-tuned/1", "device": "NVIDIA H200", "triton": "3.5.0",
     "configs": {"<shape key>": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8,
                                 "num_stages": 3}, ...}}

A config may also name its kernel: ``"path": "tma"`` (the TMA kernel over a padded copy of the input, in
:mod:`.triton_conv_tma`, for the stride-1 8-bit shapes), ``"tma4d"`` (the TMA kernel with 4-D boxes over the
unpadded input), ``"tma4dp"`` (the same, persistent: one program per SM walks the tiles), ``"tma4dr"`` (4-D boxes
of one row each, one dot per output row of a 2- or 4-row tile, so that the A tiles stay in shared memory) or
``"gather"`` (the default). A ``"tma"`` or ``"tma4d"`` config may also carry ``"SPLIT_K"`` (an integer): each output
tile is then computed by that many programs over parts of the K loop, summed by a second kernel (for layers with too
few output tiles to fill the GPU). The tuner times the candidates of every kernel that can run a shape and the table
records the fastest. A ``diffquant::qconv_sc`` shape (conv2 with its shortcut; key ending in ``:sc<channels>``) may
instead be listed as ``{"path": "composed"}``: its separate qconv calls were faster than the shortcut kernel.

This module does not import Triton: the table logic is usable (and tested) on any machine.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

FORMAT = "diffquant-qconv-tuned/1"
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
PATHS = ("gather", "tma", "tma4d", "tma4dp", "tma4dr")  # the optional "path" field of a config: which conv kernel runs the shape
# the entry of a ``diffquant::qconv_sc`` shape (key ending in ``:sc<channels>``) whose composed qconv calls the tuner
# timed faster than the shortcut kernel
SC_COMPOSED = {"path": "composed"}

# 8-bit activations: the candidates tried per shape (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CANDIDATES_8BIT: tuple[tuple[int, ...], ...] = (
    (128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (128, 128, 128, 4, 3), (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 5), (64, 128, 128, 4, 4), (64, 128, 128, 4, 3),
    (64, 128, 64, 4, 5), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (128, 256, 128, 8, 3),
    (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 128, 8, 3), (64, 256, 128, 8, 3),
)
# 16-bit activations (W4A16 / W8A16): BLOCK_K at most 64
CANDIDATES_16BIT: tuple[tuple[int, ...], ...] = (
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3),
    (64, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3), (128, 256, 32, 8, 4),
)
# the TMA kernel's candidates (8-bit activations and weights only)
CANDIDATES_TMA: tuple[tuple[int, ...], ...] = (
    (128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (128, 128, 64, 4, 4), (128, 256, 128, 8, 3),
    (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (256, 128, 64, 8, 3), (64, 256, 128, 8, 3),
)
SMEM_LIMIT = 227 * 1024  # Hopper's per-block shared memory (bytes); the kernel compiler has the last word
# split-K candidates of the "tma" and "tma4d" kernels: these tiles, each split 2, 3 and 4 ways, where a layer has fewer
# output tiles than SPLIT_K_BELOW_TILES (twice the H100/H200's 132 SMs) and each split keeps 8 or more K steps
CANDIDATES_SPLIT_K: tuple[tuple[int, ...], ...] = (
    (128, 128, 128, 8, 4), (128, 128, 128, 4, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 256, 128, 8, 3),
    (64, 128, 64, 4, 4),  # BLOCK_K 64: twice the K steps, so layers of 128-256 channels can split (small batches)
)
# small tiles of the "tma" and "tma4d" kernels, unsplit, for the same few-tile layers: at batch 1 a 32x32 CIFAR layer
# of 128 channels has 8 tiles of 128x128 for 132 SMs, and cuDNN's bf16 conv beat every candidate above on all 8
# CIFAR b1 shapes timed (H200, 2026-11-29, BENCHMARKS.md "Kernels, eleventh measurement"); 64x64 tiles make 32
CANDIDATES_FEW_TILES: tuple[tuple[int, ...], ...] = ((64, 64, 128, 4, 4), (64, 64, 64, 4, 4))
# wide tiles of the "tma4d" kernel (BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_K, num_warps, num_stages): BLOCK_N + BLOCK_N2
# output channels a program from one A tile (triton_conv_tma._qconv_tma4d_wide_kernel), offered where they pad the
# channels no more than 128-wide tiles do: SD-1.5's 320 / 640 / 1,280 channels as 320 or 160 a tile. Compiled for
# sm_90 (Triton 3.6, FP8, residual add; ptxas on the CPU, 2026-11-29): with 64-pixel tiles of one output row the A
# box reaches the MMA from shared memory and spills 16-52 bytes; 128-pixel tiles of two rows (A reshaped in
# registers) spill about 1.5 KB and serialize the wgmma pipeline, as the plain kernel's 128 x 256 tiles do (0.9 KB)
CANDIDATES_WIDE: tuple[tuple[int, ...], ...] = (
    (64, 256, 64, 128, 8, 3), (64, 256, 64, 64, 8, 4), (64, 128, 32, 128, 4, 4), (128, 256, 64, 64, 8, 4),
    (128, 128, 32, 128, 4, 3),
    # one warpgroup on a one-row tile with A from shared memory, two programs an SM (at most 113 KB of stages each)
    # (session 21: the 64x64 level's 320-channel conv, 128 x 320 tiles, kept the tensor pipe 46 % busy, Nsight
    # Compute, benchmarks/results/ncu_model_probe_sd8_ln_pipe.txt)
    (64, 256, 64, 128, 4, 2), (64, 256, 64, 64, 4, 4), (64, 128, 32, 128, 4, 3), (128, 256, 64, 128, 8, 3),
)
SPLITS = (2, 3, 4)
SPLIT_K_PATHS = ("tma", "tma4d")
SPLIT_K_BELOW_TILES = 264


def act_kind(dtype: torch.dtype) -> str:
    if dtype == torch.float8_e4m3fn or dtype == torch.uint8:
        return "fp8"
    if dtype == torch.int8:
        return "int8"
    return str(dtype).replace("torch.", "")


def shape_key(x_shape: Sequence[int], x_dtype: torch.dtype, w_shape: Sequence[int], w4: bool,
              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], out_dtype: torch.dtype,
              has_add: bool = False) -> str:
    """The key of one qconv call in a tuned table: activation kind, 4-bit weights, input shape, output
    channels, kernel, stride/padding/dilation, output dtype and the fused residual."""
    n, c, h, w = (int(v) for v in x_shape)
    cout, kh, kw, _ = (int(v) for v in w_shape)
    return (f"{act_kind(x_dtype)}{'-w4' if w4 else ''}:{n}x{c}x{h}x{w}:o{cout}:k{kh}x{kw}"
            f":s{stride[0]}x{stride[1]}:p{padding[0]}x{padding[1]}:d{dilation[0]}x{dilation[1]}"
            f":{act_kind(out_dtype)}{':add' if has_add else ''}")


def smem_bytes(cfg: dict, a_bytes: int, w4: bool) -> int:
    """Shared memory of the pipelined A and B tiles (what decides whether a config compiles)."""
    a = cfg["BLOCK_M"] * cfg["BLOCK_K"] * a_bytes * (2 if w4 else 1)  # W4 reads two A tiles per packed K block
    # 8-bit weights, widened to the activation type for 16/32-bit; a wide tile's two B blocks
    b = cfg["BLOCK_K"] * (cfg["BLOCK_N"] + cfg.get("BLOCK_N2", 0)) * a_bytes
    return cfg["num_stages"] * (a + b)


def candidates(a_bytes: int, w4: bool, cout: int, ck: int, limit: int = SMEM_LIMIT, path: str = "gather",
               m: int = 0, taps: int = 9) -> list[dict]:
    """The candidate configs of one kernel (``path``) for one shape: those whose tiles fit the layer and
    shared memory. TMA candidates carry their ``"path"``. ``m`` (output pixels) and ``taps`` (kernel taps) given,
    ``"tma"`` and ``"tma4d"`` also get small-tile candidates (:data:`CANDIDATES_FEW_TILES`) and split-K ones
    (:data:`CANDIDATES_SPLIT_K`) where the layer has few output tiles, and ``"tma4d"`` wide tiles
    (:data:`CANDIDATES_WIDE`) where they pad the output channels no more than 128-wide tiles."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}; allowed: {PATHS}")
    tma = path != "gather"
    if tma and (a_bytes != 1 or w4):
        return []
    base = CANDIDATES_TMA if tma else CANDIDATES_8BIT if a_bytes == 1 else CANDIDATES_16BIT
    out = []
    for bm, bn, bk, nw, ns in base:
        if a_bytes > 2:
            bk = min(bk, 32)
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        if bn > 64 and cout <= bn // 2:  # a tile mostly outside the layer
            continue
        if bk > 32 and ck <= bk // 2:
            continue
        if smem_bytes(cfg, a_bytes, w4) > limit:
            continue
        if path == "tma4dr" and bm < 128:  # one row of 64: the plain 4-D kernel's tile
            continue
        if tma:
            cfg["path"] = path
        if cfg not in out:
            out.append(cfg)
    if path in SPLIT_K_PATHS and m > 0 and not (a_bytes != 1 or w4):
        if math.ceil(m / 128) * math.ceil(cout / 128) < SPLIT_K_BELOW_TILES:
            for bm, bn, bk, nw, ns in CANDIDATES_FEW_TILES:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, path=path)
                if cfg not in out and not (bk > 32 and ck <= bk // 2):
                    out.append(cfg)
        if path == "tma4d":
            for bm, bn, bn2, bk, nw, ns in CANDIDATES_WIDE:
                wide = bn + bn2
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, path=path, BLOCK_N2=bn2)
                if (math.ceil(cout / wide) * wide <= math.ceil(cout / 128) * 128 and cout > wide // 2
                        and not (bk > 32 and ck <= bk // 2) and smem_bytes(cfg, a_bytes, w4) <= limit):
                    out.append(cfg)
        for bm, bn, bk, nw, ns in CANDIDATES_SPLIT_K:
            steps = taps * math.ceil(ck / bk)
            if math.ceil(m / bm) * math.ceil(cout / bn) >= SPLIT_K_BELOW_TILES or (bn > 64 and cout <= bn // 2):
                continue
            for split in SPLITS:
                if steps >= 8 * split:
                    out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, path=path,
                                    SPLIT_K=split))
    return out


def config_label(cfg: dict) -> str:
    """A config's kernel as the tuner's rows name it: its path, with ``-k<SPLIT_K>`` for split-K and ``-w<channels>``
    for wide tiles."""
    path = cfg.get("path", "gather")
    if cfg.get("BLOCK_N2"):
        return f"{path}-w{cfg['BLOCK_N'] + cfg['BLOCK_N2']}"
    return f"{path}-k{cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else path


def validate_table(table: Any, where: str = "tuned table") -> dict:
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"{where}: not a diffquant qconv table (expected format {FORMAT!r})")
    if not isinstance(table.get("device"), str) or not isinstance(table.get("configs"), dict):
        raise ValueError(f"{where}: needs a 'device' string and a 'configs' object")
    for k, cfg in table["configs"].items():
        if cfg == SC_COMPOSED and ":sc" in k:
            continue
        if not isinstance(cfg, dict) or set(cfg) - {"path", "SPLIT_K", "BLOCK_N2"} != set(CONFIG_FIELDS) or \
                not all(isinstance(cfg[f], int) and cfg[f] > 0 for f in CONFIG_FIELDS):
            raise ValueError(f"{where}: config of {k!r} must have the positive integers {', '.join(CONFIG_FIELDS)} "
                             f"(and optionally a 'path', 'SPLIT_K' and 'BLOCK_N2'); got {cfg!r}")
        if cfg.get("path", "gather") not in PATHS:
            raise ValueError(f"{where}: config of {k!r} has path {cfg['path']!r}; allowed: {PATHS}")
        if "SPLIT_K" in cfg and (cfg.get("path") not in SPLIT_K_PATHS or not isinstance(cfg["SPLIT_K"], int)
                                 or cfg["SPLIT_K"] < 1):
            raise ValueError(f"{where}: config of {k!r}: SPLIT_K must be a positive integer on a config of path "
                             f"{' or '.join(SPLIT_K_PATHS)}; got {cfg!r}")
        if "BLOCK_N2" in cfg and (cfg.get("path") != "tma4d" or not isinstance(cfg["BLOCK_N2"], int)
                                  or cfg["BLOCK_N2"] < 16 or cfg["BLOCK_N2"] & (cfg["BLOCK_N2"] - 1)
                                  or cfg.get("SPLIT_K", 1) > 1):
            raise ValueError(f"{where}: config of {k!r}: BLOCK_N2 (wide tiles) must be a power of two of 16 or more "
                             f"on an unsplit config of path tma4d; got {cfg!r}")
    return table


def merge_tables(base: dict, new: dict) -> dict:
    """``base`` updated by a newer table of the same GPU model: ``new``'s configs replace or add entries, and the shapes
    ``new`` timed without listing them (``tuned_keys``: the heuristic was within 3 % there) lose their old entries.
    The provenance (command, date, Triton) of both is kept in ``merged_from``."""
    validate_table(base, "base table")
    validate_table(new, "new table")
    if base["device"] != new["device"]:
        raise ValueError(f"tables of different GPU models: {base['device']!r} vs {new['device']!r}")
    configs = {k: v for k, v in base["configs"].items() if k not in set(new.get("tuned_keys", ()))}
    configs.update(new["configs"])
    prov = [{k: t.get(k) for k in ("command", "date", "triton", "torch")} for t in (base, new)]
    merged = {k: v for k, v in base.items() if k not in ("configs", "tuned_keys", "merged_from")}
    merged.update(date=new.get("date", base.get("date")), triton=new.get("triton", base.get("triton")),
                  merged_from=base.get("merged_from", prov[:1]) + prov[1:], configs=dict(sorted(configs.items())))
    return validate_table(merged, "merged table")


def load_table(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"qconv tuned table {p} does not exist")
    try:
        table = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    return validate_table(table, str(p))


_STATE: dict[str, Any] = {"table": None, "env_path": None, "env_table": None}


def use_table(table: Union[None, str, Path, dict]) -> None:
    """Use this tuned table (a path or a dict; ``None``: back to the environment variable / heuristic)."""
    if table is None or isinstance(table, dict):
        _STATE["table"] = None if table is None else validate_table(table)
    else:
        _STATE["table"] = load_table(table)


PACKAGED_DIR = Path(__file__).resolve().parent / "tuned"


def packaged_tables() -> list[dict]:
    """The tuned tables shipped with diffquant (read once)."""
    if _STATE.get("packaged") is None:
        _STATE["packaged"] = [load_table(p) for p in sorted(PACKAGED_DIR.glob("*.json"))]
    return _STATE["packaged"]


def active_tables() -> list[dict]:
    """The tables in force, by precedence: :func:`use_table`, else ``DIFFQUANT_QCONV_TUNED`` (``off``: none),
    else the packaged tables."""
    if _STATE.get("disabled"):
        return []
    if _STATE["table"] is not None:
        return [_STATE["table"]]
    path = os.environ.get("DIFFQUANT_QCONV_TUNED")
    if path and path.strip().lower() in ("off", "none", "0"):
        return []
    if path:
        if _STATE["env_path"] != path:
            _STATE["env_table"], _STATE["env_path"] = load_table(path), path
        return [_STATE["env_table"]]
    return packaged_tables()


def lookup(key: str, device_name: str) -> Optional[dict]:
    """The tuned config of ``key`` on ``device_name``, or None (not tuned here: the heuristic decides)."""
    for table in active_tables():
        if table["device"] == device_name and key in table["configs"]:
            return dict(table["configs"][key])
    return None


def untuned_calls(calls: list, device_name: str) -> list:
    """The recorded calls (``(key, args, kwargs)``) whose shape no active table lists for ``device_name``: what a
    tuning run with ``--untuned-only`` times (a run cut short by its budget is continued without re-timing the
    shapes it tuned)."""
    return [c for c in calls if lookup(c[0], device_name) is None]


def calls_matching(calls: list, shapes: Sequence[str]) -> list:
    """The recorded calls whose shape key contains one of ``shapes`` (``tune-kernels --shapes``)."""
    return [c for c in calls if any(sub in c[0] for sub in shapes)]


def lookup_nearest(key: str, device_name: str) -> Optional[dict]:
    """For a shape without an entry: the config tuned on ``device_name`` for the same layer (activation kind,
    channels, kernel, stride, padding, dilation, output, residual) at the batch x spatial size nearest to this one's
    (log ratio of the GEMM rows N*H*W), or None. Used with ``DIFFQUANT_QCONV_BORROW=1`` (not yet measured against
    the heuristic: a tuned config of another batch size may not suit this one)."""
    fields = key.split(":")
    n, c, h, w = (int(v) for v in fields[1].split("x"))
    best, best_d = None, None
    for table in active_tables():
        if table["device"] != device_name:
            continue
        for k, cfg in table["configs"].items():
            f = k.split(":")
            if len(f) != len(fields) or f[0] != fields[0] or f[2:] != fields[2:]:
                continue
            kn, kc, kh, kw = (int(v) for v in f[1].split("x"))
            if kc != c:
                continue
            d = abs(math.log((kn * kh * kw) / (n * h * w)))
            if best_d is None or d < best_d:
                best, best_d = dict(cfg), d
    return best


@contextmanager
def no_tables():
    """Inside: no tuned table applies (the heuristic decides every config); the tuner's baseline."""
    prev = _STATE.get("disabled")
    _STATE["disabled"] = True
    try:
        yield
    finally:
        _STATE["disabled"] = prev


# ---- recording the calls of a model (the tuner's input) --------------------------------------------
_RECORD: dict[str, Any] = {"calls": None, "force": None, "sc_calls": None}


@contextmanager
def _recording(slot: str):
    calls: list = []
    prev = _RECORD[slot]
    _RECORD[slot] = calls
    try:
        yield calls
    finally:
        _RECORD[slot] = prev


def record_calls():
    """Inside: every Triton qconv call appends ``(key, args, kwargs)`` to the yielded list (eager mode)."""
    return _recording("calls")


def record_sc_calls():
    """Inside: every Triton ``diffquant::qconv_sc`` call appends ``(key, args)`` to the yielded list (eager mode;
    the shortcut tuner's input, :func:`.tune_models.tune_shortcut_convs`)."""
    return _recording("sc_calls")


@contextmanager
def forced_config(cfg: Optional[dict]):
    """Inside: every Triton qconv call uses ``cfg`` (the tuner's candidates)."""
    prev = _RECORD["force"]
    _RECORD["force"] = cfg
    try:
        yield
    finally:
        _RECORD["force"] = prev


def call_flops(args) -> float:
    """Multiply-adds x 2 of one recorded qconv call."""
    from diffquant.kernels.reference import conv_out_hw

    x, w, stride, padding, dilation = args[0], args[1], args[9], args[10], args[11]
    n, c, h, wd = x.shape
    ho, wo = conv_out_hw(h, wd, w.shape[1], w.shape[2], stride, padding, dilation)
    return 2.0 * n * ho * wo * w.shape[0] * w.shape[1] * w.shape[2] * c


def tune_calls(calls: list, qconv_fn, reps: int = 10, progress=print, time_fn=None,
               budget_s: float = float("inf"), paths_for=None, on_shape=None,
               incumbents: Optional[dict] = None) -> tuple[dict, list[dict]]:
    """Time every candidate config on each distinct recorded call (GPU), against the heuristic (no tuned
    table applies while tuning): returns the ``configs`` of a tuned table (only shapes where a candidate beat
    the heuristic by more than 3 %) and one diagnostic row per shape (heuristic ms, best ms and config, the best ms
    of each kernel, cuDNN bf16 conv ms of the same shape). ``paths_for(args, kwargs)``: the TMA kernels that can run this
    call (their candidates compete too); None: gather candidates only. ``incumbents``: the configs the active tables
    give the keys now; each competes too, whatever ``paths_for`` allows, so that a run that skips a kernel cannot
    displace a faster entry of that kernel when merged (session 12's ``--skip-paths tma`` re-tune moved SD-1.5's
    8x8 convs off the padded-copy kernel and was slower in the model). ``on_shape(configs, rows)`` is called after
    every shape (to save partial results of a run that may be cut short)."""
    import time

    import torch.nn.functional as F

    from diffquant.kernels.bench import time_call

    time_fn = time_fn or (lambda fn: time_call(fn, warmup=2, reps=reps, inner=0)[0])  # inner=0: batch-1 calls too
    configs: dict = {}
    rows: list[dict] = []
    # distinct shapes, the most work first (a run cut short by its budget has tuned the big layers)
    distinct: dict = {}
    for key, args, kwargs in calls:
        distinct.setdefault(key, (args, kwargs))
    t0 = time.time()
    for key, (args, kwargs) in sorted(distinct.items(), key=lambda kv: -call_flops(kv[1][0])):
        if time.time() - t0 > budget_s:
            rows.append({"key": key, "skipped": "budget"})
            continue
        x, w = args[0], args[1]
        w4 = args[12]
        stride, padding, dilation = args[9], args[10], args[11]
        a_bytes = x.element_size()
        ck = w.shape[3]
        with torch.no_grad(), no_tables():
            ref = qconv_fn(*args, **kwargs).float()
            base_ms = time_fn(lambda: qconv_fn(*args, **kwargs))
            best, best_ms, tried, failed, by_path = None, base_ms, 0, 0, {"gather": base_ms}
            timed = []  # every candidate's time: the data to fit a better default for shapes without an entry
            cands = candidates(a_bytes, w4, w.shape[0], ck)
            m = round(call_flops(args) / (2 * w.shape[0] * w.shape[1] * w.shape[2] * x.shape[1]))  # output pixels
            for path in sorted(paths_for(args, kwargs) if paths_for is not None else ()):
                cands += candidates(a_bytes, w4, w.shape[0], ck, path=path, m=m, taps=w.shape[1] * w.shape[2])
            incumbent = (incumbents or {}).get(key)
            if incumbent is not None and incumbent not in cands:
                cands.append(dict(incumbent))
            for cfg in cands:
                progress(f"  {key} trying {tuple(cfg.values())}")  # a candidate that hangs shows in the log
                try:
                    with forced_config(cfg):
                        out = qconv_fn(*args, **kwargs).float()
                        err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
                        if not (err < 1e-2):
                            raise RuntimeError(f"output differs from the heuristic config's by {err:.3g}")
                        ms = time_fn(lambda: qconv_fn(*args, **kwargs))
                    tried += 1
                except Exception as e:  # out of resources, wrong result: not a candidate for this shape
                    failed += 1
                    progress(f"  {key} {tuple(cfg.values())}: skipped ({str(e).splitlines()[0][:120]})")
                    continue
                path = config_label(cfg)
                by_path[path] = min(by_path.get(path, ms), ms)
                timed.append([cfg[f] for f in CONFIG_FIELDS] + [path, round(ms, 5)])
                if ms < best_ms:
                    best, best_ms = cfg, ms
            # cuDNN bf16 on the same shape (channels-last), for reference
            cin = x.shape[1]
            xb = torch.randn(x.shape, device=x.device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            wb = torch.randn(w.shape[0], cin, w.shape[1], w.shape[2], device=x.device, dtype=torch.bfloat16) \
                .contiguous(memory_format=torch.channels_last)
            cudnn_ms = time_fn(lambda: F.conv2d(xb, wb, None, stride, padding, dilation))
        if best is not None and best_ms < 0.97 * base_ms:
            configs[key] = best
        flops = call_flops(args)
        row = {"key": key, "heuristic_ms": round(base_ms, 5), "best_ms": round(best_ms, 5),
               "best": best, "incumbent": incumbent, "tried": tried, "failed": failed,
               "cudnn_bf16_ms": round(cudnn_ms, 5),
               "best_ms_by_path": {p: round(v, 5) for p, v in by_path.items()},
               "candidates_ms": timed,  # [*CONFIG_FIELDS, path (-k<split>), ms] of every candidate that ran correctly
               "tflops_best": round(flops / best_ms / 1e9, 1), "tflops_cudnn_bf16": round(flops / cudnn_ms / 1e9, 1)}
        rows.append(row)
        progress(json.dumps(row))
        if on_shape is not None:
            on_shape(configs, rows)
    return configs, rows
