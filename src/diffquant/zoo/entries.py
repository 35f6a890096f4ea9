"""Registered zoo entries. Each function builds one ZooModel."""
from __future__ import annotations

import torch

from diffquant.zoo import ZooModel, register

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
