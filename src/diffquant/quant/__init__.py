"""Pure tensor math of quantization: qparams, (fake-)quantize/dequantize, range estimators."""
from diffquant.quant.affine import (
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    fake_quantize_weight,
    group_view,
    qparams_from_range,
    qrange,
    quantize,
    round_ste,
    sqnr_db,
)
from diffquant.quant.estimators import ActivationObserver, lp_search, weight_qparams

__all__ = [
    "ActivationObserver",
    "dequantize",
    "fake_quantize",
    "fake_quantize_fp8",
    "fake_quantize_weight",
    "group_view",
    "lp_search",
    "qparams_from_range",
    "qrange",
    "quantize",
    "round_ste",
    "sqnr_db",
    "weight_qparams",
]
