"""diffquant: quantize diffusion models and measure what it costs and buys."""
__version__ = "0.1.0"
