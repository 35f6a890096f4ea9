"""Bit packing of integer codes: 2-bit codes four per byte, 3- and 4-bit codes two per byte,
5- to 8-bit codes one per byte. Codes are unsigned (``q - qmin``); element ``i`` of a group goes
to bits ``[i*w, (i+1)*w)`` of its byte (little-endian within the byte)."""
from __future__ import annotations

import torch


def container_bits(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}; packing supports 1..8")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of packed codes (values must lie in [0, 2^bits))."""
    w = container_bits(bits)
    c = codes.reshape(-1).to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing; got [{int(c.min())}, {int(c.max())}]")
    per = 8 // w
    pad = (-c.numel()) % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, per)
    out = torch.zeros(c.shape[0], dtype=torch.int32, device=c.device)
    for i in range(per):
        out |= c[:, i] << (i * w)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes, ``numel`` of them."""
    w = container_bits(bits)
    per = 8 // w
    p = packed.reshape(-1).to(torch.int32)
    if p.numel() * per < numel:
        raise ValueError(f"packed tensor holds {p.numel() * per} codes; {numel} needed")
    mask = (1 << w) - 1
    parts = [(p >> (i * w)) & mask for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel].to(torch.uint8)
