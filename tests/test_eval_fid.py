"""Fréchet distance and feature statistics (diffquant.evaluation.fid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffquant.evaluation.features import TorchFeatureExtractor
from diffquant.evaluation.fid import FeatureStats, fd_from_features, frechet_distance, statistics_from_features


def _closed_form_diag(mu1, d1, mu2, d2):
    # Commuting (diagonal) covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(d1) - sqrt(d2))^2
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    d1, d2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    got = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert got == pytest.approx(_closed_form_diag(mu1, d1, mu2, d2), rel=1e-9, abs=1e-9)


def test_closed_form_commuting_non_diagonal():
    # S1 = Q D1 Q^T, S2 = Q D2 Q^T commute; FD is basis independent.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    d1, d2 = rng.uniform(0.5, 3, 8), rng.uniform(0.5, 3, 8)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form_diag(mu1, d1, mu2, d2), rel=1e-7)


def test_known_small_value():
    # ||(0,0,0) - (1,1,1)||^2 = 3; diag (1,4,9) vs (4,1,1): (1-2)^2 + (2-1)^2 + (3-1)^2 = 6
    assert frechet_distance(np.zeros(3), np.diag([1.0, 4, 9]), np.ones(3), np.diag([4.0, 1, 1])) == pytest.approx(9.0)


def test_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    a = statistics_from_features(rng.normal(size=(400, 12)))
    b = statistics_from_features(rng.normal(size=(400, 12)) * 1.3 + 0.2)
    assert a.distance(a) == pytest.approx(0.0, abs=1e-8)
    assert a.distance(b) > 0.1
    assert a.distance(b) == pytest.approx(b.distance(a), rel=1e-8)


def test_general_covariances_match_eigen_formula():
    # Independent check for non-commuting covariances: tr((S1 S2)^1/2) = sum sqrt(eig(S1 S2)).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ev = np.linalg.eigvals(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_singular_covariances_use_eps_offset():
    # Fewer samples than dimensions: rank-deficient covariances; shifted by 0.1 in every one of 50 dims.
    rng = np.random.default_rng(4)
    f = rng.normal(size=(10, 50))
    got = fd_from_features(f, f + 0.1)
    assert np.isfinite(got)
    assert got == pytest.approx(50 * 0.01, rel=1e-3)
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3))) == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "dimensions differ"),
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1 must have shape"),
        ((np.array([0.0, np.nan, 0.0]), np.eye(3), np.zeros(3), np.eye(3)), "non-finite"),
        ((np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2)), "imaginary"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_stats_roundtrip_without_pickle(tmp_path):
    rng = np.random.default_rng(5)
    st = statistics_from_features(rng.normal(size=(100, 7)))
    assert st.n == 100 and st.dim == 7
    p = st.save(tmp_path / "s.npz")
    back = FeatureStats.load(p)
    assert back.n == 100
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    # pytorch-fid style file: mu and sigma only
    np.savez(tmp_path / "pf.npz", mu=st.mu, sigma=st.sigma)
    assert FeatureStats.load(tmp_path / "pf.npz").n is None
    # object arrays need pickle: refused
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=st.sigma)
    with pytest.raises(ValueError):
        FeatureStats.load(tmp_path / "obj.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        FeatureStats.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="does not exist"):
        FeatureStats.load(tmp_path / "nope.npz")


def test_statistics_from_features_matches_numpy():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(300, 5)).astype(np.float32)
    st = statistics_from_features(f)
    np.testing.assert_allclose(st.mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        statistics_from_features(f[:1])
    with pytest.raises(ValueError, match="2-D"):
        statistics_from_features(f[0])


def _smooth_images(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return (up.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def test_fd_grows_with_degradation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    ex = TorchFeatureExtractor(net, "test-net", input_size=(32, 32))
    ref = ex.statistics(_smooth_images(400, 0), progress=False)
    clean = _smooth_images(400, 1)
    rng = np.random.default_rng(0)
    fds = []
    for sigma in (0.0, 10.0, 30.0, 60.0):
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).astype(np.uint8)
        fds.append(ex.statistics(noisy, progress=False).distance(ref))
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


@pytest.mark.parametrize("n, d", [(300, 64), (20, 40)])
def test_eigh_method_agrees_with_sqrtm(n, d):
    rng = np.random.default_rng(n)
    a = statistics_from_features(rng.normal(size=(n, d)))
    b = statistics_from_features(rng.normal(size=(n, d)) * 1.2 + 0.1)
    ref = a.distance(b, method="sqrtm")
    assert a.distance(b, method="eigh") == pytest.approx(ref, rel=1e-6)
    assert a.distance(a, method="eigh") == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="method"):
        a.distance(b, method="svd")
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="eigh")
