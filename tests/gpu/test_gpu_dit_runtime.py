"""The video DiT in the runtime on a GPU (core.dit_step.BlockUnit through GpuExecution, the PyTorch backend):
a captured block equals the eager one bit for bit and the CPU's within float32 tolerance, rows at their own
frames, a prompt switch (re-cache) between blocks, a row restarted with a block in flight; video-to-video
(dit-tiny-taesd: encode, rows at their own strengths, a strength change, decode) likewise, bytes in and out; and
with TAEHV as the codec (its state kept per row, a row restarted mid-video).
`python -m pytest tests/gpu/test_gpu_dit_runtime.py -m gpu`."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from mirage.bridge.pipeline import from_dit_model
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.model.dit import WanDiT
from mirage.model.latent import load_frame_codec
from test_taehv_codec import random_taehv

pytestmark = pytest.mark.gpu

CFG = dataclasses.replace(get_dit_config("dit-tiny"), width=64, height=64, sink_frames=2)  # the ring turns at block 4


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5, CFG.text_dim)).astype(np.float32)


def _rollout(model, device: str, graph: bool, compile_mode: str | None = None) -> list[np.ndarray]:
    options = PipelineOptions(batch=2, cuda_graph=graph, dtype="float32", compile=compile_mode)
    with from_dit_model(copy.deepcopy(model), device, options, prompt_encoder={"b": _prompt(2)}.get) as pipe:
        pipe.set_prompt(_prompt(1))
        pipe.reset(3)
        assert bool(pipe.graphs) == graph
        out = [pipe.step_batch() for _ in range(4)]
        pipe.control(0, prompt="b")  # re-caches row 0 between blocks
        pipe.reset_row(1, 9)  # row 1 restarts at frame 0
        out += [pipe.step_batch() for _ in range(3)]
    return out


def test_a_captured_block_equals_the_eager_one_and_the_cpu():
    torch.manual_seed(0)
    model = WanDiT(CFG).eval()
    cpu, eager, graph = _rollout(model, "cpu", False), _rollout(model, "cuda", False), _rollout(model, "cuda", True)
    for n, (c, e, g) in enumerate(zip(cpu, eager, graph)):
        np.testing.assert_array_equal(g, e, err_msg=f"block {n}: graph replay vs eager")
        np.testing.assert_allclose(e, c, atol=1e-3, rtol=0, err_msg=f"block {n}: cuda vs cpu")  # TF32 aside


V2V = dataclasses.replace(get_dit_config("dit-tiny-taesd"), width=64, height=64)


def _restyle_rollout(model, device: str, graph: bool) -> list[np.ndarray]:
    """Two rows restyled (uint8 blocks in and out) at strengths 0.5 and 0.8, then row 0 at 0.2 and both prompt
    switched; the input blocks differ per row and block."""
    options = PipelineOptions(batch=2, cuda_graph=graph, dtype="float32", strength=0.5, frames="uint8")
    rng = np.random.default_rng(4)
    clip = rng.integers(0, 256, (4, 2, V2V.block_frames, 8, 8, 3), dtype=np.uint8).repeat(8, 3).repeat(8, 4)
    prompts = {"b": np.random.default_rng(2).standard_normal((5, V2V.text_dim)).astype(np.float32)}
    with from_dit_model(copy.deepcopy(model), device, options, prompt_encoder=prompts.get) as pipe:
        pipe.set_prompt(np.random.default_rng(1).standard_normal((5, V2V.text_dim)).astype(np.float32))
        pipe.reset(3)
        assert bool(pipe.graphs) == graph and pipe.frames_in == V2V.block_frames
        pipe.control(1, strength=0.8)
        out = [pipe.step_batch(clip[k]) for k in range(2)]
        pipe.control(0, strength=0.2, prompt="b")
        pipe.control(1, prompt="b")
        out += [pipe.step_batch(clip[k]) for k in range(2, 4)]
    return out


def test_a_captured_video_to_video_block_equals_the_eager_one_and_the_cpu():
    torch.manual_seed(0)
    model = WanDiT(V2V).eval()
    load_frame_codec(V2V)  # the bundled autoencoder is there (its hash checked)
    cpu = _restyle_rollout(model, "cpu", False)
    eager, graph = _restyle_rollout(model, "cuda", False), _restyle_rollout(model, "cuda", True)
    for n, (c, e, g) in enumerate(zip(cpu, eager, graph)):
        np.testing.assert_array_equal(g, e, err_msg=f"block {n}: graph replay vs eager")
        # bytes: cuDNN's TF32 convolutions (the autoencoder's; on by default) move values across rounding
        # boundaries; a broken row or block would be off by tens
        diff = np.abs(e.astype(int) - c)
        assert diff.max() <= 8 and diff.mean() <= 0.5, f"block {n}: cuda vs cpu, max {diff.max()}, mean {diff.mean()}"


def _taehv_rollout(model, taehv, device: str, graph: bool, compile_mode: str | None = None) -> list[np.ndarray]:
    """Two rows restyled through TAEHV (4N uint8 frames in and out a block), row 1 at another strength, then
    restarted (fresh: its codec state taken as a new video's) with a block in flight on the GPU."""
    options = PipelineOptions(batch=2, cuda_graph=graph, dtype="float32", strength=0.5, frames="uint8",
                              compile=compile_mode)
    frames = 4 * CFG.block_frames
    clip = np.random.default_rng(4).integers(0, 256, (5, 2, frames, 8, 8, 3), dtype=np.uint8).repeat(8, 3).repeat(8, 4)
    with from_dit_model(copy.deepcopy(model), device, options, decoder=copy.deepcopy(taehv)) as pipe:
        pipe.set_prompt(_prompt(1))
        pipe.reset(3)
        assert bool(pipe.graphs) == graph and pipe.frames_in == frames
        pipe.control(1, strength=0.8)
        out = [pipe.step_batch(clip[k]) for k in range(3)]
        pipe.reset_row(1, 9)
        out += [pipe.step_batch(clip[k]) for k in range(3, 5)]
    return out


def test_a_captured_block_with_taehv_equals_the_eager_one_and_the_cpu():
    torch.manual_seed(0)
    model = WanDiT(CFG).eval()
    taehv = random_taehv(0, CFG.height, CFG.width)
    cpu = _taehv_rollout(model, taehv, "cpu", False)
    eager, graph = _taehv_rollout(model, taehv, "cuda", False), _taehv_rollout(model, taehv, "cuda", True)
    for n, (c, e, g) in enumerate(zip(cpu, eager, graph)):
        np.testing.assert_array_equal(g, e, err_msg=f"block {n}: graph replay vs eager")
        diff = np.abs(e.astype(int) - c)  # TF32 convolutions, as above
        assert diff.max() <= 8 and diff.mean() <= 0.5, f"block {n}: cuda vs cpu, max {diff.max()}, mean {diff.mean()}"


def test_the_compiled_graphs_captured_make_the_eager_blocks():
    """mirage-serve --fast on a DiT: the graphs' Inductor kernels inside the block's CUDA graph, through the prompt
    switch's re-cache and a restarted row (generation), and through TAEHV (video-to-video): the eager blocks up to
    Inductor's reordered float32 sums."""
    torch.manual_seed(0)
    model = WanDiT(CFG).eval()
    eager, compiled = _rollout(model, "cuda", False), _rollout(model, "cuda", True, "default")
    for n, (e, c) in enumerate(zip(eager, compiled)):
        np.testing.assert_allclose(c, e, atol=1e-3, rtol=0, err_msg=f"block {n}: compiled vs eager")
    taehv = random_taehv(0, CFG.height, CFG.width)
    eager, compiled = _taehv_rollout(model, taehv, "cuda", False), _taehv_rollout(model, taehv, "cuda", True, "default")
    for n, (e, c) in enumerate(zip(eager, compiled)):
        diff = np.abs(c.astype(int) - e)
        assert diff.max() <= 8 and diff.mean() <= 0.5, f"block {n}: compiled vs eager, {diff.max()}, {diff.mean()}"
