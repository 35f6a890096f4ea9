"""Quantized modules."""
from diffquant.nn.attention import QuantAttnProcessor
from diffquant.nn.modules import QuantConv2d, QuantLinear, QuantMatMul
from diffquant.nn.quantizers import ActQuantizer, WeightQuantizer

__all__ = ["ActQuantizer", "QuantAttnProcessor", "QuantConv2d", "QuantLinear", "QuantMatMul", "WeightQuantizer"]
