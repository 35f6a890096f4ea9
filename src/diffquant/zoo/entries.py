"""Registered zoo entries. Each function builds one ZooModel.

Trained entries are registered only when their bundled files exist (``weights/<name>/``), so that
``available()`` lists what can actually be loaded:

* ``cifar10-ddpm`` — DDPM UNet2DModel (google/ddpm-cifar10-32 layout at widths 64/128/128/128,
  ~9M parameters), EMA weights in fp16, trained on CIFAR-10-JPEG; card in docs/zoo/cifar10-ddpm.md.
* ``cifar10-cm`` — a consistency model distilled from ``cifar10-ddpm`` (:mod:`diffquant.zoo.train_cm`), the
  teacher's UNet layout with a CMStochasticIterativeScheduler (1-, 2-, 4-, 8-step sampling through the ``cm``
  sampler); EMA weights in fp16; card in docs/zoo/cifar10-cm.md.
* ``cifar10-features`` — the fd_cifar feature network (:class:`~diffquant.zoo.classifier.CifarResNet`,
  256-d features, fp16 weights), trained on CIFAR-10-JPEG; card in docs/zoo/cifar10-features.md.
"""
from __future__ import annotations

import json

import torch

from diffquant.zoo import WEIGHTS_DIR, ZooModel, register

TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,
)


@register("tiny-random")
def tiny_random() -> ZooModel:
    from diffusers import DDPMScheduler, UNet2DModel

    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(0)
        model = UNet2DModel(**TINY_UNET_CONFIG)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    card = {"name": "tiny-random", "note": "random weights from seed 0; for demos/tests before trained weights exist"}
    return ZooModel("tiny-random", "random", model, sched, card, None)


def _card(folder) -> dict:
    p = folder / "card.json"
    return json.loads(p.read_text()) if p.is_file() else {}


if (WEIGHTS_DIR / "cifar10-ddpm" / "model.safetensors").is_file():

    @register("cifar10-ddpm")
    def cifar10_ddpm() -> ZooModel:
        from diffquant.zoo.bundle import load_bundled_unet

        folder = WEIGHTS_DIR / "cifar10-ddpm"
        model, sched = load_bundled_unet(folder)
        return ZooModel("cifar10-ddpm", "ddpm", model, sched, _card(folder), folder)


if (WEIGHTS_DIR / "cifar10-cm" / "model.safetensors").is_file():

    @register("cifar10-cm")
    def cifar10_cm() -> ZooModel:
        from diffquant.zoo.bundle import load_bundled_unet

        folder = WEIGHTS_DIR / "cifar10-cm"
        model, sched = load_bundled_unet(folder)
        return ZooModel("cifar10-cm", "cm", model, sched, _card(folder), folder)


if (WEIGHTS_DIR / "cifar10-features" / "model.safetensors").is_file():

    @register("cifar10-features")
    def cifar10_features() -> ZooModel:
        from diffquant.zoo.classifier import load_classifier

        folder = WEIGHTS_DIR / "cifar10-features"
        return ZooModel("cifar10-features", "classifier", load_classifier(folder), None, _card(folder), folder)
