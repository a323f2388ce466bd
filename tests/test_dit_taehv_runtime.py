"""The video DiT in the runtime with TAEHV as its codec (issue 29: wan-1.3b video-to-video served): dit-tiny at
32x64 (non-square, as Wan's 832x480), random DiT weights and a random TAEHV, on the PyTorch backend (CPU), against
the torch path (model.dit_pipeline's restyle and blocks, its streaming Taehv) given the runtime's noise."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mirage.bridge.dit_artifact import dit_model
from mirage.bridge.pipeline import from_dit_model
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.loop import normal
from mirage.model.dit_pipeline import DiTPipeline
from mirage.model.taehv import Taehv, TaehvDecoder
from mirage.runtime.pipeline import Pipeline, PipelineError
from mirage.runtime.pool import StreamPool
from test_taehv_codec import random_taehv

CFG = dataclasses.replace(get_dit_config("dit-tiny"), width=64, height=32, num_layers=2)
SEED = 0  # the random DiT weights
N = CFG.block_frames
FRAMES, WARM_UP = 4 * N, 3  # video frames a block takes and gives; TAEHV's warm-up frames, in front of a stream
TOL = 1e-4  # runtime vs torch path, float32 (the same math, other kernels)


@pytest.fixture(scope="module")
def taehv() -> Taehv:
    return random_taehv(3, CFG.height, CFG.width)


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32)


def _clip(blocks: int, seed: int) -> np.ndarray:
    """Smooth frames (blocks · 4N, 32, 64, 3) in [-1, 1], the runtime's input: 4N frames a block."""
    coarse = np.random.default_rng(seed).uniform(-0.9, 0.9, (blocks * FRAMES, 4, 8, 3)).astype(np.float32)
    return coarse.repeat(8, axis=1).repeat(8, axis=2)


def _noise(seed: int, block: int) -> np.ndarray:
    """The noise the runtime draws for block `block` of a row of `seed` (draw block·steps + i: pass i's)."""
    shape = (CFG.in_dim, N, *CFG.latent_size)
    return np.stack([normal(seed, block * CFG.steps + i, int(np.prod(shape))).reshape(shape)
                     for i in range(CFG.steps)])[:, None]


def _restyled(taehv: Taehv, text: np.ndarray, seed: int, clip: np.ndarray, strength: float) -> np.ndarray:
    """One stream by the torch path: `clip` in its blocks (4N - 3 frames, then 4N), every block's output frames."""
    pipe = DiTPipeline(CFG, dit_model(CFG, None, SEED)[0], None, taehv, torch.from_numpy(text[None]),
                       torch.device("cpu"))
    pipe.reset(0)
    pipe.set_strength(strength)
    out, start, k = [], 0, 0
    while start + pipe.frames_in <= len(clip):
        n = pipe.frames_in
        out.append(pipe.restyle(clip[start:start + n], _noise(seed, k)))
        start, k = start + n, k + 1
    return np.concatenate(out)


def _runtime(taehv: TaehvDecoder, batch: int = 1, strength: float | None = 0.6) -> Pipeline:
    return from_dit_model(dit_model(CFG, None, SEED)[0], "cpu", PipelineOptions(batch=batch, strength=strength),
                          decoder=taehv)


def test_video_to_video_is_the_torch_path_s_behind_taehv_s_warm_up_frames(taehv):
    """Three blocks of 4N input frames: the runtime's stream is restyle's of the same video (its blocks 4N - 3,
    then 4N frames) with TAEHV's 3 warm-up frames in front; the input's last 3 frames wait for the next block."""
    text, clip = _prompt(1), _clip(3, seed=2)
    with _runtime(taehv) as pipe:
        assert (pipe.frames_in, pipe.unit.frames, pipe.video_rate) == (FRAMES, FRAMES, 16.0)
        assert pipe.frames_are.startswith("video frames (a stream's first 3 are TAEHV's warm-up frames")
        pipe.set_prompt(text)
        pipe.reset(4)
        got = np.concatenate([pipe.step(block) for block in clip.reshape(3, FRAMES, *clip.shape[1:])])
    ref = _restyled(taehv, text, 4, clip, 0.6)
    assert len(ref) == 3 * FRAMES - WARM_UP
    np.testing.assert_allclose(got[WARM_UP:], ref, atol=TOL, rtol=0)
    shifted = _restyled(taehv, text, 4, clip[1:], 0.6)  # a frame off: what a wrong carry would give
    assert np.abs(got[WARM_UP:WARM_UP + len(shifted)] - shifted).max() > 30 * TOL


def test_generation_decodes_with_taehv_warm_up_frames_kept(taehv):
    """Generation (no strength): a block's frames are Taehv.decode's of its clean latents, streaming, the first
    block's warm-up frames shown."""
    with _runtime(taehv, strength=None) as pipe:
        assert (pipe.frames_in, pipe.unit.frames) == (0, FRAMES)
        pipe.set_prompt(_prompt(1))
        pipe.reset(2)
        taehv.reset()
        for k in range(3):
            frames = pipe.step()
            ref = taehv.decode(pipe.buf.x0.clone())[0].permute(0, 2, 3, 1).numpy()
            np.testing.assert_allclose(frames[WARM_UP:] if k == 0 else frames, ref, atol=1e-6, rtol=0)
        # its TAEHV has an encoder, but generation never encodes: no encoder state is allocated for it
        assert G.ENCODE in pipe.unit.specs and {g for g, _ in pipe.buf.state} == {G.DECODE}


def test_rows_are_independent_and_a_held_row_keeps_its_codec_state(taehv):
    """Two rows of one pool: row a's frames are bit-identical whatever row b is given; row b, held for a block
    (no input: the pool steps row a alone) and then given its next blocks, is still the torch path's stream of its
    own video (its TAEHV memory and carried frames kept while held)."""
    text, clip, other = _prompt(1), _clip(3, seed=2), _clip(3, seed=9)
    blocks, others = (c.reshape(3, FRAMES, *c.shape[1:]) for c in (clip, other))
    runs = []
    for neighbour in (blocks, others):
        with StreamPool(_runtime(taehv, batch=2)) as pool:
            pool.pipeline.set_prompt(text)
            a, b = pool.attach(seed=4), pool.attach(seed=5)
            out = [pool.step({a: blocks[0], b: neighbour[0]}), pool.step({a: blocks[1]}),
                   pool.step({a: blocks[2], b: neighbour[1]}), pool.step({b: neighbour[2]})]
            runs.append(([o[a] for o in out[:3]], [o[b] for o in (out[0], out[2], out[3])]))
    for x, y in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(np.concatenate(runs[0][0])[WARM_UP:], _restyled(taehv, text, 4, clip, 0.6),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(np.concatenate(runs[1][1])[WARM_UP:], _restyled(taehv, text, 5, other, 0.6),
                               atol=TOL, rtol=0)


def test_a_codec_the_runtime_cannot_run_is_one_clear_error(taehv):
    decoder_only = TaehvDecoder().eval()
    with pytest.raises(PipelineError, match="video-to-video needs a TAEHV --decoder with its encoder"):
        _runtime(decoder_only)
    with pytest.raises(PipelineError, match="is not a runtime codec"):
        from_dit_model(dit_model(CFG, None, SEED)[0], "cpu", decoder=object())
    with _runtime(decoder_only, strength=None) as pipe:  # a decoder alone still decodes generation
        pipe.set_prompt(_prompt(1))
        pipe.reset(0)
        assert pipe.step().shape == (FRAMES, 32, 64, 3)


def test_the_gpu_execution_runs_the_cpu_s_taehv_blocks(taehv):
    """GpuExecution (on CPU tensors, test_dit_runtime._CpuAsGpu) with uint8 frames: the codec's host inputs
    (fresh, keep / take) staged per parity, a held row, a row restarted with a block in flight; the same bytes as
    CpuExecution's."""
    from mirage.core import graphs as G
    from mirage.model.dit_backend import DiTTorchBackend
    from mirage.model.taehv import TaehvBlockCodec
    from test_dit_runtime import _CpuAsGpu

    options = PipelineOptions(batch=2, strength=0.5, frames="uint8")
    clip = (_clip(4, seed=2).reshape(4, 1, FRAMES, 32, 64, 3).repeat(2, 1) * 127 + 128).astype(np.uint8)
    clip[:, 1] = clip[::-1, 0]  # each row its own input

    def rollout(pipe):
        with pipe:
            pipe.set_prompt(_prompt(1))
            pipe.reset(3)
            out = [pipe.step_batch(clip[0]), pipe.step_batch(clip[1], np.array([1, 0]))]  # row 1 held
            pipe.submit_batch(clip[2])
            pipe.reset_row(1, 9)  # with block 2 in flight: block 3 starts row 1's new video
            out.append(pipe.collect_batch())
            return out + [pipe.step_batch(clip[3])]

    model = dit_model(CFG, None, SEED)[0]
    cpu = rollout(from_dit_model(model, "cpu", options, decoder=taehv))
    cfg = dataclasses.replace(CFG, codec="taehv")
    specs = G.model_graphs(cfg, 2)
    backend = DiTTorchBackend(model, specs, "cpu", codec=TaehvBlockCodec(taehv, N))
    backend.device = "cuda:0"  # a GPU backend to the pipeline: GpuExecution, with the CPU plumbing
    staged = rollout(Pipeline(backend, cfg, specs, options, _CpuAsGpu()))
    for n, (a, b) in enumerate(zip(cpu, staged)):
        assert a.dtype == np.uint8 and a.shape == (2, FRAMES, 32, 64, 3)
        np.testing.assert_array_equal(a, b, err_msg=f"block {n}")
    assert np.abs(cpu[3][1].astype(int) - cpu[2][1]).mean() > 1  # row 1's new video is not its old one
