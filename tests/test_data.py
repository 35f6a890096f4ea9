"""diffquant.data: image folders, zipped folders, the packed-JPEG format, and its CLI verb."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffquant.data import (
    load_images,
    pack_jpeg_zip,
    read_folder,
    read_packed,
    read_zip,
    unpack_jpeg_bytes,
)
from diffquant.data.packed import jpeg_header_length

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
CLASSES = ("cat", "dog", "frog")


def _jpeg(rng: np.random.Generator, size=32, quality=75) -> bytes:
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _make_zip(path: Path, per_class: int = 5, prefix: str = "train/", seed: int = 0, quality=75) -> Path:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(prefix, b"")  # directory entries, as in the CIFAR-10-JPEG archives
        for c in reversed(CLASSES):  # archive order must not matter
            for i in reversed(range(per_class)):
                q = quality if isinstance(quality, int) else quality[i % len(quality)]
                zf.writestr(f"{prefix}{c}/{i:04d}.jpg", _jpeg(rng, quality=q))
    return path


def test_zip_reading_sorted_labels(tmp_path):
    z = _make_zip(tmp_path / "train.zip")
    d = read_zip(z)
    assert d.images.shape == (15, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.labels.dtype == np.int64
    assert d.classes == CLASSES
    assert d.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert d.names[0] == "train/cat/0000.jpg" and d.names[-1] == "train/frog/0004.jpg"
    # same pixels as Pillow reading the entry directly
    with zipfile.ZipFile(z) as zf:
        ref = np.asarray(Image.open(io.BytesIO(zf.read("train/dog/0003.jpg"))).convert("RGB"))
    assert np.array_equal(d.images[d.names.index("train/dog/0003.jpg")], ref)


def test_folder_reading_and_subdir(tmp_path):
    z = _make_zip(tmp_path / "a.zip", per_class=2)
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "folder")
    d = read_folder(tmp_path / "folder")
    assert d.classes == CLASSES and len(d) == 6
    d2 = load_images(tmp_path / "folder" / "train")
    assert np.array_equal(d.images, d2.images)
    assert np.array_equal(read_zip(z).images, d.images)
    # a split folder picked by subdir
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as out, zipfile.ZipFile(z) as zin:
        for n in zin.namelist():
            if not n.endswith("/"):
                out.writestr(n, zin.read(n))
                out.writestr(n.replace("train/", "test/"), zin.read(n))
    with pytest.raises(ValueError, match="several parent folders"):
        read_zip(both)
    assert len(read_zip(both, subdir="test")) == 6


def test_missing_and_corrupt_archives(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_zip(tmp_path / "nope.zip")
    with pytest.raises(ValueError, match="does not exist"):
        load_images(tmp_path / "nope")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(ValueError, match="not a readable zip"):
        read_zip(bad)
    # truncated archive (central directory cut off)
    good = _make_zip(tmp_path / "good.zip")
    trunc = tmp_path / "trunc.zip"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError):
        read_zip(trunc)
    # an entry that is not an image
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("cat/0000.jpg", b"\xff\xd8garbage")
        zf.writestr("dog/0000.jpg", _jpeg(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="cat/0000.jpg"):
        read_zip(broken, workers=1)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", b"x")
    with pytest.raises(ValueError, match="no images"):
        read_zip(empty)
    with pytest.raises(ValueError, match="not a packed image set|cannot read"):
        _bad_npz(tmp_path)


def _bad_npz(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    return read_packed(p)


def test_packed_roundtrip_exact_bytes(tmp_path):
    z = _make_zip(tmp_path / "train.zip", per_class=20, quality=[75, 90])  # two distinct headers
    out = tmp_path / "train.npz"
    summary = pack_jpeg_zip(z, out)
    assert summary["count"] == 60 and summary["headers"] == 2
    names = list(read_zip(z).names)
    with zipfile.ZipFile(z) as zf:
        originals = [zf.read(n) for n in names]
    assert unpack_jpeg_bytes(out) == originals
    a, b = read_packed(out), read_zip(z)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.classes == b.classes and a.names == b.names
    # the loader by extension, and allow_pickle=False works (no object arrays in the file)
    with np.load(out, allow_pickle=False) as f:
        assert str(f["format"]) == "diffquant-packed-jpeg-v1"
    assert np.array_equal(load_images(out).images, a.images)


def test_pack_refuses_non_jpeg(tmp_path):
    p = tmp_path / "png.zip"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("cat/0.png", buf.getvalue())
    with pytest.raises(ValueError, match="not a JPEG"):
        pack_jpeg_zip(p, tmp_path / "o.npz")
    with pytest.raises(ValueError, match="SOI|not a JPEG"):
        jpeg_header_length(b"\x00\x01\x02\x03")


@pytest.mark.skipif(not (SHARED / "test.zip").is_file(), reason="CIFAR-10-JPEG not available")
def test_packed_cifar10_jpeg_bit_identical(tmp_path):
    """A few hundred real CIFAR-10-JPEG images: one 623-byte header, pixels bit-identical to the zip."""
    sub = tmp_path / "sub.zip"
    with zipfile.ZipFile(SHARED / "test.zip") as zin, zipfile.ZipFile(sub, "w") as zout:
        names = [n for n in zin.namelist() if n.endswith(".jpg")]
        for n in names[::30]:  # ~333 images from all classes
            zout.writestr(n, zin.read(n))
    out = tmp_path / "sub.npz"
    summary = pack_jpeg_zip(sub, out)
    assert summary["headers"] == 1
    with np.load(out, allow_pickle=False) as f:
        assert f["headers"].size == 623
    a, b = read_packed(out), read_zip(sub)
    assert len(a) > 300 and a.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_cli_data_pack_and_info(tmp_path):
    from diffquant.cli import cli

    z = _make_zip(tmp_path / "t.zip")
    r = CliRunner().invoke(cli, ["data", "pack", str(z), str(tmp_path / "t.npz"), "--json"])
    assert r.exit_code == 0, r.output
    assert '"verified": true' in r.output
    r = CliRunner().invoke(cli, ["data", "info", str(tmp_path / "t.npz"), "--json"])
    assert r.exit_code == 0 and '"count": 15' in r.output
    r = CliRunner().invoke(cli, ["data", "pack", str(tmp_path / "missing.zip"), str(tmp_path / "x.npz")])
    assert r.exit_code != 0 and "does not exist" in r.output
