"""PTQ/QAT algorithms, one per file; each is a function (model, config, data, ...) -> quantized model."""
from diffquant.algorithms.naive import naive_ptq

METHODS = {"naive": naive_ptq}

__all__ = ["METHODS", "naive_ptq"]
