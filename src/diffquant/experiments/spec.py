"""Sweep specifications (YAML or JSON) and the cells they expand to.

A spec names models, quantization recipes, (weight, activation) bit-widths, samplers, step counts
and sample counts; the sweep is their product, plus one full-precision reference per model,
sampler, step count and sample count. Example::

    name: cifar10-naive
    models: [zoo:cifar10-ddpm]
    recipes: [naive]                  # or dicts: {name, method, weight_estimator, act_estimator,
                                      #   granularity, group_size, weight_symmetric, act_symmetric,
                                      #   softmax_bits, quantize_attention, split_shortcut,
                                      #   overrides, options}
    bits: [W8A8, W4A8, W8A16, W4A16, W2A16]   # or weight_bits: [8, 4] x act_bits: [8, 16]
    samplers: [ddim]                  # or dicts {sampler, spacing, eta}
    steps: [20, 50]
    num_samples: 256                  # or a list
    seed: 0
    metrics: [fd_cifar]               # distribution metrics of diffquant.evaluation.suite;
                                      # PSNR/SSIM against FP (same seeds) are always computed
    calibration: {num_per_step: 32, num_steps: 10, sampler: ddim, steps: 20, seed: 1000000}
                                      # consistency models: {sampler: cm, steps: 4, chains: [1, 2, 4],
                                      #   num_steps: null} = every noise level of the 1/2/4-step chains
    compute_batch: 64                 # samples are identical for a given compute batch and device type
    batch_size: 64
    shard_size: 1000
    grid: 16                          # samples per model in the report's side-by-side grids
    float_bits: 16                    # how floating-point operands count in sizes and BOPs

Bits 16 or 32 mean "left in floating point" (``W8A16`` quantizes weights only).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffquant.config import INT_BITS, OFF_BITS
from diffquant.sampling import SamplerSpec

__all__ = ["CalibSpec", "Recipe", "SweepSpec", "load_spec", "parse_bits", "stable_hash"]

RECIPE_CONFIG_KEYS = ("weight_estimator", "act_estimator", "weight_granularity", "group_size", "weight_symmetric",
                      "act_symmetric", "softmax_bits", "quantize_attention", "split_shortcut", "overrides",
                      "first_last_bits")
SPEC_KEYS = ("name", "title", "models", "model", "recipes", "methods", "bits", "weight_bits", "act_bits", "samplers",
             "steps", "num_samples", "seed", "metrics", "calibration", "compute_batch", "batch_size", "shard_size",
             "grid", "float_bits", "device", "floor", "notes", "save_quantized")


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _bits_ok(b: Any, what: str) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or (b not in INT_BITS and b not in OFF_BITS):
        raise ValueError(f"{what}={b!r} is not a bit-width; allowed: 2..8, or 16/32 for floating point")
    return 16 if b in OFF_BITS else b


def parse_bits(item: Any) -> tuple[int, int]:
    """``"W4A8"``, ``"w8a16"``, ``"W4"`` (weights only), ``[4, 8]`` or ``{weight_bits: 4, act_bits: 8}``."""
    if isinstance(item, str):
        m = re.fullmatch(r"[wW](\d+)(?:[aA](\d+))?", item.strip())
        if not m:
            raise ValueError(f"bits entry {item!r} is not like 'W4A8', 'W8A16' or 'W4' (weights only)")
        return _bits_ok(int(m.group(1)), "weight_bits"), _bits_ok(int(m.group(2) or 16), "act_bits")
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return _bits_ok(item[0], "weight_bits"), _bits_ok(item[1], "act_bits")
    if isinstance(item, dict) and set(item) <= {"weight_bits", "act_bits"} and "weight_bits" in item:
        return _bits_ok(item["weight_bits"], "weight_bits"), _bits_ok(item.get("act_bits", 16), "act_bits")
    raise ValueError(f"bits entry {item!r}: use 'W4A8', [4, 8] or {{weight_bits: 4, act_bits: 8}}")


def config_label(w: int, a: int) -> str:
    return "FP" if (w, a) == (16, 16) else f"W{w}A{a}"


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str = "naive"
    config: dict = field(default_factory=dict)  # build_config keyword arguments
    options: dict = field(default_factory=dict)  # keyword arguments of the PTQ method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _recipe(item: Any) -> Recipe:
    from diffquant.algorithms import METHODS

    if isinstance(item, str):
        item = {"method": item}
    if not isinstance(item, dict):
        raise ValueError(f"recipe {item!r} must be a method name or a mapping")
    unknown = set(item) - {"name", "method", "options", *RECIPE_CONFIG_KEYS}
    if unknown:
        raise ValueError(f"recipe {item!r}: unknown keys {sorted(unknown)}; allowed: name, method, options, "
                         f"{', '.join(RECIPE_CONFIG_KEYS)}")
    method = item.get("method", "naive")
    if method not in METHODS:
        raise ValueError(f"recipe method={method!r} is not available; available: {', '.join(sorted(METHODS))}")
    cfg = {k: item[k] for k in RECIPE_CONFIG_KEYS if k in item}
    if "overrides" in cfg:
        cfg["overrides"] = list(cfg["overrides"])
    opts = item.get("options") or {}
    if not isinstance(opts, dict):
        raise ValueError(f"recipe options must be a mapping; got {opts!r}")
    return Recipe(str(item.get("name", method)), method, cfg, dict(opts))


@dataclass(frozen=True)
class CalibSpec:
    """``num_steps``: time steps kept per trajectory (None: all). ``chains`` (consistency models, sampler 'cm'):
    the step counts whose chains' noise levels make up the calibration inputs, e.g. [1, 2, 4]."""

    num_per_step: int = 32
    num_steps: Optional[int] = 10
    sampler: str = "ddim"
    steps: int = 20
    spacing: str = "uniform"
    eta: float = 0.0
    seed: int = 1_000_000
    chains: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.chains is not None:
            ch = tuple(self.chains) if isinstance(self.chains, (list, tuple)) else None
            if not ch or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ch):
                raise ValueError(f"calibration.chains={self.chains!r} must be a non-empty list of step counts >= 1")
            if self.sampler != "cm":
                raise ValueError(f"calibration.chains applies to the consistency sampler ('cm'), not {self.sampler!r}")
            object.__setattr__(self, "chains", ch)

    def sampler_spec(self) -> SamplerSpec:
        return SamplerSpec(self.sampler, self.steps, self.spacing, self.eta)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["chains"] is None:
            d.pop("chains")  # specs without chains keep their cache keys
        else:
            d["chains"] = list(d["chains"])
        return d


def _sampler(item: Any) -> SamplerSpec:
    if isinstance(item, str):
        return SamplerSpec(item, 1)
    if isinstance(item, dict):
        unknown = set(item) - {"sampler", "spacing", "eta"}
        if unknown:
            raise ValueError(f"sampler entry {item!r}: unknown keys {sorted(unknown)}; allowed: sampler, spacing, eta "
                             f"(steps come from the spec's 'steps' list)")
        return SamplerSpec(item.get("sampler", "ddim"), 1, item.get("spacing", "uniform"), float(item.get("eta", 0.0)))
    raise ValueError(f"sampler entry {item!r} must be a name (ddim, ddpm, cm) or a mapping")


def sampler_label(s: SamplerSpec) -> str:
    label = s.sampler
    if s.sampler == "ddim":
        label += f"-{s.spacing}" + (f"-eta{s.eta:g}" if s.eta else "")
    return label


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _pos_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what}={v!r} must be a positive integer")
    return v


@dataclass(frozen=True)
class SweepSpec:
    name: str
    models: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    bits: tuple[tuple[int, int], ...]
    samplers: tuple[SamplerSpec, ...]  # steps=1 placeholders; the cells take their steps from ``steps``
    steps: tuple[int, ...]
    num_samples: tuple[int, ...]
    seed: int = 0
    metrics: tuple[str, ...] = ()
    calibration: CalibSpec = CalibSpec()
    compute_batch: int = 64
    batch_size: int = 64
    shard_size: int = 1000
    grid: int = 16
    float_bits: int = 16
    device: Optional[str] = None
    floor: bool = True
    save_quantized: bool = True
    title: str = ""
    notes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a sweep spec must be a mapping; got {type(d).__name__}")
        unknown = set(d) - set(SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown sweep spec keys {sorted(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
        if "model" in d and "models" in d:
            raise ValueError("give 'models' or 'model', not both")
        models = tuple(str(m) for m in _as_list(d.get("models", d.get("model"))) if m is not None)
        if not models:
            raise ValueError("the sweep spec names no model ('models: [zoo:NAME, ...]')")
        if "recipes" in d and "methods" in d:
            raise ValueError("give 'recipes' or 'methods', not both")
        recipes = tuple(_recipe(r) for r in _as_list(d.get("recipes", d.get("methods", ["naive"]))))
        names = [r.name for r in recipes]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe names must be unique; got {names} (give each a 'name')")
        if "bits" in d and ("weight_bits" in d or "act_bits" in d):
            raise ValueError("give 'bits' (pairs like W4A8) or 'weight_bits' x 'act_bits', not both")
        if "bits" in d:
            bits = [parse_bits(b) for b in _as_list(d["bits"])]
        else:
            wb = [_bits_ok(b, "weight_bits") for b in _as_list(d.get("weight_bits", [8]))]
            ab = [_bits_ok(b, "act_bits") for b in _as_list(d.get("act_bits", [8]))]
            bits = [(w, a) for w in wb for a in ab]
        bits = [b for b in dict.fromkeys(bits) if b != (16, 16)]  # FP is always there
        if not bits:
            raise ValueError("the sweep has no quantized configuration (all bits are 16/32)")
        samplers = tuple(dict.fromkeys(_sampler(s) for s in _as_list(d.get("samplers", ["ddim"]))))
        steps = tuple(dict.fromkeys(_pos_int(s, "steps") for s in _as_list(d.get("steps", [100]))))
        nums = tuple(dict.fromkeys(_pos_int(n, "num_samples") for n in _as_list(d.get("num_samples", [256]))))
        from diffquant.evaluation.suite import parse_metrics

        metrics = tuple(parse_metrics(d["metrics"])) if d.get("metrics") else ()
        cal = d.get("calibration") or {}
        if not isinstance(cal, dict):
            raise ValueError(f"calibration must be a mapping; got {cal!r}")
        bad = set(cal) - set(CalibSpec.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown calibration keys {sorted(bad)}; allowed: {', '.join(CalibSpec.__dataclass_fields__)}")
        calib = CalibSpec(**cal)
        calib.sampler_spec()  # validates
        for what in ("num_per_step", "num_steps", "steps"):
            if what == "num_steps" and calib.num_steps is None:
                continue  # every step / noise level
            _pos_int(getattr(calib, what), f"calibration.{what}")
        fb = d.get("float_bits", 16)
        if fb not in (16, 32):
            raise ValueError(f"float_bits={fb!r}; allowed: 16, 32")
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        grid = d.get("grid", 16)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 0:
            raise ValueError(f"grid={grid!r} must be a non-negative integer")
        for s in samplers:
            for n in steps:
                SamplerSpec(s.sampler, n, s.spacing, s.eta)
        return cls(
            name=str(d.get("name", "sweep")), models=models, recipes=recipes, bits=tuple(bits), samplers=samplers,
            steps=steps, num_samples=nums, seed=seed, metrics=metrics, calibration=calib,
            compute_batch=_pos_int(d.get("compute_batch", 64), "compute_batch"),
            batch_size=_pos_int(d.get("batch_size", 64), "batch_size"),
            shard_size=_pos_int(d.get("shard_size", 1000), "shard_size"), grid=grid, float_bits=fb,
            device=d.get("device"), floor=bool(d.get("floor", True)), save_quantized=bool(d.get("save_quantized", True)),
            title=str(d.get("title", "")), notes=tuple(str(n) for n in _as_list(d.get("notes", []))),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "models": list(self.models),
            "recipes": [r.to_dict() for r in self.recipes], "bits": [config_label(w, a) for w, a in self.bits],
            "samplers": [{"sampler": s.sampler, "spacing": s.spacing, "eta": s.eta} for s in self.samplers],
            "steps": list(self.steps), "num_samples": list(self.num_samples), "seed": self.seed,
            "metrics": list(self.metrics), "calibration": self.calibration.to_dict(),
            "compute_batch": self.compute_batch, "batch_size": self.batch_size, "shard_size": self.shard_size,
            "grid": self.grid, "float_bits": self.float_bits, "device": self.device, "floor": self.floor,
            "save_quantized": self.save_quantized, "notes": list(self.notes),
        }


def load_spec(path: str | Path) -> SweepSpec:
    """Read a ``.yaml``/``.yml``/``.json`` sweep spec."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"sweep spec {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from e
    elif p.suffix.lower() == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
    else:
        raise ValueError(f"sweep spec {str(p)!r}: unknown extension {p.suffix!r}; allowed: .yaml, .yml, .json")
    return SweepSpec.from_dict(d)
