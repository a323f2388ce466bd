"""The one table of numerical tolerances per graph precision."""

# mirage-export parity: bound on ‖out − ref‖ / ‖ref‖ of each graph output against PyTorch fp32
# (fp32 far under 1e-3, fp16 around 1e-3..1e-2, bf16 (3 mantissa bits fewer than fp16: dit-tiny's DiT
# measured <= 8e-3) a few times that; 8-bit Q/DQ of a small model is looser, FP8 less so than INT8).
PARITY = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.15, "fp8": 0.1}

# Polygraphy engine-vs-ONNX-Runtime comparison: (rtol, atol) on every output; 8-bit is judged by
# rollout PSNR, so it is loose here.
ENGINE = {"fp32": (1e-3, 1e-3), "fp16": (1e-2, 1e-2), "int8": (0.2, 0.2), "fp8": (0.1, 0.1)}
