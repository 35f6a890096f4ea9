"""The feature network behind ``fd_cifar``: a small ResNet trained on CIFAR-10-JPEG.

``CifarResNet`` is a ResNet-9-style classifier (three stages, each a 3x3 conv + max-pool, with a
residual pair of 3x3 convs in stages 1 and 3; BatchNorm + GELU). Input convention: float NCHW in
[0, 1]; the normalisation (CIFAR-10-JPEG train mean/std) happens inside the model.

* ``forward(x) -> logits`` (N, 10)
* ``features(x) -> (N, D)``: the globally max-pooled output of the last stage, D = widths[-1]
  (512 for the bundled model). This is the feature space of ``fd_cifar``.

The training recipe (:func:`train_classifier`, ``diffquant train classifier``): SGD with Nesterov
momentum, one-cycle learning rate (linear warm-up then linear decay to 0), label smoothing,
random crops (reflect-padded by 4) + horizontal flips + cutout, bf16 autocast and channels_last on
CUDA. Data augmentation runs on the device on uint8 tensors: no torchvision, no data loader.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Per-channel mean / std of the CIFAR-10-JPEG train split (50,000 images, pixels in [0, 1]),
# measured with `diffquant data info .data/cifar10-jpeg-train.npz`.
CIFAR10_JPEG_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR10_JPEG_STD = (0.2452, 0.2419, 0.2602)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.res = nn.Sequential(_conv_bn(cout, cout), _conv_bn(cout, cout)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn(F.max_pool2d(self.conv(x), 2)))
        if self.res is not None:
            x = x + self.res(x)
        return x


class CifarResNet(nn.Module):
    """ResNet-9-style CIFAR classifier with ``features(x)`` for Fréchet distances."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        residual: Sequence[bool] = (True, False, True),
        num_classes: int = 10,
        logit_scale: float = 0.125,
        mean: Sequence[float] = CIFAR10_JPEG_MEAN,
        std: Sequence[float] = CIFAR10_JPEG_STD,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(residual) != 3:
            raise ValueError(f"widths needs 4 entries (stem + 3 stages) and residual 3; got {widths}, {residual}")
        self.config = dict(
            widths=list(widths), residual=list(residual), num_classes=num_classes,
            logit_scale=logit_scale, mean=list(mean), std=list(std),
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.stem = _conv_bn(3, widths[0])
        self.stages = nn.Sequential(*(_Stage(widths[i], widths[i + 1], residual[i]) for i in range(3)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @property
    def feature_dim(self) -> int:
        return int(self.config["widths"][-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, D) features (global max pool of the last stage)."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.stages(self.stem(x))
        return torch.amax(x, dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.logit_scale


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class ClassifierTrainConfig:
    epochs: int = 70
    batch_size: int = 512
    lr: float = 0.4
    warmup_frac: float = 0.15
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    crop_pad: int = 4
    cutout: int = 8
    seed: int = 0
    widths: list = field(default_factory=lambda: [64, 128, 256, 512])
    eval_batch_size: int = 1000


def augment(x: torch.Tensor, g: torch.Generator, pad: int, cutout: int) -> torch.Tensor:
    """Random crop (reflect pad), horizontal flip and cutout on a float NCHW batch, on its device."""
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
        xp = torch.gather(xp, 2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = torch.gather(xp, 3, cols)
    flip = torch.rand(n, generator=g, device=dev) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=g, device=dev)
        cx = torch.randint(0, w, (n,), generator=g, device=dev)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        m = ((ys - cy.view(n, 1, 1)).abs() <= cutout // 2) & ((xs - cx.view(n, 1, 1)).abs() <= cutout // 2)
        x = x.masked_fill(m.unsqueeze(1), 0.0)
    return x


def to_float_nchw(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict(model: CifarResNet, images_u8: torch.Tensor, batch_size: int = 1000, amp: bool | None = None,
            what: str = "logits") -> torch.Tensor:
    """Logits or features of uint8 (N, H, W, C) images (a tensor on the model's device), in fp32."""
    dev = next(model.parameters()).device
    amp = (dev.type == "cuda") if amp is None else amp
    was_training = model.training
    model.eval()
    outs = []
    for lo in range(0, images_u8.shape[0], batch_size):
        x = to_float_nchw(images_u8[lo : lo + batch_size].to(dev, non_blocking=True))
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            y = model.features(x) if what == "features" else model(x)
        outs.append(y.float())
    model.train(was_training)
    return torch.cat(outs)


def accuracy(model: CifarResNet, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    logits = predict(model, images_u8, batch_size)
    return float((logits.argmax(1).cpu() == labels.cpu()).float().mean())


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    cfg: ClassifierTrainConfig,
    device: str | torch.device = "cpu",
    test: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[CifarResNet, list[dict]]:
    """Train a :class:`CifarResNet` on uint8 (N, H, W, 3) images; returns (model, per-epoch log)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = CifarResNet(widths=cfg.widths).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
    )
    x_all = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)
    y_all = torch.from_numpy(np.asarray(train_labels, dtype=np.int64)).to(device)
    n = x_all.shape[0]
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (0.1 + 0.9 * step / warm)
        return cfg.lr * max(0.0, (total - step) / max(1, total - warm))

    g = torch.Generator(device=device).manual_seed(cfg.seed)
    gperm = torch.Generator().manual_seed(cfg.seed)
    history = []
    step = 0
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gperm).to(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for k in range(steps_per_epoch):
            idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            x = augment(to_float_nchw(x_all[idx]), g, cfg.crop_pad, cfg.cutout)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / steps_per_epoch,
            "seconds": round(dt, 3),
            "images_per_s": round(steps_per_epoch * cfg.batch_size / dt, 1),
            "elapsed_s": round(time.perf_counter() - t_start, 2),
        }
        if test is not None and (epoch + 1 == cfg.epochs or (epoch + 1) % 5 == 0):
            rec["test_acc"] = accuracy(model, torch.from_numpy(test[0]).to(device), torch.from_numpy(test[1]))
        history.append(rec)
        log.info("classifier %s", json.dumps(rec))
        if on_epoch is not None:
            on_epoch(rec)
    return model.to(memory_format=torch.contiguous_format).eval(), history


def save_classifier(model: CifarResNet, folder: str | Path, card: dict | None = None) -> Path:
    """Write ``model.safetensors`` (fp16) + ``config.json`` (+ ``card.json``) to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt", "dtype": "float16"})
    (folder / "config.json").write_text(json.dumps({"class": "CifarResNet", **model.config}, indent=2) + "\n")
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> CifarResNet:
    """Build a :class:`CifarResNet` from ``config.json`` + ``model.safetensors`` (weights cast to fp32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"classifier folder {str(folder)!r} lacks {p.name}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("class", "CifarResNet") != "CifarResNet":
        raise ValueError(f"{cfg_path}: not a CifarResNet config")
    model = CifarResNet(**cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(w_path)).items()}
    model.load_state_dict(sd)
    return model.to(device).eval()


def config_dict(cfg: ClassifierTrainConfig) -> dict:
    return asdict(cfg)


if __name__ == "__main__":  # python -m diffquant.zoo.classifier ...  (same as `diffquant train classifier`)
    from diffquant.commands.train import classifier as _cli

    _cli(prog_name="python -m diffquant.zoo.classifier")
