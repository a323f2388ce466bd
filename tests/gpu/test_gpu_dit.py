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


class Recording:
    """A decoder that keeps the latents it was given (copied on the stream it decodes on) and its frames."""

    def __init__(self, decoder):
        self.decoder, self.latents, self.frames = decoder, [], []

    def reset(self):
        self.decoder.reset()
        self.latents, self.frames = [], []

    def decode(self, latents):
        self.latents.append(latents.clone())
        self.frames.append(self.decoder.decode(latents))
        return self.frames[-1]


@pytest.mark.gpu
def test_overlapped_decode_equals_serial():
    """The benchmark's overlapped decode (block b decoded on a second stream while b+1 is generated from
    the same graph's static output) makes the frames of the serial one, to the bit."""
    from mirage.model.dit_bench import run_decoded_clip
    from mirage.model.taehv import TaehvDecoder

    torch.manual_seed(0)
    model = WanDiT(CFG).cuda().eval()
    stepper = BlockStepper(model, device="cuda")
    step = CapturedBlockStep(stepper).step
    stepper.set_prompt(torch.randn(1, CFG.text_len, CFG.text_dim, device="cuda"))
    decoder = Recording(TaehvDecoder().cuda().eval())
    latents, frames = {}, {}
    for side in (None, torch.cuda.Stream()):
        ready, _, count = run_decoded_clip(step, stepper, decoder, BLOCKS, 3, torch.device("cuda"), side)
        assert count == sum(CFG.video_frames(CFG.block_frames, first=b == 0) for b in range(BLOCKS))
        assert len(ready) == BLOCKS and ready == sorted(ready)
        latents[side is None], frames[side is None] = torch.cat(decoder.latents, 2), torch.cat(decoder.frames, 1)
    assert latents[True].std() > 0.1 and (latents[True][:, :, :2] - latents[True][:, :, -2:]).abs().max() > 0.1
    assert torch.equal(latents[True], latents[False]) and torch.equal(frames[True], frames[False])
