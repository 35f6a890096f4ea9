"""Quantized layers: QuantConv2d, QuantLinear, QuantMatMul.

QuantConv2d / QuantLinear subclass the torch layers they replace (isinstance checks in model
code keep working) and reuse the original weight and bias parameters. Each has a weight quantizer
and an input-activation quantizer. With ``split`` set, a layer whose input is a channel-wise
concatenation ``cat([h, skip], dim=1)`` quantizes the two halves of its input, and the two
matching slices of its weight, with separate quantizers ("split shortcut", Q-Diffusion).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.config import QuantScheme
from diffquant.nn.quantizers import ActQuantizer, WeightQuantizer


class _QuantLayerMixin:
    split: Optional[int]
    weight: nn.Parameter

    def _setup_quantizers(
        self, w_scheme: Optional[QuantScheme], a_scheme: Optional[QuantScheme], name: str, split: Optional[int]
    ) -> None:
        in_dim = self.weight.shape[1]
        if split is not None and not (0 < split < in_dim):
            raise ValueError(f"{name}: split={split} must lie strictly inside the input channels (1..{in_dim - 1})")
        self.split = split
        self.layer_name = name
        if split is None:
            self.weight_quantizer = WeightQuantizer(w_scheme, self.weight.shape)
            self.act_quantizer = ActQuantizer(a_scheme, name=f"{name}.input")
        else:
            wa = self.weight[:, :split].shape
            wb = self.weight[:, split:].shape
            self.weight_quantizer = WeightQuantizer(w_scheme, wa)
            self.weight_quantizer_b = WeightQuantizer(w_scheme, wb)
            self.act_quantizer = ActQuantizer(a_scheme, name=f"{name}.input[:{split}]")
            self.act_quantizer_b = ActQuantizer(a_scheme, name=f"{name}.input[{split}:]")

    @torch.no_grad()
    def init_weight_qparams(self) -> None:
        if self.split is None:
            self.weight_quantizer.init_from(self.weight)
        else:
            self.weight_quantizer.init_from(self.weight[:, : self.split])
            self.weight_quantizer_b.init_from(self.weight[:, self.split :])

    def quantized_weight(self) -> torch.Tensor:
        if self.split is None:
            return self.weight_quantizer(self.weight)
        s = self.split
        return torch.cat([self.weight_quantizer(self.weight[:, :s]), self.weight_quantizer_b(self.weight[:, s:])], dim=1)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.act_quantizer(x)
        s = self.split
        # the channel axis is 1 for convs (N, C, H, W) and -1 for linears (..., C)
        dim = 1 if isinstance(self, nn.Conv2d) else -1
        a, b = x.narrow(dim, 0, s), x.narrow(dim, s, x.shape[dim] - s)
        return torch.cat([self.act_quantizer(a), self.act_quantizer_b(b)], dim=dim)

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [self.weight_quantizer] + ([self.weight_quantizer_b] if self.split is not None else [])

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.act_quantizer] + ([self.act_quantizer_b] if self.split is not None else [])


class QuantConv2d(nn.Conv2d, _QuantLayerMixin):
    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        w_scheme: Optional[QuantScheme],
        a_scheme: Optional[QuantScheme],
        name: str = "",
        split: Optional[int] = None,
        init: bool = True,
    ) -> "QuantConv2d":
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight = conv.weight
        q.bias = conv.bias
        if split is not None and conv.groups != 1:
            raise ValueError(f"{name}: split shortcut needs a conv with groups=1; got groups={conv.groups}")
        q._setup_quantizers(w_scheme, a_scheme, name, split)
        q.to(conv.weight.device)
        if init:
            q.init_weight_qparams()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear, _QuantLayerMixin):
    @classmethod
    def from_float(
        cls,
        lin: nn.Linear,
        w_scheme: Optional[QuantScheme],
        a_scheme: Optional[QuantScheme],
        name: str = "",
        split: Optional[int] = None,
        init: bool = True,
    ) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        q.weight = lin.weight
        q.bias = lin.bias
        q._setup_quantizers(w_scheme, a_scheme, name, split)
        q.to(lin.weight.device)
        if init:
            q.init_weight_qparams()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands fake-quantized (attention's Q·Kᵀ and softmax·V)."""

    def __init__(self, a_scheme: Optional[QuantScheme], b_scheme: Optional[QuantScheme], name: str = ""):
        super().__init__()
        self.layer_name = name
        self.quantizer_a = ActQuantizer(a_scheme, name=f"{name}.a")
        self.quantizer_b = ActQuantizer(b_scheme, name=f"{name}.b")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.quantizer_a(a), self.quantizer_b(b))

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.quantizer_a, self.quantizer_b]


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)
