"""Image-quality evaluation: feature statistics and Fréchet distance, KID, IS, precision/recall,
paired fidelity (MSE/PSNR/SSIM) against full precision."""
from diffquant.evaluation.fid import FeatureStats, fd_from_features, frechet_distance, statistics_from_features

__all__ = ["FeatureStats", "fd_from_features", "frechet_distance", "statistics_from_features"]
