"""``diffquant data``: inspect and pack image datasets (folders, zips, packed .npz)."""
from __future__ import annotations

import time

import click

from diffquant.commands._common import emit_json, fail


@click.group("data")
def command() -> None:
    """Image datasets: pack a zipped JPEG folder for the GPU machine, inspect a dataset."""


@command.command("pack")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--subdir", default=None, help="Only images under this folder of the archive (e.g. 'train').")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check that every re-assembled file equals the original bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pack(src: str, out: str, subdir: str | None, verify: bool, as_json: bool) -> None:
    """Pack SRC.zip (a zipped <class>/<file>.jpg folder) into OUT.npz: shared JPEG headers stored
    once, exact bytes recovered on reading (pixels bit-identical to the zip)."""
    from diffquant.data import list_zip, pack_jpeg_zip, unpack_jpeg_bytes
    from diffquant.data.folders import read_zip_bytes

    t0 = time.perf_counter()
    try:
        summary = pack_jpeg_zip(src, out, subdir=subdir)
        if verify:
            names, _, _ = list_zip(src, subdir)
            if unpack_jpeg_bytes(out) != read_zip_bytes(src, names):
                fail(f"verification failed: {out} does not re-assemble the bytes of {src}")
            summary["verified"] = True
    except ValueError as e:
        fail(str(e))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"packed {summary['count']} images from {src} ({summary['source_bytes'] / 1e6:.1f} MB) into {out} "
            f"({summary['packed_bytes'] / 1e6:.1f} MB, {summary['headers']} distinct header(s))"
            + (", bytes verified" if verify else "")
        )


@command.command("info")
@click.argument("path", type=click.Path())
@click.option("--subdir", default=None, help="Only images under this folder (folders and zips).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(path: str, subdir: str | None, as_json: bool) -> None:
    """Decode a dataset (folder, .zip or packed .npz) and print its size, classes and pixel statistics."""
    import numpy as np

    from diffquant.data import load_images

    t0 = time.perf_counter()
    try:
        d = load_images(path, subdir=subdir)
    except ValueError as e:
        fail(str(e))
    x = d.images.astype(np.float64) / 255.0
    summary = {
        "path": path,
        "count": len(d),
        "shape": list(d.images.shape[1:]),
        "classes": list(d.classes),
        "per_class": np.bincount(d.labels, minlength=len(d.classes)).tolist(),
        "channel_mean": x.mean(axis=(0, 1, 2)).round(4).tolist(),
        "channel_std": x.std(axis=(0, 1, 2)).round(4).tolist(),
        "decode_seconds": round(time.perf_counter() - t0, 2),
    }
    if as_json:
        emit_json(summary)
    else:
        for k, v in summary.items():
            click.echo(f"{k:>15}: {v}")
