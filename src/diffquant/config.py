"""Quantization configuration: frozen dataclasses with validation and a JSON round-trip.

``QuantScheme`` describes how one tensor is quantized; ``QuantConfig`` says which schemes the
weights, the activations and the attention matmuls of a model get, with per-layer overrides
selected by glob patterns on qualified module names (``fnmatch`` rules: ``*`` matches dots too).
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

INT_BITS = tuple(range(2, 9))
DTYPES = ("int", "fp8_e4m3")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ESTIMATORS = ("minmax", "percentile", "ema", "lp")
OFF_BITS = (16, 32)  # what the CLI accepts for "not quantized"


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized.

    bits:        2..8 for integer schemes; 8 for ``fp8_e4m3``.
    dtype:       "int" (uniform affine integer grid) or "fp8_e4m3" (FP8 with a scale).
    symmetric:   zero point fixed at 0 (signed grid) instead of a learned/estimated offset.
    granularity: "per_tensor", "per_channel" (output channel of a weight) or "per_group"
                 (groups of ``group_size`` along a weight's flattened input dimension).
    estimator:   how the range is found: "minmax", "percentile", "ema" (running average of
                 batch min/max) or "lp" (grid search of clipping ratios minimising ||x-Q(x)||_p).
    """

    bits: int = 8
    dtype: str = "int"
    symmetric: bool = False
    granularity: str = "per_tensor"
    group_size: Optional[int] = None
    estimator: str = "minmax"
    percentile: float = 99.99
    lp_p: float = 2.4
    lp_grid: int = 80
    ema_momentum: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an integer; got {self.bits!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        if self.dtype == "int" and self.bits not in INT_BITS:
            raise ValueError(
                f"bits={self.bits} is not supported for integer quantization; allowed: 2..8 "
                f"(use no scheme, or 16/32 on the CLI, to leave a tensor in floating point)"
            )
        if self.dtype == "fp8_e4m3" and self.bits != 8:
            raise ValueError(f"bits={self.bits} is not valid for dtype 'fp8_e4m3'; it must be 8")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(f"granularity 'per_group' needs a positive integer group_size; got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} is only valid with granularity 'per_group'")
        if not (0.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile={self.percentile} must lie in (0, 100]")
        if not (self.lp_p > 0 and math.isfinite(self.lp_p)):
            raise ValueError(f"lp_p={self.lp_p} must be a positive finite number")
        if not (isinstance(self.lp_grid, int) and 1 <= self.lp_grid <= 100):
            raise ValueError(f"lp_grid={self.lp_grid} must be an integer in 1..100 (ratios 1.0, 0.99, ...)")
        if not (0.0 <= self.ema_momentum < 1.0):
            raise ValueError(f"ema_momentum={self.ema_momentum} must lie in [0, 1)")

    @property
    def num_levels(self) -> int:
        return 2**self.bits if self.dtype == "int" else 253  # e4m3fn: 253 distinct finite values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QuantScheme keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def describe(self) -> str:
        if self.dtype == "fp8_e4m3":
            s = "fp8e4m3"
        else:
            s = f"int{self.bits}{'s' if self.symmetric else 'a'}"
        g = {"per_tensor": "tensor", "per_channel": "channel", "per_group": f"group{self.group_size}"}[self.granularity]
        return f"{s}/{g}/{self.estimator}"


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exception, selected by a glob on the qualified module name.

    ``skip=True`` leaves matching layers in floating point. Otherwise ``weight``/``act``
    replace the config's schemes for matching layers; ``weight_off``/``act_off`` turn one of
    them off.
    """

    pattern: str
    skip: bool = False
    weight: Optional[QuantScheme] = None
    act: Optional[QuantScheme] = None
    weight_off: bool = False
    act_off: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"override pattern must be a non-empty string; got {self.pattern!r}")
        if self.weight is not None and self.weight_off:
            raise ValueError(f"override {self.pattern!r}: give either weight or weight_off, not both")
        if self.act is not None and self.act_off:
            raise ValueError(f"override {self.pattern!r}: give either act or act_off, not both")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "skip": self.skip,
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
            "weight_off": self.weight_off,
            "act_off": self.act_off,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerOverride":
        d = dict(d)
        for k in ("weight", "act"):
            if d.get(k) is not None:
                d[k] = QuantScheme.from_dict(d[k])
        return cls(**d)


@dataclass(frozen=True)
class QuantConfig:
    """What gets quantized in a model, and how.

    weight:        scheme for Conv2d/Linear weights (None: weights stay in floating point).
    act:           scheme for the inputs of Conv2d/Linear (None: activations stay in floating point).
    attention:     scheme for the inputs of the attention matmuls Q·Kᵀ and softmax·V
                   (None: same as ``act``; to leave the matmuls alone use ``quantize_attention=False``).
    softmax_bits:  bits of the softmax probabilities feeding softmax·V (16 = not quantized).
    split_shortcut: quantize the two halves of concatenated skip-connection inputs separately.
    overrides:     per-layer exceptions (first match wins).
    """

    weight: Optional[QuantScheme] = field(default_factory=lambda: QuantScheme(8, granularity="per_channel"))
    act: Optional[QuantScheme] = field(default_factory=lambda: QuantScheme(8))
    attention: Optional[QuantScheme] = None
    quantize_attention: bool = True
    softmax_bits: int = 16
    split_shortcut: bool = True
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self) -> None:
        if self.softmax_bits not in (*INT_BITS, 16):
            raise ValueError(f"softmax_bits={self.softmax_bits} is not supported; allowed: 2..8, or 16 (off)")
        if self.act is not None and self.act.granularity != "per_tensor":
            raise ValueError(
                f"activation granularity {self.act.granularity!r} is not supported; activations use 'per_tensor'"
            )
        if self.attention is not None and self.attention.granularity != "per_tensor":
            raise ValueError(f"attention granularity {self.attention.granularity!r} is not supported; use 'per_tensor'")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    # ---- resolution -------------------------------------------------------------------
    def override_for(self, name: str) -> Optional[LayerOverride]:
        for o in self.overrides:
            if o.matches(name):
                return o
        return None

    def schemes_for(self, name: str) -> Optional[tuple[Optional[QuantScheme], Optional[QuantScheme]]]:
        """(weight scheme, act scheme) for the layer ``name``; None when the layer is skipped."""
        o = self.override_for(name)
        w, a = self.weight, self.act
        if o is not None:
            if o.skip:
                return None
            w = None if o.weight_off else (o.weight or w)
            a = None if o.act_off else (o.act or a)
        return w, a

    @property
    def attention_scheme(self) -> Optional[QuantScheme]:
        if not self.quantize_attention:
            return None
        return self.attention if self.attention is not None else self.act

    # ---- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
            "attention": self.attention.to_dict() if self.attention else None,
            "quantize_attention": self.quantize_attention,
            "softmax_bits": self.softmax_bits,
            "split_shortcut": self.split_shortcut,
            "overrides": [o.to_dict() for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        d = dict(d)
        for k in ("weight", "act", "attention"):
            if d.get(k) is not None:
                d[k] = QuantScheme.from_dict(d[k])
        d["overrides"] = tuple(LayerOverride.from_dict(o) for o in d.get("overrides", ()))
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(s)
        return s

    @classmethod
    def from_json(cls, s_or_path: str | Path) -> "QuantConfig":
        p = Path(s_or_path) if not str(s_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(s_or_path)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"quantization config is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def replace(self, **kw: Any) -> "QuantConfig":
        return replace(self, **kw)

    def describe(self) -> str:
        w = f"W{self.weight.bits}" if self.weight else "W16"
        a = f"A{self.act.bits}" if self.act else "A16"
        return w + a


def scheme_from_bits(bits: int, role: str, **kw: Any) -> Optional[QuantScheme]:
    """The CLI's shorthand: 16/32 mean 'not quantized'; weights default to per-channel."""
    if bits in OFF_BITS:
        return None
    if role == "weight":
        kw.setdefault("granularity", "per_channel")
    return QuantScheme(bits=bits, **kw)
