"""Packed JPEG sets: the JPEG header (everything up to and including the start-of-scan segment)
is stored once, and each image keeps only its remaining bytes.

All 60,000 CIFAR-10-JPEG files share one 623-byte header, so the train split packs into ~15 MB
instead of the 52 MB zip — small enough to travel to the GPU machine with the checkout. Decoding
re-assembles each file's exact original bytes, so pixels are bit-identical to reading the zip.

File layout (``np.savez_compressed``, loaded with ``allow_pickle=False``):

=================  =========================================================================
``format``         the string ``"diffquant-packed-jpeg-v1"``
``headers``        uint8, the distinct headers concatenated; ``header_offsets`` int64 (H+1,)
``header_index``   int32 (N,): which header each image uses
``payload``        uint8, each image's bytes after its header, concatenated; ``offsets`` int64 (N+1,)
``labels``         int64 (N,); ``classes`` str (C,); ``names`` str (N,) (entry names in the source)
``meta``           JSON string: source file name, its size and sha256, image count
=================  =========================================================================
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from diffquant.data.folders import ImageArrays, decode_images, list_zip, read_zip_bytes

PACKED_FORMAT = "diffquant-packed-jpeg-v1"
_KEYS = ("format", "headers", "header_offsets", "header_index", "payload", "offsets", "labels", "classes", "names")


def jpeg_header_length(data: bytes, name: str = "image") -> int:
    """Length of a JPEG's header: SOI and every marker segment up to and including the first SOS."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError(f"{name}: not a JPEG file (no SOI marker)")
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"{name}: malformed JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers carry no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        end = i + 2 + length
        if length < 2 or end > n:
            raise ValueError(f"{name}: truncated JPEG segment at byte {i}")
        if marker == 0xDA:  # start of scan: the header ends here
            return end
        i = end
    raise ValueError(f"{name}: JPEG has no start-of-scan segment")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_jpeg_zip(src: str | os.PathLike, out: str | os.PathLike, subdir: str | None = None) -> dict:
    """Pack a zipped folder of JPEG files (``[subdir/]<class>/<file>.jpg``) into ``out`` (.npz).

    Returns a summary dict (counts, sizes). Raises ValueError for a missing/corrupt archive or a
    file that is not a JPEG.
    """
    src, out = Path(src), Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"packed output must end in .npz; got {str(out)!r}")
    names, labels, classes = list_zip(src, subdir)
    blobs = read_zip_bytes(src, names)
    header_ids: dict[bytes, int] = {}
    header_index = np.empty(len(blobs), dtype=np.int32)
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    bodies = []
    for k, (name, b) in enumerate(zip(names, blobs)):
        h = jpeg_header_length(b, name)
        header_index[k] = header_ids.setdefault(b[:h], len(header_ids))
        bodies.append(b[h:])
        offsets[k + 1] = offsets[k] + len(b) - h
    headers = list(header_ids)
    header_offsets = np.zeros(len(headers) + 1, dtype=np.int64)
    header_offsets[1:] = np.cumsum([len(h) for h in headers])
    meta = {
        "source": src.name,
        "source_bytes": src.stat().st_size,
        "source_sha256": _sha256(src),
        "subdir": subdir,
        "count": len(blobs),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        format=np.array(PACKED_FORMAT),
        headers=np.frombuffer(b"".join(headers), dtype=np.uint8),
        header_offsets=header_offsets,
        header_index=header_index,
        payload=np.frombuffer(b"".join(bodies), dtype=np.uint8),
        offsets=offsets,
        labels=labels,
        classes=np.array(classes),
        names=np.array(names),
        meta=np.array(json.dumps(meta)),
    )
    tmp.replace(out)
    return {**meta, "headers": len(headers), "packed_bytes": out.stat().st_size, "out": str(out)}


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"packed dataset {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a packed image set (missing {missing})")
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"cannot read packed dataset {str(path)!r}: {e}") from e
    except (OSError, EOFError, KeyError) as e:
        raise ValueError(f"cannot read packed dataset {str(path)!r}: {e}") from e
    if str(arrays["format"]) != PACKED_FORMAT:
        raise ValueError(f"{path}: unknown packed format {str(arrays['format'])!r}; expected {PACKED_FORMAT!r}")
    n = arrays["labels"].shape[0]
    if arrays["offsets"].shape != (n + 1,) or arrays["header_index"].shape != (n,) or int(arrays["offsets"][-1]) != arrays["payload"].size:
        raise ValueError(f"{path}: packed dataset is inconsistent (offsets/labels/payload sizes disagree)")
    return arrays


def unpack_jpeg_bytes(path: str | os.PathLike, indices: Sequence[int] | None = None) -> list[bytes]:
    """The original JPEG files (exact bytes) of a packed set, in stored order (or ``indices``)."""
    a = _load_arrays(Path(path))
    return _assemble(a, indices)


def _assemble(a: dict[str, np.ndarray], indices: Sequence[int] | None) -> list[bytes]:
    headers, hoff = a["headers"].tobytes(), a["header_offsets"]
    heads = [headers[hoff[i] : hoff[i + 1]] for i in range(len(hoff) - 1)]
    payload, off, hidx = a["payload"].tobytes(), a["offsets"], a["header_index"]
    idx = range(len(hidx)) if indices is None else indices
    return [heads[hidx[i]] + payload[off[i] : off[i + 1]] for i in idx]


def read_packed(path: str | os.PathLike, workers: int | None = None) -> ImageArrays:
    """Decode a packed set to uint8 (N, H, W, 3) images and int64 labels."""
    path = Path(path)
    a = _load_arrays(path)
    blobs = _assemble(a, None)
    names = tuple(str(s) for s in a["names"])
    images = decode_images(blobs, names, workers)
    return ImageArrays(images, a["labels"].astype(np.int64), tuple(str(c) for c in a["classes"]), names)
