"""Mirage: real-time autoregressive video diffusion, from training to TensorRT."""

__version__ = "0.1.0"
