"""Reconstruction units of a quantized model and the caching of their inputs and targets.

A *unit* is what block reconstruction optimises at once: every diffusers ``ResnetBlock2D`` and
``Attention`` (or ``BasicTransformerBlock``) is a block; every quantized layer outside those
(time embedding, conv_in/conv_out, down/up-samplers) is a unit of its own. Units are returned in
the order the model first calls them.

Inputs and targets are captured with forward hooks that stop the forward pass right after the unit
(no work is spent on the rest of the network), one calibration batch at a time, into tensors
preallocated on the cache device; the total size is checked against a budget before anything is
allocated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from diffquant.calibration.capture import CalibrationSet
from diffquant.models.adapter import call_model
from diffquant.nn.modules import QUANT_LAYER_TYPES, QuantMatMul

log = logging.getLogger(__name__)

BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock")


@dataclass
class Unit:
    name: str
    kind: str  # "block" | "layer"
    module: nn.Module

    def quant_layers(self) -> list[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, QUANT_LAYER_TYPES)]

    def weight_quantizers(self):
        return [wq for m in self.quant_layers() for wq in m.weight_quantizers() if wq.enabled]

    def act_quantizers(self):
        out = []
        for m in self.module.modules():
            if isinstance(m, QUANT_LAYER_TYPES) or isinstance(m, QuantMatMul):
                out.extend(q for q in m.act_quantizers() if q.enabled)
        return out


class _Stop(Exception):
    pass


def find_units(model: nn.Module, example: tuple) -> list[Unit]:
    """Reconstruction units of a quantized model in forward order."""
    blocks: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if type(m).__name__ in BLOCK_TYPES and any(isinstance(c, QUANT_LAYER_TYPES) for c in m.modules()):
            if not any(name.startswith(b + ".") for b in blocks):  # outermost block only
                blocks[name] = m
    candidates: dict[str, Unit] = {n: Unit(n, "block", m) for n, m in blocks.items()}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES) and not any(name.startswith(b + ".") for b in blocks):
            candidates[name] = Unit(name, "layer", m)
    order: list[str] = []
    from diffquant.quantize import float_mode

    handles = [u.module.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, u in candidates.items()]
    try:
        x, t, cond = example
        with torch.no_grad(), float_mode(model):  # the trace only needs the call order
            call_model(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    missing = set(candidates) - set(order)
    if missing:
        raise RuntimeError(f"units never called in a forward pass: {sorted(missing)[:5]}")
    return [candidates[n] for n in order]


def _tensor_bytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass
class UnitData:
    """Cached inputs (positional + keyword, batched along dim 0) and targets of one unit."""

    args: list[Any]
    kwargs: dict[str, Any]
    target: Optional[torch.Tensor]
    n: int
    tensor_arg_idx: list[int] = field(default_factory=list)
    tensor_kw: list[str] = field(default_factory=list)

    def batch(self, idx: torch.Tensor) -> tuple[list, dict, Optional[torch.Tensor]]:
        args = [a[idx] if i in self.tensor_arg_idx else a for i, a in enumerate(self.args)]
        kwargs = {k: (v[idx] if k in self.tensor_kw else v) for k, v in self.kwargs.items()}
        return args, kwargs, (self.target[idx] if self.target is not None else None)


@torch.no_grad()
def capture_unit_data(
    qmodel: nn.Module,
    qunit: nn.Module,
    fp_model: Optional[nn.Module],
    fp_unit: Optional[nn.Module],
    calib: CalibrationSet,
    *,
    batch_size: int,
    device: Any,
    cache_device: Any,
    max_bytes: int,
    dtype: torch.dtype = torch.float32,
) -> UnitData:
    """Inputs of ``qunit`` inside ``qmodel`` (earlier units already quantized) and outputs of
    ``fp_unit`` inside ``fp_model`` (the full-precision target), for every calibration row."""
    n = len(calib)
    store: dict[str, Any] = {}

    def pre_hook(mod, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs
        raise _Stop

    def out_hook(mod, args, output):
        store["out"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _Stop

    data: Optional[UnitData] = None
    targets: Optional[torch.Tensor] = None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x, t, cond = calib.batch(idx, device)
        h = qunit.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            call_model(qmodel, x, t, cond)
        except _Stop:
            pass
        finally:
            h.remove()
        if "args" not in store:
            raise RuntimeError("the unit was not reached by the forward pass")
        args, kwargs = store.pop("args"), store.pop("kwargs")
        if fp_unit is not None:
            h = fp_unit.register_forward_hook(out_hook)
            try:
                call_model(fp_model, x, t, cond)
            except _Stop:
                pass
            finally:
                h.remove()
            out = store.pop("out")
        else:
            out = None
        if data is None:
            t_idx = [i for i, a in enumerate(args) if torch.is_tensor(a)]
            t_kw = [k for k, v in kwargs.items() if torch.is_tensor(v)]
            need = sum(_tensor_bytes((n, *args[i].shape[1:]), dtype) for i in t_idx)
            need += sum(_tensor_bytes((n, *kwargs[k].shape[1:]), dtype) for k in t_kw)
            if out is not None:
                need += _tensor_bytes((n, *out.shape[1:]), dtype)
            if need > max_bytes:
                raise MemoryError(
                    f"caching {n} inputs/targets of this unit needs {need / 2**30:.2f} GiB > the cache budget "
                    f"{max_bytes / 2**30:.2f} GiB; use fewer calibration rows or raise max_cache_bytes"
                )
            def alloc(v):
                dt = dtype if v.is_floating_point() else v.dtype
                return torch.empty((n, *v.shape[1:]), dtype=dt, device=cache_device)

            a_store = [alloc(a) if i in t_idx else a for i, a in enumerate(args)]
            k_store = {k: (alloc(v) if k in t_kw else v) for k, v in kwargs.items()}
            if out is not None:
                targets = torch.empty((n, *out.shape[1:]), dtype=dtype, device=cache_device)
            data = UnitData(a_store, k_store, targets, n, t_idx, t_kw)
        for i in data.tensor_arg_idx:
            data.args[i][idx] = args[i].to(cache_device, data.args[i].dtype)
        for k in data.tensor_kw:
            data.kwargs[k][idx] = kwargs[k].to(cache_device, data.kwargs[k].dtype)
        if out is not None:
            data.target[idx] = out.to(cache_device, dtype)
    assert data is not None
    return data
