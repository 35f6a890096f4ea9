"""Quantized checkpoints: a folder with safetensors + JSON, never pickle.

Layout (format ``diffquant-fakequant/1``)::

    diffquant.json          format, diffquant version, method, model class, split points, source
    model_config.json       the base model's diffusers config (+ _class_name)
    scheduler_config.json   the scheduler's config (+ _class_name)
    quant_config.json       the QuantConfig
    model.safetensors       state dict: float weights + every quantizer's qparams

The weights are stored in floating point with their qparams ("fake-quant" checkpoint); the
compact packed-integer format is a separate, later format. Loading rebuilds the model from its
config, applies the same quantization structure and loads the state dict strictly: a checkpoint
whose tensors do not match its config is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from diffquant import __version__
from diffquant.config import QuantConfig

FORMAT = "diffquant-fakequant/1"


def save_quantized(model: nn.Module, out_dir: str | Path, scheduler: Any = None, source: Optional[dict] = None,
                   extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    from diffquant.models.loading import model_config_dict, scheduler_config_dict

    cfg = getattr(model, "_diffquant_config", None)
    if cfg is None:
        raise ValueError("model is not quantized (no diffquant config attached); call diffquant.quantize first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    (out / "model_config.json").write_text(json.dumps(model_config_dict(model), indent=2))
    sc = scheduler_config_dict(scheduler)
    if sc is not None:
        (out / "scheduler_config.json").write_text(json.dumps(sc, indent=2))
    cfg.to_json(out / "quant_config.json")
    manifest = {
        "format": FORMAT,
        "diffquant_version": __version__,
        "model_class": type(model).__name__,
        "splits": getattr(model, "_diffquant_splits", {}),
        "method": getattr(model, "_diffquant_method", None),
        "source": source or {},
        "num_tensors": len(state),
        **(extra or {}),
    }
    (out / "diffquant.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_quantized(path: str | Path, device: Any = "cpu"):
    """Load a folder written by :func:`save_quantized` -> ``LoadedModel`` (quantized=True)."""
    from safetensors.torch import load_file

    from diffquant.models.loading import LoadedModel, _scheduler_from_folder, rebuild_base
    from diffquant.quantize import quantize

    path = Path(path)
    man_path = path / "diffquant.json"
    if not man_path.is_file():
        raise ValueError(f"{path} is not a diffquant quantized folder (no diffquant.json)")
    try:
        manifest = json.loads(man_path.read_text())
        model_cfg = json.loads((path / "model_config.json").read_text())
        qcfg = QuantConfig.from_json(path / "quant_config.json")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint metadata: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r} is not supported; expected {FORMAT!r}")
    base = rebuild_base(manifest.get("source", {}), model_cfg, device="cpu")
    model = quantize(base, qcfg, inplace=True, split_points=manifest.get("splits", {}), init_weights=False)
    state = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: checkpoint does not match its quantization config/model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors; "
            f"e.g. {(missing + unexpected + wrong)[:3]})"
        )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    model._diffquant_method = manifest.get("method")  # type: ignore[attr-defined]
    sched = _scheduler_from_folder(path) if (path / "scheduler_config.json").is_file() else None
    return LoadedModel(model, sched, manifest.get("source", {}), quantized=True)
