"""Image folders (``root/<class>/<file>``) and zipped image folders, read with Pillow + zipfile."""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageArrays:
    """A decoded image set: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,),
    ``classes`` (label index -> class name) and ``names`` (relative path of each image)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _labelled(relpaths: Sequence[str], source: str, subdir: str | None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Sort image paths by (class, name); the class is each image's parent folder."""
    subdir = subdir.strip("/") if subdir else None
    entries = []
    for p in relpaths:
        pp = PurePosixPath(p)
        if subdir is not None:
            try:
                rel = pp.relative_to(subdir)
            except ValueError:
                continue
        else:
            rel = pp
        if len(rel.parts) < 2:
            raise ValueError(
                f"{source}: image {p!r} is not inside a class folder; expected <class>/<file> "
                f"(optionally under a split folder such as train/<class>/<file>)"
            )
        entries.append((str(rel.parent.parent), rel.parent.name, p))
    if not entries:
        where = f" under {subdir!r}" if subdir else ""
        raise ValueError(f"{source}: no images{where} (looked for files ending in {', '.join(IMAGE_EXTENSIONS)})")
    prefixes = sorted({e[0] for e in entries})
    if len(prefixes) > 1:
        raise ValueError(
            f"{source}: images sit under several parent folders {prefixes[:6]}; "
            f"pick one with subdir=... (e.g. subdir={prefixes[0]!r})"
        )
    classes = tuple(sorted({e[1] for e in entries}))
    index = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: (e[1], e[2]))
    names = [e[2] for e in entries]
    labels = np.array([index[e[1]] for e in entries], dtype=np.int64)
    return names, labels, classes


def list_folder(root: str | os.PathLike, subdir: str | None = None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """(relative image paths, labels, classes) of an image folder ``root/[subdir/]<class>/<file>``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    rel = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and _is_image(p.name)]
    return _labelled(rel, str(root), subdir)


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"archive {str(path)!r} does not exist")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"archive {str(path)!r} is not a readable zip file ({e})") from e


def list_zip(path: str | os.PathLike, subdir: str | None = None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """(entry names, labels, classes) of a zipped image folder ``[subdir/]<class>/<file>``."""
    with _open_zip(path) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir() and _is_image(i.filename)]
    return _labelled(names, str(path), subdir)


def read_zip_bytes(path: str | os.PathLike, names: Sequence[str]) -> list[bytes]:
    """The raw bytes of the given entries; a damaged entry raises ValueError naming it."""
    out = []
    with _open_zip(path) as zf:
        for n in names:
            try:
                out.append(zf.read(n))
            except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
                raise ValueError(f"archive {str(path)!r}: entry {n!r} cannot be read ({e})") from e
    return out


def _decode_one(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises several types for broken files
        raise ValueError(f"image {name!r} cannot be decoded ({type(e).__name__}: {e})") from e


_POOL_BLOBS: Sequence[bytes] = ()
_POOL_NAMES: Sequence[str] = ()


def _decode_span(span: tuple[int, int]) -> np.ndarray:
    lo, hi = span
    arrays = [_decode_one(_POOL_BLOBS[i], _POOL_NAMES[i]) for i in range(lo, hi)]
    for i, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise ValueError(
                f"image {_POOL_NAMES[lo + i]!r} has shape {a.shape}, {_POOL_NAMES[lo]!r} has {arrays[0].shape}; "
                "all images of a set must have one size"
            )
    return np.stack(arrays)


def decode_images(blobs: Sequence[bytes], names: Sequence[str] | None = None, workers: int | None = None) -> np.ndarray:
    """Decode encoded images (JPEG, PNG, ...) to one uint8 (N, H, W, 3) array.

    With ``workers`` > 1 (default: the number of CPUs, up to 16) and enough images, a pool of
    forked processes decodes chunks in parallel (about 0.1 ms per 32x32 JPEG per core). All
    images must have the same size.
    """
    global _POOL_BLOBS, _POOL_NAMES
    import multiprocessing as mp

    n = len(blobs)
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    if n == 0:
        raise ValueError("no images to decode")
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    chunk = 1000
    spans = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    _POOL_BLOBS, _POOL_NAMES = blobs, names
    try:
        if workers > 1 and len(spans) > 1 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(min(workers, len(spans))) as pool:
                parts = pool.map(_decode_span, spans)
        else:
            parts = [_decode_span(s) for s in spans]
    finally:
        _POOL_BLOBS, _POOL_NAMES = (), ()
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size ({sorted(shapes)}); all images of a set must have one size")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def read_folder(root: str | os.PathLike, subdir: str | None = None, workers: int | None = None) -> ImageArrays:
    """Decode an image folder ``root/[subdir/]<class>/<file>`` (classes sorted = label index)."""
    names, labels, classes = list_folder(root, subdir)
    blobs = [(Path(root) / n).read_bytes() for n in names]
    return ImageArrays(decode_images(blobs, names, workers), labels, classes, tuple(names))


def read_zip(path: str | os.PathLike, subdir: str | None = None, workers: int | None = None) -> ImageArrays:
    """Decode a zipped image folder ``[subdir/]<class>/<file>`` (classes sorted = label index)."""
    names, labels, classes = list_zip(path, subdir)
    blobs = read_zip_bytes(path, names)
    return ImageArrays(decode_images(blobs, names, workers), labels, classes, tuple(names))


def load_images(path: str | os.PathLike, subdir: str | None = None, workers: int | None = None) -> ImageArrays:
    """Read an image set from a folder, a ``.zip`` of one, or a packed ``.npz`` (see
    :func:`diffquant.data.pack_jpeg_zip`), chosen by what ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return read_folder(p, subdir, workers)
    if not p.exists():
        raise ValueError(f"dataset {str(p)!r} does not exist (expected an image folder, a .zip or a packed .npz)")
    if p.suffix.lower() == ".npz":
        from diffquant.data.packed import read_packed

        if subdir is not None:
            raise ValueError("subdir applies to folders and zip archives, not to a packed .npz")
        return read_packed(p, workers)
    if p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
        return read_zip(p, subdir, workers)
    raise ValueError(f"dataset {str(p)!r}: unknown kind (expected an image folder, a .zip or a packed .npz)")
