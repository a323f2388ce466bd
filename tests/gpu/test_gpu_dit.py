"""The DiT's block step on the GPU: CUDA-graph replays and Inductor equal the eager step (dit-tiny,
float32 and bf16), long enough for the ring to turn. `python -m pytest tests/gpu/test_gpu_dit.py -m gpu`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mirage.core.config import get_dit_config
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper, CapturedBlockStep

CFG = dataclasses.replace(get_dit_config("dit-tiny"), window_frames=6, sink_frames=2)
BLOCKS = 6


def rollout(dtype, how: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = WanDiT(CFG).cuda().to(dtype).eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    text = torch.randn(1, CFG.text_len, CFG.text_dim, device="cuda", generator=gen)
    noises = torch.randn(BLOCKS, CFG.steps, 1, CFG.in_dim, CFG.block_frames, *CFG.latent_size, device="cuda",
                         generator=gen)
    stepper = BlockStepper(model, device="cuda", dtype=dtype)
    if how.startswith("compile"):
        stepper.compile()
    step = CapturedBlockStep(stepper).step if how.endswith("graph") else stepper.step
    stepper.set_prompt(text)
    return torch.cat([step(n).clone() for n in noises], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("how", ["graph", "compile", "compile-graph"])
def test_paths_agree_with_eager(dtype, tol, how):
    eager = rollout(dtype, "eager")
    other = rollout(dtype, how)
    assert eager.abs().mean() > 0.1
    assert (other - eager).abs().max() < tol * max(1.0, float(eager.abs().max()))
