"""Turning training results into bundled zoo entries, and helpers shared by the zoo's scripts.

* :func:`bundle_ddpm` — EMA weights of a DDPM training state (full, compact or an EMA snapshot) to
  ``OUT/model.safetensors`` (fp16) + ``OUT/config.json`` (UNet2DModel config) +
  ``OUT/scheduler_config.json`` (+ ``card.json``).
* :func:`classifier_stats` — feature mean/covariance (float64) of uint8 images through the
  feature network, as :class:`diffquant.evaluation.fid.FeatureStats`.
* :func:`image_grid` — a uint8 (N, H, W, 3) batch as one grid image (PIL).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def bundle_ddpm(state_folder: str | Path, out: str | Path, which: str = "ema", card: dict | None = None) -> Path:
    """Write the ``which`` ("ema" or "model") weights of a training state as a zoo folder."""
    from safetensors.torch import save_file

    from diffquant.zoo.checkpoint import load_state

    tensors, doc = load_state(state_folder)
    prefix = f"{which}."
    sd = {k[len(prefix):]: v.to(torch.float16).contiguous() for k, v in tensors.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{state_folder}: no {which!r} weights in this checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt", "dtype": "float16", "weights": which,
                                                             "step": str(doc.get("step"))})
    unet = dict(doc["unet_config"])
    (out / "config.json").write_text(json.dumps({"class": "UNet2DModel", **unet}, indent=2) + "\n")
    (out / "scheduler_config.json").write_text(
        json.dumps({"class": "DDPMScheduler", **_jsonable(doc["scheduler_config"])}, indent=2) + "\n")
    if card is not None:
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


BUNDLED_SCHEDULERS = ("DDPMScheduler", "CMStochasticIterativeScheduler")


def load_bundled_unet(folder: str | Path):
    """(UNet2DModel in fp32, scheduler) from a folder written by :func:`bundle_ddpm` or
    :func:`diffquant.zoo.train_cm.bundle_cm`: the scheduler's class is the ``class`` key of
    scheduler_config.json (DDPMScheduler when absent)."""
    import diffusers
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", "scheduler_config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"zoo folder {str(folder)!r} lacks {name}")
    conf = json.loads((folder / "config.json").read_text())
    if conf.pop("class", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{folder}/config.json: not a UNet2DModel config")
    conf = {k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()}
    model = UNet2DModel(**conf)
    sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(sd)
    sconf = json.loads((folder / "scheduler_config.json").read_text())
    cls = sconf.pop("class", "DDPMScheduler")
    if cls not in BUNDLED_SCHEDULERS:
        raise ValueError(f"{folder}/scheduler_config.json: scheduler class {cls!r} is not one of {BUNDLED_SCHEDULERS}")
    return model.eval(), getattr(diffusers, cls)(**sconf)


@torch.no_grad()
def classifier_features(model, images_u8: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 1000) -> np.ndarray:
    """float64 (N, D) features of uint8 (N, H, W, 3) images, computed in fp32 (no autocast, no TF32)."""
    from diffquant.zoo.classifier import to_float_nchw

    dev = torch.device(device)
    model = model.to(dev).eval()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs = []
        for lo in range(0, images_u8.shape[0], batch_size):
            x = to_float_nchw(torch.from_numpy(np.ascontiguousarray(images_u8[lo : lo + batch_size])).to(dev))
            outs.append(model.features(x).double().cpu())
        return torch.cat(outs).numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def classifier_stats(model, images_u8: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 1000):
    from diffquant.evaluation.fid import statistics_from_features

    return statistics_from_features(classifier_features(model, images_u8, device, batch_size))


def image_grid(images: np.ndarray, nrow: int = 10, pad: int = 2, scale: int = 1):
    """A PIL image of uint8 (N, H, W, 3) images in rows of ``nrow``, ``pad`` white pixels apart."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    im = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im
