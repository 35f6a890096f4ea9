"""How diffquant calls a denoiser: diffusers UNet2DModel / UNet2DConditionModel, or any module
with the same call shape ``model(sample, timestep, ...)`` returning a tensor or an object
with ``.sample``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int
    sample_size: int
    num_classes: Optional[int] = None  # class-conditional UNet2DModel (class_labels)
    cross_attention_dim: Optional[int] = None  # UNet2DConditionModel (encoder_hidden_states)
    context_len: int = 77


def model_spec(model: nn.Module) -> ModelSpec:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(
            f"cannot infer the input shape of a {type(model).__name__} without a diffusers-style `config`; "
            f"pass example inputs explicitly"
        )
    size = cfg.get("sample_size") if hasattr(cfg, "get") else getattr(cfg, "sample_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    num_classes = None
    if getattr(cfg, "num_class_embeds", None):
        num_classes = int(cfg.num_class_embeds)
    xdim = getattr(cfg, "cross_attention_dim", None)
    if isinstance(xdim, (tuple, list)):
        xdim = xdim[0]
    return ModelSpec(int(cfg.in_channels), int(size), num_classes, int(xdim) if xdim else None)


def example_inputs(model: nn.Module, batch: int = 1, device: Any = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sample, timestep, conditioning kwargs) of the right shapes for one forward pass."""
    spec = model_spec(model)
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.sample_size, spec.sample_size, generator=g).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    cond: dict[str, torch.Tensor] = {}
    if spec.num_classes:
        cond["class_labels"] = torch.randint(spec.num_classes, (batch,), generator=g).to(device)
    if spec.cross_attention_dim:
        cond["encoder_hidden_states"] = torch.randn(batch, spec.context_len, spec.cross_attention_dim, generator=g).to(device)
    return x, t, cond


def call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
    """Run a denoiser and return its output tensor."""
    cond = cond or {}
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    out = model(x, t, **cond)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out
