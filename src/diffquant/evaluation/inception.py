"""The Inception-v3 network used for FID (the TensorFlow 2015-12-05 graph as ported by pytorch-fid).

Written for diffquant from the published architecture; no torchvision. Module and parameter names
follow the layout of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (also used by
torch-fidelity), so that file loads with ``strict=True``:

    Conv2d_1a_3x3.conv.weight, Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}, ...
    Mixed_5b.branch1x1.conv.weight, ..., Mixed_7c.branch_pool.bn.running_var, fc.weight, fc.bias

What makes this the *FID* variant rather than the ImageNet classifier of torchvision:

* the pooling branch of the 35x35 (A), 17x17 (C) and first 8x8 (E) blocks averages over a 3x3
  window **without counting the zero padding** (TensorFlow's behaviour);
* the pooling branch of the last block (``Mixed_7c``) uses **max** pooling, not average pooling;
* the classifier has 1008 outputs (the 2015 graph), and the FID features are the 2048-d global
  average pool of ``Mixed_7c`` ("pool3").

Input: float NCHW in [0, 1]; resized to 299x299 with bilinear interpolation
(``align_corners=False``, no antialiasing — pytorch-fid's choice) and mapped to [-1, 1].

Weights are never downloaded. :func:`load_inception_state_dict` reads a local file: ``.safetensors``
directly, ``.pth``/``.pt`` only through ``torch.load(..., weights_only=True)`` (the restricted
unpickler: tensors and plain containers, no arbitrary code), and checks the SHA-256 against the hash
prefix that the standard file name carries.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "FIDInceptionV3",
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_NUM_CLASSES",
    "KNOWN_WEIGHTS",
    "load_inception_state_dict",
    "fid_inception_v3",
    "sha256_file",
]

INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1008
INPUT_SIZE = 299

#: SHA-256 prefixes of known FID Inception weight files -> description. pytorch-fid publishes its
#: file as ``pt_inception-2015-12-05-6726825d.pth``; by the torch.hub convention the suffix is the
#: first 8 hex digits of the file's SHA-256.
KNOWN_WEIGHTS: dict[str, str] = {
    "6726825d": "pytorch-fid pt_inception-2015-12-05 (TF Inception 2015-12-05 graph, FID variant)",
}

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|safetensors)$")


class _ConvBN(nn.Module):
    """Convolution (no bias) + batch norm (eps 1e-3, the TF value) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3_no_pad(x: Tensor) -> Tensor:
    # TF average pooling: padded positions are not counted in the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3_same(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max3_reduce(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=2)


class _Block35(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, cin: int, pool_out: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class _Reduce35to17(nn.Module):
    """Grid reduction 35->17 (Mixed_6a): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, _max3_reduce(x)], dim=1)


class _Block17(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        row, col = (1, 7), (7, 1)
        prow, pcol = (0, 3), (3, 0)
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, mid, 1)
        self.branch7x7_2 = _ConvBN(mid, mid, row, padding=prow)
        self.branch7x7_3 = _ConvBN(mid, 192, col, padding=pcol)
        self.branch7x7dbl_1 = _ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = _ConvBN(mid, mid, col, padding=pcol)
        self.branch7x7dbl_3 = _ConvBN(mid, mid, row, padding=prow)
        self.branch7x7dbl_4 = _ConvBN(mid, mid, col, padding=pcol)
        self.branch7x7dbl_5 = _ConvBN(mid, 192, row, padding=prow)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3_no_pad(x))
        return torch.cat([a, b, c, d], dim=1)


class _Reduce17to8(nn.Module):
    """Grid reduction 17->8 (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, _max3_reduce(x)], dim=1)


class _Block8(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3/3x1 outputs; ``pool`` is the FID-specific
    choice of pooling in the last branch (average without padding for 7b, max for 7c)."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max'; got {pool!r}")
        self._pool = _avg3_no_pad if pool == "avg" else _max3_same
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        s = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], dim=1)
        d = self.branch_pool(self._pool(x))
        return torch.cat([a, b, c, d], dim=1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. ``features(x)`` -> (N, 2048) pool3; ``forward(x)`` -> (N, 1008) logits;
    ``features_and_logits(x)`` -> both from one pass. ``x``: float (N, 3, H, W) in [0, 1].

    Built with random weights; load real ones with :func:`fid_inception_v3` or
    ``load_state_dict(load_inception_state_dict(path))``.
    """

    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(self, resize_input: bool = True) -> None:
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Block35(192, 32)
        self.Mixed_5c = _Block35(256, 64)
        self.Mixed_5d = _Block35(288, 64)
        self.Mixed_6a = _Reduce35to17(288)
        self.Mixed_6b = _Block17(768, 128)
        self.Mixed_6c = _Block17(768, 160)
        self.Mixed_6d = _Block17(768, 160)
        self.Mixed_6e = _Block17(768, 192)
        self.Mixed_7a = _Reduce17to8(768)
        self.Mixed_7b = _Block8(1280, pool="avg")
        self.Mixed_7c = _Block8(2048, pool="max")
        self.fc = nn.Linear(INCEPTION_FEATURE_DIM, INCEPTION_NUM_CLASSES)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (N, 3, H, W) input in [0, 1]; got shape {tuple(x.shape)}")
        x = x.to(self.fc.weight.dtype)
        if self.resize_input and tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def features(self, x: Tensor) -> Tensor:
        x = self._prepare(x)
        for stage in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = stage(x)
        x = _max3_reduce(x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max3_reduce(x)
        for stage in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = stage(x)
        return x.mean(dim=(2, 3))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.fc(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _missing_weights_error(path: str | Path | None) -> ValueError:
    where = "no path was given" if path is None else f"{str(path)!r} does not exist"
    return ValueError(
        f"FID/IS/KID with the Inception network need its weights, and {where}. diffquant never downloads "
        "them: obtain pytorch-fid's 'pt_inception-2015-12-05-6726825d.pth' (or a safetensors conversion of it) "
        "and pass its path (CLI: --inception-weights PATH). The zoo metrics (fd_cifar, kid_cifar, pr_cifar, "
        "is_cifar) need no Inception weights."
    )


def verify_weights_file(path: str | Path, verify: bool = True) -> str:
    """SHA-256 of ``path``; with ``verify``, a file whose name carries a hash prefix (``name-<hex>.pth``)
    must match it. Returns the hex digest."""
    path = Path(path)
    digest = sha256_file(path)
    m = _HASH_IN_NAME.search(path.name)
    if m and verify and not digest.startswith(m.group(1)):
        raise ValueError(
            f"{path}: SHA-256 {digest} does not start with {m.group(1)!r}, the hash its file name declares; "
            "the file is corrupt or truncated (download it again), or pass verify=False / --no-verify-inception "
            "if you converted it yourself"
        )
    known = next((desc for prefix, desc in KNOWN_WEIGHTS.items() if digest.startswith(prefix)), None)
    if known:
        log.info("Inception weights %s: SHA-256 %s matches %s", path, digest, known)
    else:
        log.warning(
            "Inception weights %s (SHA-256 %s) are not a known FID file; scores are comparable with published "
            "FIDs only if these are the standard 2015-12-05 weights", path, digest,
        )
    return digest


def load_inception_state_dict(path: str | Path, verify: bool = True) -> dict[str, Tensor]:
    """Read FID Inception weights from a local ``.safetensors`` or ``.pth``/``.pt`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` only (no arbitrary unpickling).
    Missing BatchNorm ``num_batches_tracked`` counters (files saved before PyTorch 0.4.1) are filled
    with zeros, so that the result loads into :class:`FIDInceptionV3` with ``strict=True``.
    """
    if path is None or not Path(path).is_file():
        raise _missing_weights_error(path)
    path = Path(path)
    verify_weights_file(path, verify=verify)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler refuses anything that is not plain tensors
            raise ValueError(
                f"{path}: cannot be read as a plain tensor state dict with torch.load(weights_only=True) "
                f"({type(e).__name__}: {e}); diffquant never unpickles arbitrary objects"
            ) from e
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    else:
        raise ValueError(f"{path}: unsupported weights format {suffix!r}; allowed: .safetensors, .pth, .pt, .bin")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    state = dict(state)
    for key in [k for k in state if k.endswith(".bn.running_var")]:
        nbt = key[: -len("running_var")] + "num_batches_tracked"
        state.setdefault(nbt, torch.tensor(0, dtype=torch.long))
    return state


def fid_inception_v3(weights: str | Path | None, device: str | torch.device = "cpu", verify: bool = True) -> FIDInceptionV3:
    """FID Inception-v3 with weights from the local file ``weights``, in eval mode on ``device``."""
    state = load_inception_state_dict(weights, verify=verify) if weights is not None else None
    if state is None:
        raise _missing_weights_error(None)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: not an FID Inception-v3 state dict (pytorch-fid layout): {e}") from e
    model.requires_grad_(False)
    return model.to(device).eval()
