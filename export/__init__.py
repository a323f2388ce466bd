"""ONNX export of the denoiser and context encoder."""
