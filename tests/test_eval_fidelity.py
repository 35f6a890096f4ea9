"""Paired fidelity: MSE, PSNR, SSIM; per-time-step noise-prediction error."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffquant.evaluation.fidelity import (
    TimestepErrorAccumulator,
    check_paired,
    gaussian_window,
    mse,
    paired_fidelity,
    psnr,
    ssim,
    timestep_error_summary,
)


def _imgs(n=3, h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_identical_images():
    a = _imgs()
    assert np.all(mse(a, a) == 0)
    assert np.all(np.isinf(psnr(a, a)))
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    res = paired_fidelity(a, a)
    assert res["psnr_identical"] == 3 and math.isinf(res["psnr"]["mean"]) and math.isinf(res["psnr_of_mean_mse"])
    assert res["ssim"]["mean"] == pytest.approx(1.0, abs=1e-12)


def test_known_mse_gives_known_psnr():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 5  # every pixel off by 5: MSE 25
    b[1, :8] += 10  # half the pixels off by 10: MSE 50
    np.testing.assert_allclose(mse(a, b), [25.0, 50.0])
    np.testing.assert_allclose(psnr(a, b), [20 * math.log10(255 / 5), 10 * math.log10(255**2 / 50)])
    assert psnr(a, b)[0] == pytest.approx(34.15140352195873)
    res = paired_fidelity(a, b)
    assert res["psnr_of_mean_mse"] == pytest.approx(10 * math.log10(255**2 / 37.5))
    assert res["mse"]["mean"] == pytest.approx(37.5)


def test_mse_has_no_uint8_wraparound():
    a = np.zeros((1, 4, 4, 1), np.uint8)
    b = np.full((1, 4, 4, 1), 255, np.uint8)
    assert mse(a, b)[0] == 255.0**2
    assert psnr(a, b)[0] == pytest.approx(0.0)


def test_ssim_constant_images_closed_form():
    # Constant images: zero variances, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = np.full((1, 20, 20, 3), 80, np.uint8)
    b = np.full((1, 20, 20, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b)[0] == pytest.approx((2 * 80 * 120 + c1) / (80**2 + 120**2 + c1), rel=1e-12)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    # Independent implementation: scipy Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps),
    # crop the 5-pixel border affected by padding (= valid region), population statistics.
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]  # noqa: E731
        ma, mb = f(a), f(b)
        saa, sbb, sab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        s = ((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma**2 + mb**2 + c1) * (saa + sbb + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_ssim_matches_independent_reference():
    a = _imgs(4, 32, 28, 3, seed=1)
    noise = np.random.default_rng(2).normal(0, 20, a.shape)
    b = np.clip(a.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    got = ssim(a, b, batch_size=3)
    ref = [_ssim_reference(a[i], b[i]) for i in range(4)]
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    np.testing.assert_allclose(ssim(b, a), got, rtol=1e-12)  # symmetric
    assert np.all(got < 1)


def test_gaussian_window():
    w = gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0)
    assert float(w[5, 5]) == float(w.max())


def test_bad_inputs():
    a = _imgs()
    with pytest.raises(ValueError, match="different shapes"):
        mse(a, a[:2])
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :8, :8], a[:, :8, :8])
    with pytest.raises(ValueError, match="same seeds"):
        check_paired(np.arange(3), np.arange(3) + 1, a.shape, a.shape)
    with pytest.raises(ValueError, match="same seeds"):
        paired_fidelity(a, a, np.arange(3), np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="image shapes"):
        check_paired(np.arange(3), np.arange(3), (3, 32, 32, 3), (3, 16, 16, 3))


def test_timestep_error_summary_exact_values():
    fp = torch.ones(2, 3, 4, 4)  # energy 96
    q = fp + 0.5  # squared error 0.25 * 96 = 24
    rows = timestep_error_summary({10: [(fp, q)], 999: [(fp, fp), (fp, fp * 2)]})
    assert [r["t"] for r in rows] == [10, 999]
    assert rows[0]["mse"] == pytest.approx(0.25)
    assert rows[0]["rel_err"] == pytest.approx(0.25)
    assert rows[0]["sqnr_db"] == pytest.approx(10 * math.log10(4))
    assert rows[0]["n"] == 2
    assert rows[1]["mse"] == pytest.approx(0.5)  # (0 + 96) / 192 elements
    assert rows[1]["rel_err"] == pytest.approx(0.5) and rows[1]["n"] == 4
    # Running sums give the same answer, and merge with tensors.
    sums = timestep_error_summary({10: {"sq_err": 24.0, "sq_ref": 96.0, "numel": 96, "count": 2}})
    assert sums[0] == rows[0]
    acc = TimestepErrorAccumulator()
    acc.update(5, fp, fp)
    assert acc.summary()[0]["rel_err"] == 0.0 and math.isinf(acc.summary()[0]["sqnr_db"])
    with pytest.raises(ValueError, match="shape"):
        acc.update(5, fp, fp[:1])
    with pytest.raises(ValueError, match="sq_ref"):
        timestep_error_summary({1: {"sq_err": 1.0}})
