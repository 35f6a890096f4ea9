"""AdaRound (Nagel et al. 2020) as used by BRECQ and Q-Diffusion.

A weight ``w`` with qparams ``(s, z)`` is written as ``floor(w/s) + h(alpha)`` on the grid, where
``h`` is the rectified sigmoid ``clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` with
zeta = 1.1, gamma = -0.1. ``alpha`` starts where ``h(alpha)`` equals the fractional part of
``w/s`` (so the soft weight starts at the float weight), is optimised against the block's output
error plus ``lambda * sum(1 - |2h - 1|^beta)``, and is finally rounded hard: ``h = [alpha >= 0]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_alpha(w_over_s: torch.Tensor) -> torch.Tensor:
    """alpha with ``rectified_sigmoid(alpha) == frac(w/s)`` (fractional part in [0, 1))."""
    rest = w_over_s - torch.floor(w_over_s)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def round_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(alpha) - 1|^beta): zero once every h is exactly 0 or 1."""
    h = rectified_sigmoid(alpha)
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """beta held at ``start`` (regulariser off) during the warm-up fraction, then decayed linearly
    from ``start`` to ``end`` over the remaining iterations (BRECQ's LinearTempDecay). ``it`` is the
    1-based iteration count, as in BRECQ/Q-Diffusion."""

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    @property
    def warmup_iters(self) -> int:
        return int(self.warmup * self.iters)

    def regularizer_on(self, it: int) -> bool:
        return it >= self.warmup_iters

    def beta(self, it: int) -> float:
        w = self.warmup_iters
        if it < w:
            return self.start
        rel = (it - w) / max(self.iters - w, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


def hard_codes(w_over_s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Integer offsets from the floor chosen by AdaRound's final hard rounding."""
    return torch.floor(w_over_s) + (alpha >= 0).to(w_over_s.dtype)

