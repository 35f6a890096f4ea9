"""Model configurations of real hub checkpoints, for building same-shaped models with random
weights (no network needed) and for the zoo's reference models."""
from __future__ import annotations

# google/ddpm-cifar10-32 (35.7M parameters): the UNet2DModel config of the hub checkpoint.
DDPM_CIFAR10_32 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
)

# The zoo's reference DDPM: the same block layout at a quarter of the width (~9M parameters).
ZOO_CIFAR10_DDPM = dict(DDPM_CIFAR10_32, block_out_channels=(64, 128, 128, 128))

# Scheduler of google/ddpm-cifar10-32 (linear betas 1e-4..0.02, 1000 steps, epsilon prediction).
DDPM_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=True,
)


def build_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel from ``config`` with weights drawn from ``seed``."""
    import torch
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config)
