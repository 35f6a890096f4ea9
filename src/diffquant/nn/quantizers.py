"""Quantizer modules: hold a scheme and its qparams as buffers, fake-quantize in ``forward``.

Lifecycle (explicit, no lazy initialisation inside ``forward``):

* ``WeightQuantizer.init_from(weight)`` computes qparams from the weight with the scheme's
  estimator (done by :func:`diffquant.quantize`).
* ``ActQuantizer`` starts *uncalibrated*. In mode ``"observe"`` it records statistics and passes
  data through; ``finalize()`` turns them into qparams and switches to mode ``"quant"``. Running
  an uncalibrated quantizer in mode ``"quant"`` is an error, never a silent pass-through.
* Mode ``"fp"`` passes data through unchanged (used to run the full-precision path of a model
  that is already quantized, e.g. to record reconstruction targets).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffquant.config import QuantScheme
from diffquant.quant.adaround import hard_codes, init_alpha, rectified_sigmoid
from diffquant.quant.affine import qrange
from diffquant.quant.affine import fake_quantize, fake_quantize_fp8, fake_quantize_fused, fake_quantize_weight, group_view
from diffquant.quant.estimators import ActivationObserver, weight_qparams

MODES = ("quant", "observe", "fp")

# Cache fake-quantized weights when no gradient is needed (sampling/evaluation): the weight is
# quantized once, not at every forward pass. Invalidated by any in-place change of the weight
# or the qparams (tensor version counters).
CACHE_WEIGHTS = True


class _Quantizer(nn.Module):
    def __init__(self, scheme: Optional[QuantScheme]):
        super().__init__()
        self.scheme = scheme
        self.mode = "quant"

    @property
    def enabled(self) -> bool:
        return self.scheme is not None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {MODES}")
        self.mode = mode

    def extra_repr(self) -> str:
        return "off" if self.scheme is None else self.scheme.describe()


class WeightQuantizer(_Quantizer):
    """Fake-quantizes a weight tensor; qparams have shape (rows, 1) as laid out by ``group_view``."""

    def __init__(self, scheme: Optional[QuantScheme], weight_shape: Optional[torch.Size] = None):
        super().__init__(scheme)
        if scheme is not None:
            if weight_shape is None:
                raise ValueError("WeightQuantizer needs the weight shape")
            rows = group_view(torch.empty(weight_shape, device="meta"), scheme).shape[0]
            self.register_buffer("scale", torch.ones(rows, 1))
            self.register_buffer("zero_point", torch.zeros(rows, 1))
        self.rounding = "nearest"  # "nearest" | "soft" | "hard" (AdaRound)
        self.alpha: Optional[nn.Parameter] = None

    # ---- AdaRound ----------------------------------------------------------------------------
    def start_adaround(self, weight: torch.Tensor) -> nn.Parameter:
        """Learnable rounding: alpha initialised so the soft weight equals the float weight."""
        if self.scheme is None or self.scheme.dtype != "int":
            raise ValueError("AdaRound needs an integer weight scheme")
        g = group_view(weight.detach().float(), self.scheme)
        self.alpha = nn.Parameter(init_alpha(g * (1.0 / self.scale)))
        self.rounding = "soft"
        return self.alpha

    def _adaround(self, w: torch.Tensor) -> torch.Tensor:
        g = group_view(w, self.scheme)
        inv = 1.0 / self.scale.to(w.dtype)
        base = torch.floor(g.detach() * inv)
        h = rectified_sigmoid(self.alpha) if self.rounding == "soft" else (self.alpha >= 0).to(w.dtype)
        qmin, qmax = qrange(self.scheme.bits, self.scheme.symmetric)
        z = self.zero_point.to(w.dtype)
        q = torch.clamp(base + h + z, qmin, qmax)
        return ((q - z) * self.scale.to(w.dtype)).reshape(w.shape)

    @torch.no_grad()
    def bake_adaround(self, weight: torch.Tensor) -> torch.Tensor:
        """The hard-rounded weight, dequantized: a float tensor that nearest rounding maps onto
        exactly the codes AdaRound chose. Ends AdaRound (back to nearest rounding)."""
        if self.alpha is None:
            raise RuntimeError("bake_adaround called without start_adaround")
        g = group_view(weight.detach().float(), self.scheme)
        qmin, qmax = qrange(self.scheme.bits, self.scheme.symmetric)
        q = torch.clamp(hard_codes(g * (1.0 / self.scale), self.alpha) + self.zero_point, qmin, qmax)
        out = ((q - self.zero_point) * self.scale).reshape(weight.shape).to(weight.dtype)
        self.alpha = None
        self.rounding = "nearest"
        self.__dict__.pop("_cache", None)
        return out

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        if self.scheme is None:
            return
        s, z = weight_qparams(group_view(weight.detach(), self.scheme), self.scheme)
        self.scale.copy_(s)
        self.zero_point.copy_(z)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.scheme is None or self.mode != "quant":
            return w
        if self.rounding != "nearest":
            return self._adaround(w)
        # not under torch.compile: Dynamo cannot trace the data-pointer key (a graph break per layer), and a
        # compiled graph recomputes the fake-quant weight inside the graph anyway
        cacheable = CACHE_WEIGHTS and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device,
                   self.scale.data_ptr(), self.scale._version, self.zero_point._version)
            cached = self.__dict__.get("_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        out = fake_quantize_weight(w, self.scale.to(w.dtype), self.zero_point.to(w.dtype), self.scheme)
        if cacheable:
            self.__dict__["_cache"] = (key, out)
        else:
            self.__dict__.pop("_cache", None)
        return out

    def integer_codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer grid values of ``w`` (int tensor shaped like ``w``); integer schemes only."""
        if self.scheme is None or self.scheme.dtype != "int":
            raise ValueError("integer_codes needs an integer weight scheme")
        g = group_view(w.detach().float(), self.scheme)
        from diffquant.quant.affine import quantize

        q = quantize(g, self.scale, self.zero_point, self.scheme.bits, self.scheme.symmetric)
        return q.reshape(w.shape).to(torch.int16)


class ActQuantizer(_Quantizer):
    """Per-tensor fake quantization of activations, calibrated by observation."""

    def __init__(self, scheme: Optional[QuantScheme], name: str = ""):
        super().__init__(scheme)
        self.name = name
        self.observer: Optional[ActivationObserver] = None
        if scheme is not None:
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("zero_point", torch.zeros(()))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._is_calibrated = False  # mirror of the buffer, so forward needs no device sync

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "calibrated"
        if key in state_dict:
            self._is_calibrated = bool(state_dict[key])

    def start_observing(self, reservoir_size: int = 1 << 20, seed: int = 0) -> None:
        if self.scheme is None:
            return
        self.observer = ActivationObserver(self.scheme, reservoir_size=reservoir_size, seed=seed)
        self.mode = "observe"

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn observed statistics into qparams and switch to quantizing."""
        if self.scheme is None:
            return
        if self.observer is None or self.observer.batches == 0:
            raise RuntimeError(f"activation quantizer {self.name!r} saw no calibration data")
        s, z = self.observer.qparams()
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.calibrated.fill_(True)
        self._is_calibrated = True
        self.observer = None
        self.mode = "quant"

    # ---- LSQ: learned step size ----------------------------------------------------------------
    def make_scale_learnable(self) -> nn.Parameter:
        if self.scheme is None or not self._is_calibrated:
            raise RuntimeError(f"activation quantizer {self.name!r} must be calibrated before learning its scale")
        p = nn.Parameter(self.scale.detach().clone())
        del self._buffers["scale"]
        self.scale = p
        return p

    @torch.no_grad()
    def freeze_scale(self) -> None:
        if isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone().clamp_min(1e-8)
            del self._parameters["scale"]
            self.register_buffer("scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme is None or self.mode == "fp":
            return x
        if self.mode == "observe":
            self.observer.update(x, self.name)
            return x
        if not self._is_calibrated:
            raise RuntimeError(
                f"activation quantizer {self.name!r} is not calibrated; calibrate the model first "
                f"(diffquant.calibrate / a PTQ algorithm) or load a calibrated checkpoint"
            )
        scale = self.scale.to(x.dtype)
        if self.scheme.dtype == "fp8_e4m3":
            return fake_quantize_fp8(x, scale)
        if not self.scale.requires_grad:  # fused single-pass kernel; same values
            return fake_quantize_fused(x, self.scale, self.zero_point, self.scheme.bits, self.scheme.symmetric)
        return fake_quantize(x, scale, self.zero_point.to(x.dtype), self.scheme.bits, self.scheme.symmetric)
