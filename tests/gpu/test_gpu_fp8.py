"""FP8 E4M3 matmuls (mirage.model.fp8) on the GPU, which needs FP8 tensor cores (Ada, Hopper, Blackwell):
wan-1.3b's block step (random weights, 832x480) with FP8 matmuls against bf16, and the FP8 step as CUDA-graph
replays and through Inductor against its eager self. `python -m pytest tests/gpu/test_gpu_fp8.py -m gpu`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mirage.core.config import get_dit_config
from mirage.model import fp8
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper, CapturedBlockStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 matmuls need compute capability 8.9 or later")]

WAN = get_dit_config("wan-1.3b")
TINY = dataclasses.replace(get_dit_config("dit-tiny"), window_frames=6, sink_frames=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanDiT(WAN).to(torch.bfloat16).eval().requires_grad_(False)
    return model, *fp8.rollout_inputs(model, blocks=2)


@pytest.mark.parametrize("activations", fp8.ACTIVATIONS)
def test_wan_block_step_with_fp8_matmuls_is_close_to_bf16(wan, activations):
    """One pass's velocity (the first step of the first block) and two blocks' clean latents."""
    model, text, noise = wan
    quantized, recipe = fp8.fp8_copy(model, activations, text)
    assert recipe["layers"] == WAN.num_layers * 10 and recipe["kept_high_precision"] == []
    x, t = noise[0, 0].to(torch.bfloat16), torch.full((1, WAN.block_frames), 1000.0, device="cuda")
    v_ref, v = model(x, t, text), quantized(x, t, text)
    assert 1e-3 < rel(v, v_ref) < 0.1
    assert 1e-3 < rel(fp8.rollout(quantized, text, noise), fp8.rollout(model, text, noise)) < 0.1
    del quantized
    torch.cuda.empty_cache()


def tiny_rollout(model: WanDiT, how: str) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(1)
    text = torch.randn(1, TINY.text_len, TINY.text_dim, device="cuda", generator=gen)
    noises = torch.randn(6, TINY.steps, 1, TINY.in_dim, TINY.block_frames, *TINY.latent_size, device="cuda",
                         generator=gen)
    stepper = BlockStepper(model, device="cuda", dtype=torch.bfloat16)
    if how.startswith("compile"):
        stepper.compile()
    step = CapturedBlockStep(stepper).step if how.endswith("graph") else stepper.step
    stepper.set_prompt(text)
    return torch.cat([step(n).clone() for n in noises], 2)


@pytest.mark.parametrize("activations", fp8.ACTIVATIONS)
@pytest.mark.parametrize("how, tol", [("graph", 1e-3), ("compile", 2e-2), ("compile-graph", 2e-2)])
def test_fp8_step_captured_and_compiled_equals_eager(activations, how, tol):
    """Replays run the eager kernels (equal up to cuBLAS picking another algorithm); Inductor fuses the quantization into other kernels (close).
    Six blocks: the cache fills, is full and its ring turns past the sink."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanDiT(TINY).to(torch.bfloat16).eval().requires_grad_(False)
    quantized, _ = fp8.fp8_copy(model, activations)
    eager = tiny_rollout(quantized, "eager")
    other = tiny_rollout(quantized, how)
    assert eager.abs().mean() > 0.1 and torch.isfinite(other).all()
    assert rel(other, eager) <= tol
    assert rel(eager, tiny_rollout(model, "eager")) > 1e-4  # the FP8 layers really ran
