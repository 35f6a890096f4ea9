"""CPU int8 inference through PyTorch's own PTQ stack: torchao's pt2e flow with the X86 Inductor quantizer.

The classic PyTorch post-training quantization recipe on x86: ``torch.export`` the denoiser, ``prepare_pt2e``
with ``X86InductorQuantizer`` (static per-tensor uint8 activations, per-channel int8 weights), calibrate the
observers on diffquant's time-step-aware calibration set, ``convert_pt2e``, and compile with Inductor and
freezing, which prepacks the int8 weights and fuses quantize/dequantize into oneDNN int8 convolutions and
linears. The result is a module with the denoiser's call shape, usable by diffquant's samplers.

The activation ranges come from the pt2e observers run on the same calibration data, not from a diffquant
fake-quant model (the two schemes differ in detail; BENCHMARKS.md compares both against fp32). Needs the optional
``torchao`` package (``pip install torchao``); unconditional and class-conditional ``UNet2DModel`` denoisers.
:mod:`diffquant.kernels.cpu` is the other CPU path (oneDNN ops called directly, diffquant's own scales).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# diffusers' UNet2DModel exports with a dynamic batch only inside this range (a guard of its attention reshapes)
EXPORT_BATCH = (2, 63)
# batch sizes compiled up front: Inductor guards the batch of its CPU convolutions at 2..15 and 16..63 (torch 2.13)
WARMUP_BATCHES = (3, 16)


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (``torch.cpu._is_vnni_supported``): int8 dot products that add u8 x s8 products
    in 32 bits. Without it, oneDNN's int8 kernels sum pairs of products in saturating 16-bit integers (AVX2's
    ``vpmaddubsw``), and full-range uint8 activations overflow them."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


def torchao_available() -> bool:
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except Exception:
        return False
    return True


class _Eps(nn.Module):
    """(x, t[, class_labels]) -> model output tensor: the exportable call of a diffusers UNet2DModel."""

    def __init__(self, unet: nn.Module, conditional: bool):
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.conditional:
            return self.unet(x, t, class_labels=class_labels).sample
        return self.unet(x, t).sample


class Pt2eInt8Denoiser(nn.Module):
    """A pt2e-converted (and usually Inductor-compiled) int8 denoiser with the call shape of the original:
    ``model(x, t, class_labels=None)`` returns the output tensor. Batches outside the exported range are
    padded (batch 1) or split (more than 63), so any batch size works."""

    def __init__(self, program: Any, config: Any, conditional: bool, compiled: bool, reduce_range: bool = False):
        super().__init__()
        self.program = program
        self.config = config
        self.conditional = conditional
        self.compiled = compiled
        self.reduce_range = reduce_range  # 7-bit activations (see quantize_pt2e_x86)
        self._device_probe = nn.Parameter(torch.zeros(1), requires_grad=False)  # samplers read the device

    def _run(self, x, t, c):
        args = (x, t, c) if self.conditional else (x, t)
        if not self.compiled:
            return self.program(*args)
        import torch._inductor.config as icfg

        with icfg.patch(freezing=True):  # recompilations (other batch sizes) keep the int8 weight prepacking
            return self.program(*args)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None, **_: Any):
        if self.conditional and class_labels is None:
            raise ValueError("this denoiser is class-conditional: pass class_labels")
        n = x.shape[0]
        t = (t if torch.is_tensor(t) else torch.tensor(t)).float().reshape(-1).expand(n).contiguous()
        lo, hi = EXPORT_BATCH
        if n < lo:
            pad = lo - n
            xp = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
            tp = torch.cat([t, t[:1].expand(pad)])
            cp = torch.cat([class_labels, class_labels[:1].expand(pad)]) if self.conditional else None
            return self._run(xp, tp, cp)[:n]
        if n > hi:
            parts = [self.forward(x[s:s + hi], t[s:s + hi], class_labels[s:s + hi] if self.conditional else None)
                     for s in range(0, n, hi)]
            return torch.cat(parts)
        return self._run(x, t, class_labels)


def quantize_pt2e_x86(model: nn.Module, calib, *, batch_size: int = 32, compile: bool = True,
                      reduce_range: Optional[bool] = None) -> Pt2eInt8Denoiser:
    """Int8 ``model`` for x86 CPUs through torchao's pt2e flow, calibrated on the CalibrationSet ``calib``
    (see the module docstring). ``compile``: Inductor with freezing (the fast path); False leaves the
    converted graph eager (reference numerics, slow). ``reduce_range``: activations quantized to 0..127 instead of
    0..255, as torchao advises for CPUs without VNNI; None (the default): on exactly when :func:`cpu_has_vnni` says
    the CPU lacks it. On a 2-core AMD EPYC with AVX2 and no VNNI (2026-11-29), the compiled full-range model was
    21.8 % (relative L2) from the uncompiled one, whose reference numerics do not saturate; see BENCHMARKS.md "CPU
    int8 through PyTorch's pt2e flow"."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ImportError(f"quantize_pt2e_x86 needs torchao (pip install torchao): {e}") from e
    if calib is None or len(calib) < EXPORT_BATCH[0]:
        raise ValueError(f"quantize_pt2e_x86 needs a calibration set of at least {EXPORT_BATCH[0]} rows")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_pt2e_x86 builds a CPU model; move the model to the CPU first")
    conditional = bool(getattr(getattr(model, "config", None), "num_class_embeds", None))
    if conditional and "class_labels" not in calib.cond:
        raise ValueError("a class-conditional model needs class_labels in the calibration set")
    batch_size = max(EXPORT_BATCH[0], min(batch_size, EXPORT_BATCH[1]))
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    eps = _Eps(model.eval(), conditional)

    def args_of(idx):
        x, t, cond = calib.batch(idx)
        a = (x.float(), t.float())
        return a + (cond["class_labels"],) if conditional else a

    ex = args_of(torch.arange(EXPORT_BATCH[0]))
    dim = torch.export.Dim("batch", min=EXPORT_BATCH[0], max=EXPORT_BATCH[1])
    shapes = tuple({0: dim} for _ in ex)
    exported = torch.export.export(eps, ex, dynamic_shapes=shapes)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    prepared = prepare_pt2e(exported.module(), quantizer)
    n = len(calib)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            if len(idx) < EXPORT_BATCH[0]:
                idx = torch.arange(max(0, n - EXPORT_BATCH[0]), n)
            prepared(*args_of(idx))
    converted = convert_pt2e(prepared)
    program: Any = converted
    if compile:
        import torch._inductor.config as icfg

        with icfg.patch(freezing=True):
            program = torch.compile(converted)
            with torch.no_grad():  # compile now, under freezing. Inductor's CPU convolutions guard the batch at
                for b in WARMUP_BATCHES:  # 2..15 and 16..63: one graph each, so sampling never recompiles
                    args = args_of(torch.arange(b) % n)
                    for a in args:
                        torch._dynamo.mark_dynamic(a, 0)
                    program(*args)
    log.info("pt2e int8 (X86InductorQuantizer): %d calibration rows, compiled=%s, reduce_range=%s", n, compile,
             reduce_range)
    return Pt2eInt8Denoiser(program, model.config, conditional, compile, reduce_range)


__all__ = ["EXPORT_BATCH", "Pt2eInt8Denoiser", "cpu_has_vnni", "quantize_pt2e_x86", "torchao_available"]
