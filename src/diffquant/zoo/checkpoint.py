"""Checkpoint files of the zoo's training recipes: safetensors + JSON, never pickle.

* :func:`save_sharded` / :func:`load_sharded`: a state dict split into safetensors shards of at
  most ``max_shard_bytes`` (``NAME-00001-of-00003.safetensors``) with an index ``NAME.index.json``
  — what comes back from the GPU machine must fit in files of <= 16 MiB.
* :func:`save_state` / :func:`load_state`: tensors (one safetensors file, or shards) + a JSON
  document, written atomically into a folder (a temporary folder renamed into place).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_sharded(tensors: dict[str, torch.Tensor], folder: str | Path, name: str = "model",
                 max_shard_bytes: int = 15 * MiB, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``tensors`` as safetensors shards of at most ``max_shard_bytes`` each (a single
    tensor larger than that gets a shard of its own) plus ``NAME.index.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += _nbytes(t)
    n = len(shards)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"{name}.safetensors" if n == 1 else f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt", **(metadata or {})})
        files.append(folder / fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values()), **(metadata or {})},
             "weight_map": weight_map}
    (folder / f"{name}.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return files


def load_sharded(folder: str | Path, name: str = "model") -> dict[str, torch.Tensor]:
    """Read what :func:`save_sharded` wrote (or a plain ``NAME.safetensors``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index_path = folder / f"{name}.index.json"
    if index_path.is_file():
        try:
            files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index_path}: not a shard index ({e})") from e
    elif (folder / f"{name}.safetensors").is_file():
        files = [f"{name}.safetensors"]
    else:
        raise ValueError(f"no checkpoint {name!r} in {str(folder)!r} (expected {name}.index.json or {name}.safetensors)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        p = folder / f
        if not p.is_file():
            raise ValueError(f"checkpoint shard {str(p)!r} is missing")
        try:
            out.update(load_file(str(p)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"checkpoint shard {str(p)!r} cannot be read ({e})") from e
    return out


def save_state(folder: str | Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any],
               name: str = "state", max_shard_bytes: int | None = None) -> Path:
    """Atomically write ``tensors`` + ``NAME.json`` into ``folder`` (replacing what was there)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_sharded(tensors, tmp, name, max_shard_bytes=max_shard_bytes or (1 << 62))
    (tmp / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_state(folder: str | Path, name: str = "state") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = Path(folder)
    doc_path = folder / f"{name}.json"
    if not doc_path.is_file():
        raise ValueError(f"no checkpoint in {str(folder)!r} (missing {name}.json)")
    try:
        doc = json.loads(doc_path.read_text())
    except ValueError as e:
        raise ValueError(f"{doc_path}: not valid JSON ({e})") from e
    return load_sharded(folder, name), doc
