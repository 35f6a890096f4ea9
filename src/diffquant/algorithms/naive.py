"""Naive post-training quantization (the "linear quantization" baseline of the papers).

Weights: per-channel (or per-tensor/group) ranges from min-max or the Lp clipping search, then
round-to-nearest. Activations: one range per tensor from the calibration data (min-max, EMA,
percentile or Lp search), observed on full-precision activations with quantized weights.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch import nn

from diffquant.calibration.capture import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.models.adapter import call_model
from diffquant.quantize import calibrate, quantize

log = logging.getLogger(__name__)


@torch.no_grad()
def naive_ptq(
    model: nn.Module,
    config: QuantConfig,
    calib: Optional[CalibrationSet],
    *,
    batch_size: int = 32,
    max_batches: Optional[int] = None,
    device: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` (a copy) and calibrate its activation quantizers on ``calib``."""
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    q = quantize(model, config)
    q.to(device).eval()
    if config.act is None and config.attention_scheme is None and config.softmax_bits >= 16:
        log.info("naive PTQ: weights only, no activation calibration needed")
    else:
        if calib is None or len(calib) == 0:
            raise ValueError("activation quantization needs calibration data (a non-empty CalibrationSet)")
        batches = list(calib.batches(batch_size, shuffle=True, seed=seed))
        if max_batches is not None:
            batches = batches[:max_batches]
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="naive calibration", unit="batch", leave=False)
        with calibrate(q, seed=seed):
            for x, t, cond in it:
                call_model(q, x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
    q._diffquant_method = {"method": "naive", "calib_seconds": time.perf_counter() - t0}  # type: ignore[attr-defined]
    return q
