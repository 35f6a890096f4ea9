"""`diffquant compare` and `diffquant evaluate` through click's CliRunner (tiny stand-in feature network)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffquant.cli import cli
from diffquant.evaluation import features as feats_mod
from diffquant.evaluation.features import FeatureSpace, TorchFeatureExtractor
from diffquant.evaluation.fid import statistics_from_features
from diffquant.sampling.io import save_samples


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 32, 32, 3)) + shift, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- compare


def test_compare_identical_and_different(tmp_path):
    a = _images(4, 0)
    b = a.copy()
    b[1] = np.clip(b[1].astype(int) + 5, 0, 255).astype(np.uint8)
    save_samples(tmp_path / "a.npz", a, np.arange(10, 14))
    save_samples(tmp_path / "b.npz", b, np.arange(10, 14))
    r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n"] == 4 and out["psnr_identical"] == 4 and out["psnr"]["mean"] is None
    assert out["ssim"]["mean"] == pytest.approx(1.0) and out["mse"]["max"] == 0.0

    r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json", "--per-image"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    expected_mse = float(((a[1].astype(float) - b[1].astype(float)) ** 2).mean())
    assert out["per_image"]["mse"] == pytest.approx([0.0, expected_mse, 0.0, 0.0])
    assert out["psnr_identical"] == 3
    assert out["psnr"]["mean"] == pytest.approx(10 * np.log10(255**2 / expected_mse))
    assert out["seeds"] == [10, 11, 12, 13]

    r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    assert r.exit_code == 0 and "psnr_db" in r.stdout and "ssim" in r.stdout


def test_compare_refuses_mismatched_seeds_and_shapes(tmp_path):
    a = _images(4, 0)
    save_samples(tmp_path / "a.npz", a, np.arange(4))
    save_samples(tmp_path / "s.npz", a, np.arange(1, 5))
    save_samples(tmp_path / "n.npz", a[:3], np.arange(3))
    save_samples(tmp_path / "h.npz", a[:, :16], np.arange(4))
    r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / "s.npz")])
    assert r.exit_code != 0 and "same seeds" in r.output and "index 0: 0 vs 1" in r.output
    for other in ("n.npz", "h.npz"):
        r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / other)])
        assert r.exit_code != 0 and "different image shapes" in r.output
    r = _run(["compare", str(tmp_path / "a.npz"), str(tmp_path / "missing.npz")])
    assert r.exit_code != 0 and "does not exist" in r.output


# ---------------------------------------------------------------------------------------- evaluate


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 10)

    def features(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _write_split(root, split, n_per_class, seed):
    rng = np.random.default_rng(seed)
    for cls in ("airplane", "cat"):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


@pytest.fixture
def fake_space(tmp_path, monkeypatch):
    """Stand-in for zoo:cifar10-features: a tiny random net, bundled stats in a temp dir, a temp dataset."""
    net = _TinyNet().eval()

    def build(device="cpu", batch_size=256, resize="error", **_):
        return TorchFeatureExtractor(net, "cifar10-features", input_size=(32, 32), resize=resize, device=device,
                                     batch_size=batch_size)

    monkeypatch.setitem(feats_mod.FEATURE_SPACES, "cifar10-features",
                        FeatureSpace("cifar10-features", "test stand-in", build, True, True))
    stats_dir = tmp_path / "stats"
    monkeypatch.setattr(feats_mod, "STATS_DIR", stats_dir)
    data = tmp_path / "data"
    _write_split(data, "train", 30, 1)
    _write_split(data, "test", 20, 2)
    from diffquant.data import load_images

    ex = build()
    for split in ("train", "test"):
        f = ex.features(load_images(data / split).images, progress=False)
        statistics_from_features(f).save(stats_dir / f"cifar10-features_{split}.npz")
    return {"extractor": ex, "data": data, "stats": stats_dir, "cache": tmp_path / "cache"}


def test_evaluate_zoo_metrics_json(tmp_path, fake_space):
    imgs = _images(12, 5)
    save_samples(tmp_path / "s.npz", imgs, np.arange(12), {"model": "test"})
    args = ["evaluate", str(tmp_path / "s.npz"), "--metrics", "fd_cifar,kid_cifar,pr_cifar,is_cifar",
            "--data-dir", str(fake_space["data"]), "--cache-dir", str(fake_space["cache"]), "--json",
            "--no-progress", "--kid-subsets", "5"]
    r = _run(args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n"] == 12 and out["image_shape"] == [32, 32, 3] and out["meta"] == {"model": "test"}
    m = out["metrics"]
    assert set(m) == {"fd_cifar", "kid_cifar", "pr_cifar.precision", "pr_cifar.recall", "is_cifar"}

    # fd_cifar against the bundled train statistics, computed independently
    from diffquant.evaluation.fid import FeatureStats

    ex = fake_space["extractor"]
    ref = FeatureStats.load(fake_space["stats"] / "cifar10-features_train.npz")
    expected = statistics_from_features(ex.features(imgs, progress=False)).distance(ref)
    assert m["fd_cifar"]["value"] == pytest.approx(expected, rel=1e-9)
    assert "bundled" in m["fd_cifar"]["reference"]
    # real-data floor: 12 of the 40 test images vs train statistics
    assert "random 12 CIFAR-10-JPEG test images" in m["fd_cifar"]["floor_note"]
    assert 0 <= m["fd_cifar"]["floor"] < m["fd_cifar"]["value"]
    assert 1.0 <= m["is_cifar"]["value"] <= 10.0
    assert 0.0 <= m["pr_cifar.precision"]["value"] <= 1.0
    # the features of the real splits were cached; a second run reads them and gives the same numbers
    assert len(list((fake_space["cache"] / "features").glob("cifar10-features-*.npz"))) == 2
    r2 = _run(args)
    assert json.loads(r2.stdout)["metrics"] == m

    # table output
    r = _run(["evaluate", str(tmp_path / "s.npz"), "--data-dir", str(fake_space["data"]), "--no-cache",
              "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "fd_cifar" in r.stdout and "12 samples" in r.stdout and "floor" in r.stdout


def test_evaluate_floor_falls_back_to_bundled_stats(tmp_path, fake_space):
    save_samples(tmp_path / "s.npz", _images(6, 7), np.arange(6))
    empty = tmp_path / "nodata"
    empty.mkdir()
    r = _run(["evaluate", str(tmp_path / "s.npz"), "--data-dir", str(empty), "--no-cache", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    fd = json.loads(r.stdout)["metrics"]["fd_cifar"]
    assert "NOT the same sample count" in fd["floor_note"]
    from diffquant.evaluation.fid import FeatureStats

    tr = FeatureStats.load(fake_space["stats"] / "cifar10-features_train.npz")
    te = FeatureStats.load(fake_space["stats"] / "cifar10-features_test.npz")
    assert fd["floor"] == pytest.approx(te.distance(tr))


def test_evaluate_refuses_wrong_size_unless_resize(tmp_path, fake_space):
    save_samples(tmp_path / "s.npz", _images(4, 1)[:, :16, :16], np.arange(4))
    r = _run(["evaluate", str(tmp_path / "s.npz"), "--no-floor", "--no-progress"])
    assert r.exit_code != 0 and "expects 32x32" in r.output
    r = _run(["evaluate", str(tmp_path / "s.npz"), "--no-floor", "--no-progress", "--resize", "bilinear", "--json"])
    assert r.exit_code == 0, r.output


def test_evaluate_user_errors(tmp_path, monkeypatch):
    save_samples(tmp_path / "s.npz", _images(4, 0), np.arange(4))
    s = str(tmp_path / "s.npz")
    r = _run(["evaluate", s, "--metrics", "fd_cifar,fid_cifar"])
    assert r.exit_code != 0 and "unknown metric(s) 'fid_cifar'" in r.output and "allowed" in r.output
    r = _run(["evaluate", s, "--metrics", "fid"])
    assert r.exit_code != 0 and "--inception-weights" in r.output
    r = _run(["evaluate", s, "--metrics", "fid", "--inception-weights", str(tmp_path / "none.pth")])
    assert r.exit_code != 0 and "does not exist" in r.output
    from diffquant import zoo

    monkeypatch.setattr(zoo, "available", lambda: ["tiny-random"])
    r = _run(["evaluate", s, "--metrics", "fd_cifar"])
    assert r.exit_code != 0 and "not bundled yet" in r.output


@pytest.mark.slow
def test_evaluate_fid_and_is_with_local_inception_weights(tmp_path):
    """The Inception path end to end: random weights from a local safetensors file, reference
    statistics from a file (as pytorch-fid's .npz: mu and sigma only)."""
    from safetensors.torch import save_file

    from diffquant.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", mu=rng.normal(size=2048) * 1e-3, sigma=np.eye(2048) * 1e-6)
    save_samples(tmp_path / "s.npz", _images(3, 3), np.arange(3))
    r = _run(["evaluate", str(tmp_path / "s.npz"), "--metrics", "fid,is", "--inception-weights", str(weights),
              "--fid-ref-stats", str(tmp_path / "ref.npz"), "--no-floor", "--json", "--no-progress",
              "--batch-size", "3", "--fd-method", "eigh"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["fid"]["value"] > 0 and "ref.npz" in m["fid"]["reference"]
    assert 1.0 <= m["is"]["value"] <= 1008.0 and m["is"]["extra"]["splits"] == 3
