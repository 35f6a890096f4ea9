"""The bundled zoo models: they load, their forward passes match stored reference values, and
fd_cifar in the feature network's space behaves like a distance (0 for identical statistics,
symmetric, grows as images are degraded).

Regenerate the reference values (only when the bundled weights change on purpose):
    python tests/test_zoo_models.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffquant import zoo

REF = Path(__file__).with_name("test_zoo_reference.json")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
HAVE = set(zoo.available())
needs_ddpm = pytest.mark.skipif("cifar10-ddpm" not in HAVE, reason="zoo:cifar10-ddpm weights not bundled")
needs_cm = pytest.mark.skipif("cifar10-cm" not in HAVE, reason="zoo:cifar10-cm weights not bundled")
needs_features = pytest.mark.skipif("cifar10-features" not in HAVE, reason="zoo:cifar10-features weights not bundled")
IDX = list(range(0, 2 * 3 * 32 * 32, 389))


def _ddpm_values() -> dict:
    zm = zoo.load("zoo:cifar10-ddpm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = zm.model(x, torch.tensor([10, 700])).sample
    flat = out.flatten()
    return {"values": flat[IDX].tolist(), "mean_abs": float(flat.abs().mean())}


def _cm_values() -> dict:
    """The consistency model's raw UNet output at two noise levels (its own time input 250 ln sigma)."""
    zm = zoo.load("zoo:cifar10-cm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([250 * np.log(80.0), 250 * np.log(0.5)], dtype=torch.float32)
    with torch.no_grad():
        out = zm.model(x, t).sample
    flat = out.flatten()
    return {"values": flat[IDX].tolist(), "mean_abs": float(flat.abs().mean())}


def _classifier_values() -> dict:
    zm = zoo.load("zoo:cifar10-features")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = zm.model.features(x)
        logits = zm.model(x)
    return {"logits": logits.tolist(), "features_head": feats[:, :8].tolist(), "features_mean": float(feats.mean())}


def test_registry_lists_trained_models():
    assert "tiny-random" in HAVE
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.load("zoo:nope")


@needs_ddpm
def test_cifar10_ddpm_loads_and_matches_reference():
    zm = zoo.load("zoo:cifar10-ddpm")
    assert zm.kind == "ddpm" and zm.path is not None
    n = sum(p.numel() for p in zm.model.parameters())
    assert 8.5e6 < n < 9.5e6
    assert tuple(zm.model.config.block_out_channels) == (64, 128, 128, 128)
    assert zm.scheduler.config.prediction_type == "epsilon" and zm.scheduler.config.num_train_timesteps == 1000
    assert zm.card.get("name") == "cifar10-ddpm"
    ref = json.loads(REF.read_text())["cifar10-ddpm"]
    got = _ddpm_values()
    np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-3, atol=2e-4)
    assert got["mean_abs"] == pytest.approx(ref["mean_abs"], rel=1e-4)


@needs_cm
def test_cifar10_cm_loads_matches_reference_and_samples_in_one_step():
    from diffquant.sampling.large import sample_fixed
    from diffquant.sampling.samplers import SamplerSpec

    zm = zoo.load("zoo:cifar10-cm")
    assert zm.kind == "cm" and zm.path is not None
    assert type(zm.scheduler).__name__ == "CMStochasticIterativeScheduler"
    n = sum(p.numel() for p in zm.model.parameters())
    assert 2.0e6 < n < 2.5e6  # the quarter-width student (40 MB budget of bundled weights)
    assert zm.card.get("name") == "cifar10-cm" and zm.card["recipe"]["teacher"]["source"] == "zoo:cifar10-ddpm"
    ref = json.loads(REF.read_text())["cifar10-cm"]
    got = _cm_values()
    np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-3, atol=2e-4)
    assert got["mean_abs"] == pytest.approx(ref["mean_abs"], rel=1e-4)
    imgs = sample_fixed(zm.model, zm.scheduler, start=0, stop=4, spec=SamplerSpec("cm", 1), batch_size=4,
                        compute_batch=4)[0]
    assert imgs.shape == (4, 32, 32, 3) and imgs.dtype == np.uint8
    assert imgs.std() > 20  # images, not a constant or noise-free blank


@needs_features
def test_cifar10_features_loads_and_matches_reference():
    zm = zoo.load("zoo:cifar10-features")
    assert zm.kind == "classifier" and zm.scheduler is None
    assert zm.model.feature_dim >= 256
    assert zm.card.get("input_size") == [32, 32]
    ref = json.loads(REF.read_text())["cifar10-features"]
    got = _classifier_values()
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(got["features_head"], ref["features_head"], rtol=1e-3, atol=2e-4)


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Box blur of uint8 NHWC images (separable, edge-padded)."""
    k = 2 * radius + 1
    f = np.pad(x.astype(np.float64), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    c = np.cumsum(np.pad(f, ((0, 0), (1, 0), (0, 0), (0, 0))), axis=1)
    f = (c[:, k:] - c[:, :-k]) / k
    c = np.cumsum(np.pad(f, ((0, 0), (0, 0), (1, 0), (0, 0))), axis=2)
    f = (c[:, :, k:] - c[:, :, :-k]) / k
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


@pytest.fixture
def all_cores():
    """Torch's intra-op threads set to the machine's cores for one test, then put back: earlier test files leave one
    thread set (their tiny models run faster so), and the feature network on 625-image batches is compute-bound (the
    fd_cifar test: 34 s with two threads, 55 s with one, 2-core CI machine, 2026-11-29)."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(n, os.cpu_count() or 1))
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@needs_features
@pytest.mark.skipif(not (SHARED / "test.zip").is_file(), reason="CIFAR-10-JPEG not available")
def test_fd_cifar_is_a_distance_that_grows_with_degradation(all_cores):
    from diffquant.data import read_zip
    from diffquant.evaluation.fid import FeatureStats, frechet_distance, statistics_from_features
    from diffquant.zoo.bundle import classifier_features

    stats_dir = Path(zoo.__file__).parent / "stats"
    train = FeatureStats.load(stats_dir / "cifar10-features_train.npz")
    test = FeatureStats.load(stats_dir / "cifar10-features_test.npz")
    assert train.n == 50000 and test.n == 10000 and train.dim == zoo.load("cifar10-features").model.feature_dim
    # identical statistics -> 0; symmetric
    assert frechet_distance(train.mu, train.sigma, train.mu, train.sigma) == pytest.approx(0.0, abs=1e-6)
    d_tt = frechet_distance(test.mu, test.sigma, train.mu, train.sigma)
    assert d_tt == pytest.approx(frechet_distance(train.mu, train.sigma, test.mu, test.sigma), rel=1e-6)

    images = read_zip(SHARED / "test.zip").images[::16]  # 625 images (> 512 feature dims), all classes
    model = zoo.load("cifar10-features").model

    def fd(x: np.ndarray) -> float:
        s = statistics_from_features(classifier_features(model, x, batch_size=625))
        return frechet_distance(s.mu, s.sigma, train.mu, train.sigma)

    rng = np.random.default_rng(0)

    def noisy(sigma: float) -> np.ndarray:
        return np.clip(images + rng.normal(0, 255 * sigma, images.shape), 0, 255).round().astype(np.uint8)

    clean = fd(images)
    noise = [fd(noisy(s)) for s in (0.05, 0.15)]
    blur = [fd(_blur(images, r)) for r in (1, 2)]
    assert clean < noise[0] < noise[1]
    assert clean < blur[0] < blur[1]


if __name__ == "__main__":
    torch.set_num_threads(2)
    data = {"_note": "forward-pass reference values of the bundled zoo models (CPU, fp32); "
                     "regenerate with `python tests/test_zoo_models.py` only when the weights change",
            "cifar10-ddpm": _ddpm_values(), "cifar10-features": _classifier_values(), "cifar10-cm": _cm_values()}
    REF.write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", REF)
