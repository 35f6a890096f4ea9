"""Image-quality evaluation of sample sets.

* :mod:`~diffquant.evaluation.fid` — :class:`FeatureStats` (mean, covariance, n; ``.npz``) and
  :func:`frechet_distance` ("statistics" and "distance" kept apart).
* :mod:`~diffquant.evaluation.features` — :class:`FeatureExtractor` protocol,
  :class:`TorchFeatureExtractor`, named feature spaces (``cifar10-features``, ``inception``),
  bundled reference statistics, cached features of the CIFAR-10-JPEG splits.
* :mod:`~diffquant.evaluation.inception` — the FID Inception-v3 network (pytorch-fid layout,
  weights from a local file only).
* :mod:`~diffquant.evaluation.metrics` — KID, Inception Score, precision/recall.
* :mod:`~diffquant.evaluation.fidelity` — paired MSE/PSNR/SSIM and per-time-step noise error.
* :mod:`~diffquant.evaluation.suite` — named metrics (``fd_cifar``, ``kid_cifar``, ``pr_cifar``,
  ``is_cifar``, ``fid``, ``kid``, ``pr``, ``is``) with references and the real-data floor.

Submodules that need torch-heavy pieces are imported lazily by their users; this package only
re-exports the light, most used names.
"""
from diffquant.evaluation.fid import FeatureStats, fd_from_features, frechet_distance, statistics_from_features

__all__ = ["FeatureStats", "fd_from_features", "frechet_distance", "statistics_from_features"]
