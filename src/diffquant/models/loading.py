"""Resolve a MODEL argument: ``zoo:NAME``, a local diffusers model/pipeline folder, a saved
diffquant quantized folder, or a hub id (only when online).

Weights are read from safetensors only; ``.bin``/``.ckpt`` pickles are never loaded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class LoadedModel:
    model: nn.Module
    scheduler: Any
    source: dict[str, Any] = field(default_factory=dict)  # how to load the base model again
    quantized: bool = False


def _unet_class(name: str):
    import diffusers

    if name not in SUPPORTED_UNETS:
        raise ValueError(f"model class {name!r} is not supported; supported: {', '.join(SUPPORTED_UNETS)}")
    return getattr(diffusers, name)


def _default_scheduler():
    from diffusers import DDPMScheduler

    from diffquant.models.configs import DDPM_SCHEDULER

    return DDPMScheduler(**DDPM_SCHEDULER)


def _scheduler_from_folder(folder: Path):
    import diffusers

    cfg_path = folder / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cls_name = cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise ValueError(f"{cfg_path}: unknown scheduler class {cls_name!r}")
    return cls.from_config(cfg)


def _load_model_folder(folder: Path, device: Any) -> nn.Module:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cls = _unet_class(cfg.get("_class_name", "UNet2DModel"))
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder} has no .safetensors weights; diffquant never unpickles .bin/.ckpt files "
            f"(convert them to safetensors with a tool you trust)"
        )
    return cls.from_pretrained(str(folder), use_safetensors=True).to(device).eval()


def load_local(path: Path, device: Any = "cpu") -> LoadedModel:
    if (path / "diffquant.json").is_file():
        from diffquant.io import load_quantized

        return load_quantized(path, device=device)
    if (path / "model_index.json").is_file():  # a pipeline folder
        if not (path / "unet").is_dir():
            raise ValueError(f"pipeline folder {path} has no 'unet' subfolder")
        model = _load_model_folder(path / "unet", device)
        sched = _scheduler_from_folder(path / "scheduler") if (path / "scheduler").is_dir() else _default_scheduler()
        return LoadedModel(model, sched, {"kind": "path", "path": str(path.resolve())})
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file() and \
            "class" in json.loads((path / "config.json").read_text()):  # a diffquant zoo folder (bundled weights)
        from diffquant.zoo.bundle import load_bundled_unet

        model, sched = load_bundled_unet(path)
        return LoadedModel(model.to(device), sched, {"kind": "path", "path": str(path.resolve())})
    if (path / "config.json").is_file():
        model = _load_model_folder(path, device)
        if (path / "scheduler_config.json").is_file():
            sched = _scheduler_from_folder(path)
        elif (path.parent / "scheduler" / "scheduler_config.json").is_file():
            sched = _scheduler_from_folder(path.parent / "scheduler")
        else:
            log.warning("%s has no scheduler config; using the DDPM linear schedule (1e-4..0.02, 1000 steps)", path)
            sched = _default_scheduler()
        return LoadedModel(model, sched, {"kind": "path", "path": str(path.resolve())})
    raise ValueError(
        f"{path} is not a diffusers model folder (config.json), pipeline folder (model_index.json), "
        f"diffquant zoo folder (config.json + model.safetensors) or diffquant quantized folder (diffquant.json)"
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return True


def load_hub(repo_id: str, device: Any = "cpu", probe_timeout: float = 5.0) -> LoadedModel:
    import diffusers

    try:
        if not _hub_offline():
            # fail in seconds, not after the download client's long retries, when the hub is unreachable
            from huggingface_hub import HfApi

            HfApi().model_info(repo_id, timeout=probe_timeout)
        try:
            model = diffusers.UNet2DModel.from_pretrained(repo_id, subfolder="unet", use_safetensors=True)
        except (OSError, EnvironmentError):
            model = diffusers.UNet2DModel.from_pretrained(repo_id, use_safetensors=True)
        # the scheduler class named by the repo's config (e.g. CMStochasticIterativeScheduler for
        # openai/diffusers-cd_imagenet64_l2), DDPMScheduler when it names none
        sconf = diffusers.DDPMScheduler.load_config(repo_id, subfolder="scheduler")
        cls_name = sconf.get("_class_name", "DDPMScheduler")
        cls = getattr(diffusers, cls_name, None)
        if cls is None or not cls_name.endswith("Scheduler"):
            raise ValueError(f"unknown scheduler class {cls_name!r}")
        sched = cls.from_config(sconf)
    except Exception as e:  # network errors come in many types
        raise ValueError(
            f"could not load {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Offline? Use a local folder, or zoo:NAME (available: see `diffquant zoo`)"
        ) from e
    return LoadedModel(model.to(device).eval(), sched, {"kind": "hub", "repo_id": repo_id})


def load_model(spec: str, device: Any = "cpu") -> LoadedModel:
    """Resolve a MODEL argument (see module docstring)."""
    if spec.startswith("zoo:"):
        from diffquant import zoo

        zm = zoo.load(spec[4:], device=device)
        if zm.scheduler is None:
            raise ValueError(f"zoo:{zm.name} is a {zm.kind}, not a diffusion model")
        return LoadedModel(zm.model, zm.scheduler, {"kind": "zoo", "name": zm.name})
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"MODEL {spec!r} is a file; pass a model folder, a pipeline folder, or zoo:NAME")
        return load_local(path, device)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return load_hub(spec, device)
    raise ValueError(f"MODEL {spec!r}: no such folder; expected zoo:NAME, a local folder, or a hub id 'org/name'")


def rebuild_base(source: dict[str, Any], model_config: dict[str, Any], device: Any = "cpu") -> nn.Module:
    """An un-initialised model of the recorded class/config (weights come from a checkpoint)."""
    cls = _unet_class(model_config.get("_class_name", "UNet2DModel"))
    cfg = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(cfg)
    if any(m._non_persistent_buffers_set for m in model.modules()):
        # such buffers are not in a state dict: build the model for real so they are initialised
        return cls.from_config(cfg).to(device).eval()
    return model.to_empty(device=device).eval()


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"cannot save a {type(model).__name__}: it has no diffusers config")
    d = dict(cfg)
    d["_class_name"] = type(model).__name__
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def scheduler_config_dict(scheduler: Any) -> Optional[dict[str, Any]]:
    if scheduler is None:
        return None
    d = dict(scheduler.config)
    d["_class_name"] = type(scheduler).__name__
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
