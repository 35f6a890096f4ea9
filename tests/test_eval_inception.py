"""FID Inception-v3 (diffquant.evaluation.inception): pytorch-fid state-dict layout, safe loading."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from diffquant.evaluation.features import TorchFeatureExtractor
from diffquant.evaluation.inception import (
    FIDInceptionV3,
    _avg3_no_pad,
    fid_inception_v3,
    load_inception_state_dict,
)

# The conv layers of pytorch-fid's pt_inception-2015-12-05-6726825d.pth, recorded from the public
# layout (torchvision Inception3 names with the FID blocks; aux classifier absent; fc 2048 -> 1008):
# prefix, in_channels, out_channels, kernel_h, kernel_w. Each has <prefix>.conv.weight and
# <prefix>.bn.{weight,bias,running_mean,running_var,num_batches_tracked}.
_STEM = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
         ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]


def _a(p, cin, pool):
    return [(f"{p}.branch1x1", cin, 64, 1, 1), (f"{p}.branch5x5_1", cin, 48, 1, 1), (f"{p}.branch5x5_2", 48, 64, 5, 5),
            (f"{p}.branch3x3dbl_1", cin, 64, 1, 1), (f"{p}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{p}.branch3x3dbl_3", 96, 96, 3, 3), (f"{p}.branch_pool", cin, pool, 1, 1)]


def _b(p, cin):
    return [(f"{p}.branch3x3", cin, 384, 3, 3), (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{p}.branch3x3dbl_2", 64, 96, 3, 3), (f"{p}.branch3x3dbl_3", 96, 96, 3, 3)]


def _c(p, cin, c7):
    return [(f"{p}.branch1x1", cin, 192, 1, 1), (f"{p}.branch7x7_1", cin, c7, 1, 1), (f"{p}.branch7x7_2", c7, c7, 1, 7),
            (f"{p}.branch7x7_3", c7, 192, 7, 1), (f"{p}.branch7x7dbl_1", cin, c7, 1, 1),
            (f"{p}.branch7x7dbl_2", c7, c7, 7, 1), (f"{p}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{p}.branch7x7dbl_4", c7, c7, 7, 1), (f"{p}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{p}.branch_pool", cin, 192, 1, 1)]


def _d(p, cin):
    return [(f"{p}.branch3x3_1", cin, 192, 1, 1), (f"{p}.branch3x3_2", 192, 320, 3, 3),
            (f"{p}.branch7x7x3_1", cin, 192, 1, 1), (f"{p}.branch7x7x3_2", 192, 192, 1, 7),
            (f"{p}.branch7x7x3_3", 192, 192, 7, 1), (f"{p}.branch7x7x3_4", 192, 192, 3, 3)]


def _e(p, cin):
    return [(f"{p}.branch1x1", cin, 320, 1, 1), (f"{p}.branch3x3_1", cin, 384, 1, 1),
            (f"{p}.branch3x3_2a", 384, 384, 1, 3), (f"{p}.branch3x3_2b", 384, 384, 3, 1),
            (f"{p}.branch3x3dbl_1", cin, 448, 1, 1), (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{p}.branch_pool", cin, 192, 1, 1)]


PUBLIC_CONVS = (_STEM + _a("Mixed_5b", 192, 32) + _a("Mixed_5c", 256, 64) + _a("Mixed_5d", 288, 64) + _b("Mixed_6a", 288)
                + _c("Mixed_6b", 768, 128) + _c("Mixed_6c", 768, 160) + _c("Mixed_6d", 768, 160) + _c("Mixed_6e", 768, 192)
                + _d("Mixed_7a", 768) + _e("Mixed_7b", 1280) + _e("Mixed_7c", 2048))


def _public_shapes(with_nbt: bool = True) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for p, cin, cout, kh, kw in PUBLIC_CONVS:
        shapes[f"{p}.conv.weight"] = (cout, cin, kh, kw)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{p}.bn.{s}"] = (cout,)
        if with_nbt:
            shapes[f"{p}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_state_dict_layout_matches_pytorch_fid(model):
    assert len(PUBLIC_CONVS) == 94
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _public_shapes()
    # BatchNorm eps is TensorFlow's 1e-3
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _random_public_state_dict(with_nbt: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, shape in _public_shapes(with_nbt).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


@pytest.mark.parametrize("with_nbt", [True, False])
def test_loads_pth_in_public_layout_strictly(tmp_path, with_nbt):
    sd = _random_public_state_dict(with_nbt)
    path = tmp_path / "inception.pth"
    # Files from before PyTorch 1.6 use the legacy (non-zip) format; weights_only reads both.
    torch.save(sd, path, _use_new_zipfile_serialization=with_nbt)
    loaded = load_inception_state_dict(path)
    m = FIDInceptionV3()
    m.load_state_dict(loaded, strict=True)
    torch.testing.assert_close(m.fc.weight, sd["fc.weight"])
    torch.testing.assert_close(m.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])


def test_features_2048_and_logits_1008_on_random_weights(tmp_path, model):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    net = fid_inception_v3(path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imgs = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    # Through the generic extractor: uint8 NHWC in, float64 (N, 2048) features and (N, 1008) logits out.
    out = TorchFeatureExtractor(net, "inception", batch_size=2).extract(imgs, ("features", "logits"), progress=False)
    assert out["features"].shape == (2, 2048) and out["features"].dtype == np.float64
    assert out["logits"].shape == (2, 1008)
    assert np.isfinite(out["features"]).all() and (out["features"] >= 0).all()  # averaged ReLU outputs
    # The weights round-tripped through safetensors unchanged.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_tf_style_average_pool_ignores_padding():
    x = torch.ones(1, 1, 5, 5)
    y = _avg3_no_pad(x)
    torch.testing.assert_close(y, x)  # with count_include_pad=True the corners would be 4/9


def test_last_block_uses_max_pool_and_others_avg(model):
    # Mixed_7c's pool branch takes max pooling: feed a single hot pixel and compare with a manual branch.
    torch.manual_seed(0)
    x = torch.rand(1, 2048, 8, 8)
    blk = model.Mixed_7c
    with torch.no_grad():
        out = blk(x)[:, -192:]
        exp_max = blk.branch_pool(torch.nn.functional.max_pool2d(x, 3, 1, 1))
        exp_avg = blk.branch_pool(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(out, exp_max)
    assert not torch.allclose(out, exp_avg)
    x7b = torch.rand(1, 1280, 8, 8)
    with torch.no_grad():
        out7b = model.Mixed_7b(x7b)[:, -192:]
        exp7b = model.Mixed_7b.branch_pool(torch.nn.functional.avg_pool2d(x7b, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(out7b, exp7b)


def test_missing_weights_error_is_clear(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        fid_inception_v3(None)
    with pytest.raises(ValueError, match="does not exist"):
        load_inception_state_dict(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_hash_in_file_name_is_checked(tmp_path):
    sd = {"fc.weight": torch.zeros(2, 2)}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="SHA-256"):
        load_inception_state_dict(path)
    # A file whose name carries its true hash prefix passes the check.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = tmp_path / f"my_inception-{digest[:8]}.pth"
    good.write_bytes(path.read_bytes())
    assert set(load_inception_state_dict(good)) == {"fc.weight"}
    # verify=False skips it (the user's own conversion)
    assert set(load_inception_state_dict(path, verify=False)) == {"fc.weight"}


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pth_is_never_unpickled_unsafely(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_inception_state_dict(path)
    assert "must never run" not in capsys.readouterr().out


def test_wrong_layout_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
    with pytest.raises(ValueError, match="pytorch-fid layout"):
        fid_inception_v3(path)
