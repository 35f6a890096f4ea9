"""End-to-end recipes shared by the CLI and scripts: build a QuantConfig from bit-widths, get
calibration data (capture or load), run a PTQ method."""
from __future__ import annotations

import dataclasses

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from diffquant.algorithms import METHODS
from diffquant.calibration import CalibrationSet, capture_calibration_set
from diffquant.config import LayerOverride, QuantConfig, scheme_from_bits
from diffquant.sampling import SamplerSpec

log = logging.getLogger(__name__)


def parse_override(text: str) -> LayerOverride:
    """``PATTERN=skip`` | ``PATTERN=w8a8`` | ``PATTERN=w4`` | ``PATTERN=a16`` (16 = floating point)."""
    import re

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like PATTERN=skip or PATTERN=w8a8 (bits 2..8, 16 = off)")
    pattern, spec = text.rsplit("=", 1)
    spec = spec.strip().lower()
    if spec == "skip":
        return LayerOverride(pattern.strip(), skip=True)
    m = re.fullmatch(r"(?:w(\d+))?(?:a(\d+))?", spec)
    if not m or not spec:
        raise ValueError(f"override {text!r}: {spec!r} is not 'skip' or w<bits>a<bits> (e.g. w8a8, w4, a16)")
    kw: dict[str, Any] = {}
    if m.group(1):
        wb = int(m.group(1))
        s = scheme_from_bits(wb, "weight")
        kw.update(weight=s) if s is not None else kw.update(weight_off=True)
    if m.group(2):
        ab = int(m.group(2))
        s = scheme_from_bits(ab, "act")
        kw.update(act=s) if s is not None else kw.update(act_off=True)
    return LayerOverride(pattern.strip(), **kw)


FIRST_LAST = ("conv_in", "conv_out")


def build_config(
    weight_bits: int = 8,
    act_bits: int = 8,
    *,
    weight_estimator: str = "minmax",
    act_estimator: str = "minmax",
    weight_granularity: str = "per_channel",
    group_size: Optional[int] = None,
    weight_symmetric: bool = False,
    act_symmetric: bool = False,
    softmax_bits: int = 16,
    quantize_attention: bool = True,
    split_shortcut: bool = True,
    overrides: Sequence[str | LayerOverride] = (),
    first_last_bits: Optional[int] = None,
    first_last: Sequence[str] = FIRST_LAST,
) -> QuantConfig:
    """A QuantConfig from bit-widths and estimator names.

    ``first_last_bits``: keep the first and last layers (``first_last`` globs; diffusers UNets: conv_in,
    conv_out) at this many bits for weights and activations wherever the main scheme is narrower,
    with the main scheme's estimator and granularity: the convention of BRECQ and Q-Diffusion
    (``set_first_last_layer_to_8bit``). None = no exception. ``overrides`` given explicitly win
    over it (the first matching override applies)."""
    w = scheme_from_bits(weight_bits, "weight", estimator=weight_estimator, granularity=weight_granularity,
                         group_size=group_size, symmetric=weight_symmetric)
    a = scheme_from_bits(act_bits, "act", estimator=act_estimator, symmetric=act_symmetric)
    ovs = tuple(o if isinstance(o, LayerOverride) else parse_override(o) for o in overrides)
    if first_last_bits is not None:
        if not 2 <= first_last_bits <= 8:
            raise ValueError(f"first_last_bits={first_last_bits} must be in 2..8 (or None for no exception)")
        fw = dataclasses.replace(w, bits=first_last_bits) if w is not None and w.dtype == "int" and w.bits < first_last_bits else None
        fa = dataclasses.replace(a, bits=first_last_bits) if a is not None and a.dtype == "int" and a.bits < first_last_bits else None
        if fw is not None or fa is not None:
            ovs = ovs + tuple(LayerOverride(pat, weight=fw, act=fa) for pat in first_last)
    return QuantConfig(weight=w, act=a, quantize_attention=quantize_attention and a is not None,
                       softmax_bits=softmax_bits, split_shortcut=split_shortcut, overrides=ovs)


@dataclass
class CalibOptions:
    num_per_step: int = 32
    num_steps: int = 10
    spec: SamplerSpec = SamplerSpec("ddim", 20)
    seed: int = 1_000_000
    batch_size: int = 64
    path: Optional[str] = None  # load from here if it exists, else capture and save here
    cm_chains: Optional[tuple] = None  # consistency models: step counts whose chains' noise levels are kept


def needs_calibration(config: QuantConfig) -> bool:
    return config.act is not None or config.attention_scheme is not None or config.softmax_bits < 16


def get_calibration(model: nn.Module, scheduler: Any, opts: CalibOptions, device: Any = None,
                    progress: bool = True) -> CalibrationSet:
    if opts.path and Path(opts.path).is_file():
        log.info("loading calibration data from %s", opts.path)
        return CalibrationSet.load(opts.path)
    cal = capture_calibration_set(model, scheduler, num_per_step=opts.num_per_step, num_steps=opts.num_steps,
                                  spec=opts.spec, cm_chains=opts.cm_chains, seed=opts.seed,
                                  batch_size=opts.batch_size, device=device, progress=progress)
    if opts.path:
        cal.save(opts.path)
    return cal


def run_ptq(model: nn.Module, config: QuantConfig, method: str, calib: Optional[CalibrationSet], *,
            device: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not available; available: {', '.join(sorted(METHODS))}")
    t0 = time.perf_counter()
    q = METHODS[method](model, config, calib, device=device, progress=progress, **kwargs)
    info = dict(getattr(q, "_diffquant_method", None) or {"method": method})
    info["calib_seconds"] = time.perf_counter() - t0
    q._diffquant_method = info  # type: ignore[attr-defined]
    return q


__all__ = ["CalibOptions", "build_config", "get_calibration", "needs_calibration", "parse_override", "run_ptq"]
