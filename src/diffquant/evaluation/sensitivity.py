"""Time-step sensitivity: which sampling steps suffer most from quantization.

The full-precision model samples; at every step both models see the same input ``x_t`` and the
error of the quantized model's noise prediction is accumulated per time step (running sums, so
memory does not grow with the number of samples)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffquant.evaluation.fidelity import TimestepErrorAccumulator
from diffquant.models.adapter import call_model
from diffquant.sampling.samplers import SamplerSpec, sample


@torch.no_grad()
def timestep_sensitivity(fp_model: nn.Module, q_model: nn.Module, scheduler: Any, *, num: int = 16, seed: int = 0,
                         spec: SamplerSpec = SamplerSpec("ddim", 20), batch_size: int = 16, device: Any = None,
                         progress: bool = False) -> list[dict]:
    """Per-time-step error of ``q_model``'s prediction on the FP trajectory: rows ``t, mse, rel_err, sqnr_db, n``."""
    acc = TimestepErrorAccumulator()

    def tap(k: int, t: Any, x: torch.Tensor, cond: dict) -> None:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if float(t).is_integer() else torch.float32)
        acc.update(int(round(float(t))), call_model(fp_model, x, tt, cond), call_model(q_model, x, tt, cond))

    sample(fp_model, scheduler, num=num, seed=seed, spec=spec, batch_size=batch_size, device=device,
           callback=tap, progress=progress)
    return acc.summary()
