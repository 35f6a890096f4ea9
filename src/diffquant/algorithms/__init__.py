"""PTQ/QAT algorithms, one per file; each is a function (model, config, data, ...) -> quantized model."""
from diffquant.algorithms.naive import naive_ptq
from diffquant.algorithms.qdiffusion import PRESETS, ReconConfig, qdiffusion_ptq

METHODS = {"naive": naive_ptq, "qdiffusion": qdiffusion_ptq}

__all__ = ["METHODS", "PRESETS", "ReconConfig", "naive_ptq", "qdiffusion_ptq"]
