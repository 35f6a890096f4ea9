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


# openai/diffusers-cd_imagenet64_l2 (consistency distillation, ImageNet 64x64, class-conditional; 295.9M parameters
# with diffusers 0.42): the UNet2DModel config of the hub checkpoint's unet/config.json. Keys equal to
# UNet2DModel's defaults are written out too, so that the architecture does not change with diffusers' defaults.
CD_IMAGENET64_L2 = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(192, 384, 576, 768),
    layers_per_block=3,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="resnet",
    upsample_type="resnet",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=64,
    norm_num_groups=32,
    attn_norm_num_groups=32,
    norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=1000,
)

# Its scheduler (CMStochasticIterativeScheduler): Karras sigmas 0.002..80 (rho 7) on N = 40 points, sigma_data 0.5.
CD_IMAGENET64_SCHEDULER = dict(
    num_train_timesteps=40,
    sigma_min=0.002,
    sigma_max=80.0,
    sigma_data=0.5,
    s_noise=1.0,
    rho=7.0,
    clip_denoised=True,
)

# zoo:cifar10-cm: the consistency model distilled from zoo:cifar10-ddpm (diffquant.zoo.train_cm) keeps the
# teacher's UNet layout (ZOO_CIFAR10_DDPM) and samples through CMStochasticIterativeScheduler with the CIFAR-10
# setting of the consistency-model paper: N = 18 Karras sigmas over 0.002..80 (inside the teacher's VP range
# sigma = sqrt((1 - abar) / abar), about 0.01..157 for the linear betas), sigma_data 0.5.
ZOO_CIFAR10_CM_SCHEDULER = dict(CD_IMAGENET64_SCHEDULER, num_train_timesteps=18)


def cm_scheduler(config: dict | None = None):
    """A diffusers CMStochasticIterativeScheduler (default: the zoo:cifar10-cm setting)."""
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(**(ZOO_CIFAR10_CM_SCHEDULER if config is None else config))


def cd_imagenet64_config(base_channels: int = 192, sample_size: int = 64, head_dim: int | None = None) -> dict:
    """The openai/diffusers-cd_imagenet64_l2 layout at another width (block_out_channels = base x (1, 2, 3, 4);
    attention heads of ``head_dim`` channels, default min(64, base)) — for tests at reduced size. The
    defaults give :data:`CD_IMAGENET64_L2` exactly."""
    if base_channels < 1 or base_channels % 32:
        raise ValueError(f"base_channels={base_channels} must be a positive multiple of 32 (GroupNorm of 32 groups)")
    head_dim = head_dim or min(64, base_channels)
    widths = tuple(base_channels * m for m in (1, 2, 3, 4))
    if any(w % head_dim for w in widths[1:]):
        raise ValueError(f"head_dim={head_dim} must divide the attention widths {widths[1:]}")
    return dict(CD_IMAGENET64_L2, block_out_channels=widths, sample_size=sample_size, attention_head_dim=head_dim)
