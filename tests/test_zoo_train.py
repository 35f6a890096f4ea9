"""Zoo training recipes on CPU with tiny configs: exact resume, warm restart, checkpoints."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffquant.zoo.checkpoint import load_sharded, load_state, save_sharded
from diffquant.zoo.train_ddpm import DDPMTrainConfig, DDPMTrainer, train_ddpm


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """48 random 32x32 JPEGs in 3 classes, packed."""
    from diffquant.data import pack_jpeg_zip

    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    z = d / "t.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for c in ("a", "b", "c"):
            for i in range(16):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
                zf.writestr(f"{c}/{i:03d}.jpg", buf.getvalue())
    pack_jpeg_zip(z, d / "t.npz")
    return str(d / "t.npz")


def _cfg(data, run_dir, **kw):
    base = dict(data=data, run_dir=str(run_dir), unet="tiny", batch_size=8, lr=1e-3, warmup_steps=2,
                log_every=2, device="cpu", save_every_minutes=1e9)
    base.update(kw)
    return DDPMTrainConfig(**base)


def _tensors(folder):
    t, doc = load_state(folder)
    return t, doc


def test_ddpm_chunks_resume_exactly(tiny_data, tmp_path):
    torch.set_num_threads(1)
    full = train_ddpm(_cfg(tiny_data, tmp_path / "a"), resume=None, until_step=8)
    assert full["step"] == 8
    train_ddpm(_cfg(tiny_data, tmp_path / "b"), resume=None, until_step=3)
    # epoch boundary (48 images / batch 8 = 6 steps) lies inside the second chunk
    out = train_ddpm(_cfg(tiny_data, tmp_path / "b"), resume="auto", until_step=8)
    assert out["resumed_from"] == "full" and out["start_step"] == 3
    a, da = _tensors(tmp_path / "a" / "state")
    b, db = _tensors(tmp_path / "b" / "state")
    assert sorted(a) == sorted(b)
    assert any(k.startswith("opt.") for k in a) and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert da["step"] == db["step"] == 8 and da["kind"] == "full"
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert {"step", "loss", "lr", "images_per_s"} <= set(rec)


def test_ddpm_warm_restart_from_compact(tiny_data, tmp_path):
    torch.set_num_threads(1)
    exp = tmp_path / "export"
    train_ddpm(_cfg(tiny_data, tmp_path / "a", export_dir=str(exp), snapshot_steps=[2]), resume=None, until_step=4)
    snap, sdoc = load_state(tmp_path / "a" / "snapshots" / "ema-step0000002")
    assert sdoc["kind"] == "ema-snapshot" and sdoc["step"] == 2 and all(k.startswith("ema.") for k in snap)
    t, doc = load_state(exp)
    assert doc["kind"] == "compact" and all(v.dtype == torch.float16 for v in t.values())
    assert not any(k.startswith("opt.") for k in t)
    cfg = _cfg(tiny_data, tmp_path / "b", moment_steps=2, rewarm_steps=4)
    tr = DDPMTrainer(cfg)
    assert tr.load(exp) == "compact"
    assert tr.step == 4 and tr.rewarm_from == 4 and len(tr.warm_restarts) == 1
    # Adam moments were re-estimated; weights untouched by the lr=0 steps (apart from fp16 rounding)
    assert all(tr.opt.state[p]["exp_avg_sq"].abs().sum() > 0 for p in tr.params)
    for n, p in zip(tr.names, tr.params):
        assert torch.equal(p.detach(), t[f"model.{n}"].float()), n
    assert tr.lr_at(4) == pytest.approx(cfg.lr / 4) and tr.lr_at(7) == pytest.approx(cfg.lr)
    tr.train(until_step=6)
    _, d2 = load_state(tmp_path / "b" / "state")
    assert d2["step"] == 6 and d2["warm_restarts"][0]["step"] == 4


def test_refuses_bad_resume(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train_ddpm(_cfg(tiny_data, tmp_path / "a"), resume=str(tmp_path / "missing"), until_step=1)
    with pytest.raises(ValueError, match="UNet preset"):
        DDPMTrainer(_cfg(tiny_data, tmp_path / "a", unet="huge"))


def test_sharded_checkpoint_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(1000, generator=g) for i in range(10)}  # 4000 bytes each
    files = save_sharded(tensors, tmp_path, "m", max_shard_bytes=9000)
    assert len(files) == 5 and all(f.stat().st_size < 9000 + 1000 for f in files)
    back = load_sharded(tmp_path, "m")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    files[0].unlink()
    with pytest.raises(ValueError, match="missing"):
        load_sharded(tmp_path, "m")


def test_classifier_recipe_tiny(tmp_path):
    from diffquant.zoo.classifier import ClassifierTrainConfig, load_classifier, save_classifier, train_classifier

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 16)
    x[y == 1, :, :, 0] = 255  # learnable signal
    cfg = ClassifierTrainConfig(epochs=2, batch_size=32, widths=[8, 16, 16, 16])
    model, hist = train_classifier(x, y, cfg, test=(x, y))
    assert len(hist) == 2 and "test_acc" in hist[-1]
    save_classifier(model, tmp_path / "clf")
    m2 = load_classifier(tmp_path / "clf")
    xt = torch.rand(3, 3, 32, 32)
    assert m2.features(xt).shape == (3, 16) and m2(xt).shape == (3, 10)
    with torch.no_grad():
        assert torch.allclose(m2(xt), model(xt), atol=2e-2)
