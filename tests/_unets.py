"""The small UNet2DModel layout the unit tests share: two levels (16, 32 channels), one self-attention level,
one layer per block. Tests that need another size pass ``sample_size`` / ``in_channels``."""


def tiny_unet_config(sample_size: int = 8, in_channels: int = 3) -> dict:
    return dict(sample_size=sample_size, in_channels=in_channels, out_channels=3, layers_per_block=1,
                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def tiny_sd_unet():
    """A two-level text-to-image UNet (cross-attention at the first level, 16-dim context), eval mode, seed 0."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
