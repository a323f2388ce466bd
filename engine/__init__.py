"""TensorRT / TensorRT-RTX engine building."""
