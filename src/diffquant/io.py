"""Quantized checkpoints: a folder with safetensors + JSON, never pickle.

Two formats share one layout. ``diffquant-packed/1`` (the default) stores every quantized weight as
its integer codes packed at the bit-width (2-bit four per byte, 3/4-bit two per byte, 5..8-bit one
per byte; FP8 weights as float8_e4m3 values) next to its fp32 per-channel scales/zero points; biases,
norms and layers left in floating point keep their dtype. ``diffquant-fakequant/1`` stores the float
weights. Loading either gives a model whose outputs equal the calibrated model's bit for bit.

Layout::

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
PACKED_FORMAT = "diffquant-packed/1"
FORMATS = (FORMAT, PACKED_FORMAT)


def _weight_slices(layer):
    """(quantizer attribute name, quantizer, slice of the input dim or None) of a quantized layer."""
    if layer.split is None:
        return [("weight_quantizer", layer.weight_quantizer, None)]
    s = layer.split
    return [("weight_quantizer", layer.weight_quantizer, (0, s)),
            ("weight_quantizer_b", layer.weight_quantizer_b, (s, layer.weight.shape[1]))]


@torch.no_grad()
def _pack_weights(model: nn.Module, state: dict, only: Optional[set] = None) -> dict:
    """Replace float weights in ``state`` by packed codes; returns the manifest entry.
    ``only``: pack just these layers (by module name), leave the others' float weights alone."""
    from diffquant.nn.modules import QUANT_LAYER_TYPES
    from diffquant.quant.affine import FP8_E4M3_MAX, group_view, qrange, quantize
    from diffquant.quant.packing import pack

    packed = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYER_TYPES) or (only is not None and name not in only):
            continue
        parts = _weight_slices(layer)
        if not all(wq.enabled for _, wq, _ in parts):
            continue
        entries = []
        for attr, wq, sl in parts:
            w = layer.weight if sl is None else layer.weight[:, sl[0]:sl[1]]
            sch = wq.scheme
            g = group_view(w.detach().float(), sch)
            key = f"{name}.{attr}.codes"
            if sch.dtype == "int":
                qmin, _ = qrange(sch.bits, sch.symmetric)
                q = quantize(g, wq.scale, wq.zero_point, sch.bits, sch.symmetric) - qmin
                state[key] = pack(q.to(torch.int32), sch.bits)
            else:
                state[key] = torch.clamp(g * (1.0 / wq.scale), -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
            entries.append({"quantizer": attr, "slice": sl, "shape": list(w.shape), "numel": w.numel(),
                            "bits": sch.bits, "dtype": sch.dtype})
        packed[name] = {"weight_dtype": str(layer.weight.dtype).replace("torch.", ""), "parts": entries}
        del state[f"{name}.weight"]
    return packed


@torch.no_grad()
def _unpack_weights(model: nn.Module, state: dict, packed: dict) -> None:
    from diffquant.quant.affine import dequantize, qrange
    from diffquant.quant.packing import unpack

    for name, info in packed.items():
        layer = model.get_submodule(name)
        pieces = []
        for part in info["parts"]:
            wq = getattr(layer, part["quantizer"])
            scale = state[f"{name}.{part['quantizer']}.scale"]
            zp = state[f"{name}.{part['quantizer']}.zero_point"]
            codes = state.pop(f"{name}.{part['quantizer']}.codes")
            if part["dtype"] == "int":
                qmin, _ = qrange(part["bits"], wq.scheme.symmetric)
                q = unpack(codes, part["bits"], part["numel"]).to(torch.float32) + qmin
                w = dequantize(q.reshape(scale.shape[0], -1), scale, zp)
            else:
                w = codes.to(torch.float32).reshape(scale.shape[0], -1) * scale
            pieces.append(w.reshape(part["shape"]))
        w = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        state[f"{name}.weight"] = w.to(getattr(torch, info["weight_dtype"]))


def save_quantized(model: nn.Module, out_dir: str | Path, scheduler: Any = None, source: Optional[dict] = None,
                   extra: Optional[dict] = None, packed: bool = True) -> Path:
    from safetensors.torch import save_file

    from diffquant.models.loading import model_config_dict, scheduler_config_dict

    cfg = getattr(model, "_diffquant_config", None)
    if cfg is None:
        raise ValueError("model is not quantized (no diffquant config attached); call diffquant.quantize first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fmt = PACKED_FORMAT if packed else FORMAT
    packed_info = _pack_weights(model, state) if packed else {}
    save_file(state, str(out / "model.safetensors"), metadata={"format": fmt})
    (out / "model_config.json").write_text(json.dumps(model_config_dict(model), indent=2))
    sc = scheduler_config_dict(scheduler)
    if sc is not None:
        (out / "scheduler_config.json").write_text(json.dumps(sc, indent=2))
    cfg.to_json(out / "quant_config.json")
    manifest = {
        "format": fmt,
        "packed": packed_info,
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
    if manifest.get("format") not in FORMATS:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r} is not supported; expected one of {FORMATS}")
    base = rebuild_base(manifest.get("source", {}), model_cfg, device="cpu")
    model = quantize(base, qcfg, inplace=True, split_points=manifest.get("splits", {}), init_weights=False)
    state = load_file(str(path / "model.safetensors"))
    try:
        _unpack_weights(model, state, manifest.get("packed") or {})
    except (KeyError, AttributeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: checkpoint does not match its quantization config/model (packed weights: {e})") from e
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
