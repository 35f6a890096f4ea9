"""Sampling loops (DDIM/DDPM/consistency) with one RNG per sample, and sample-set files."""
from diffquant.sampling.io import load_samples, save_samples
from diffquant.sampling.samplers import SAMPLERS, SPACINGS, SamplerSpec, Samples, ddim_timesteps, sample, to_uint8

__all__ = ["SAMPLERS", "SPACINGS", "SamplerSpec", "Samples", "ddim_timesteps", "load_samples", "sample", "save_samples", "to_uint8"]
