"""KID, Inception Score, precision/recall (diffquant.evaluation.metrics)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffquant.evaluation.metrics import inception_score, kid, knn_radii, mmd2_unbiased, precision_recall


def test_mmd2_unbiased_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(9, 4)) + 0.3
    k = lambda a, b: (a @ b / 4 + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_same_distribution_near_zero_and_shifted_positive():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    same, same_std = kid(a, b, num_subsets=20, subset_size=500, seed=0)
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=500, seed=0)
    assert abs(same) < 0.02
    assert shifted > 0.3
    assert shifted > 20 * max(abs(same), same_std)
    # deterministic given the seed
    assert kid(a, b, num_subsets=5, subset_size=100, seed=3) == kid(a, b, num_subsets=5, subset_size=100, seed=3)


def test_kid_bad_inputs():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        kid(a, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, a, subset_size=1)


def test_inception_score_bounds():
    # Uninformative classifier: IS = 1 exactly.
    assert inception_score(np.zeros((100, 10)), splits=5) == (pytest.approx(1.0), pytest.approx(0.0))
    # Confident and balanced over 10 classes: IS -> 10.
    logits = np.full((1000, 10), -50.0)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # Confident but always the same class: IS = 1.
    one = np.full((100, 10), -50.0)
    one[:, 3] = 50.0
    assert inception_score(one, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 10)), splits=6)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(2)
    lg = rng.normal(size=(60, 7)) * 3
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0)
    expected = math.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1)))
    assert inception_score(lg, splits=1)[0] == pytest.approx(expected, rel=1e-10)


def test_knn_radii_brute_force_and_batching():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 3))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_radii(x, k=3).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(knn_radii(x, k=3, budget_elems=7).numpy(), expected, rtol=1e-9)


def test_precision_recall_synthetic_manifolds():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(2000, 2))
    same = precision_recall(real, rng.normal(size=(2000, 2)))
    assert same["precision"] > 0.9 and same["recall"] > 0.9
    disjoint = precision_recall(real, rng.normal(size=(2000, 2)) + 50.0)
    assert disjoint == {"precision": 0.0, "recall": 0.0}
    # Generated set covers only a small part of the real manifold: precise but low recall.
    narrow = precision_recall(real, 0.2 * rng.normal(size=(2000, 2)))
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.4
    # And the other way round.
    wide = precision_recall(0.2 * rng.normal(size=(2000, 2)), real)
    assert wide["precision"] < 0.4 and wide["recall"] > 0.95


def test_precision_recall_batching_invariant():
    rng = np.random.default_rng(5)
    r, f = rng.normal(size=(300, 4)), rng.normal(size=(200, 4)) + 0.5
    assert precision_recall(r, f) == precision_recall(r, f, budget_elems=123)
