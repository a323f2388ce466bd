"""The cached, chunked rollout of the DiT equals full forwards over the same frames with the block-causal
mask (float32, CPU, dit-tiny): the cache-write passes, the denoising steps, a rolling window with a sink,
and the re-cache on a prompt switch."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mirage.core.config import get_dit_config
from mirage.model.dit import WanDiT, block_causal_mask
from mirage.model.dit_cache import BlockStepper

TINY = dataclasses.replace(get_dit_config("dit-tiny"), num_layers=2)
FULL = dataclasses.replace(TINY, window_frames=8, sink_frames=0)  # 4 blocks of 2 fill it exactly (Self-Forcing)
ROLL = dataclasses.replace(TINY, window_frames=6, sink_frames=2)  # a sink and a ring of 4 frames (LongLive)
TOL = 1e-4


def model_for(cfg, seed=0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(cfg).eval()


def inputs(cfg, blocks, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_size
    noise = torch.randn(blocks, cfg.steps, 1, cfg.in_dim, cfg.block_frames, h, w, generator=gen)
    texts = torch.randn(2, 1, cfg.text_len - 3, cfg.text_dim, generator=gen)  # shorter: zero-padded
    return noise, texts


def started(cfg, blocks):
    """A random model, its inputs for `blocks` blocks, and a stepper on the first prompt."""
    model = model_for(cfg)
    noise, texts = inputs(cfg, blocks)
    stepper = BlockStepper(model)
    stepper.set_prompt(texts[0])
    return model, noise, texts, stepper


def masked_forward(model, x, t, text, positions):
    return model(x, t, text, mask=block_causal_mask(model.cfg, positions), positions=positions)


def reference_block(model, prefix, prefix_pos, noise, text):
    """Self-Forcing's sampling loop for one block, each pass a full masked forward over the clean
    prefix (at the context timestep) followed by the block."""
    cfg, n = model.cfg, model.cfg.block_frames
    positions = torch.cat([prefix_pos, prefix_pos.max() + 1 + torch.arange(n) if len(prefix_pos) else torch.arange(n)])
    steps = BlockStepper(model).schedule
    x = noise[0]
    for i, (t, sigma, sigma_next) in enumerate(steps):
        ts = torch.tensor([float(cfg.context_timestep)] * prefix.shape[2] + [t] * n)[None]
        v = masked_forward(model, torch.cat([prefix, x], 2), ts, text, positions)[:, :, -n:]
        x0 = x - sigma * v
        if i + 1 < len(steps):
            x = (1 - sigma_next) * x0 + sigma_next * noise[i + 1]
    return x0


@pytest.mark.parametrize("cfg, blocks", [(FULL, 4), (ROLL, 5)])
def test_cache_write_passes_equal_one_masked_forward(cfg, blocks):
    model, _, texts, stepper = started(cfg, blocks)
    frames = blocks * cfg.block_frames
    x = torch.randn(1, cfg.in_dim, frames, *cfg.latent_size, generator=torch.Generator().manual_seed(2))
    n = cfg.block_frames
    cached = torch.cat([stepper.append(x[:, :, b * n:(b + 1) * n]) for b in range(blocks)], dim=2)
    t = torch.full((1, frames), float(cfg.context_timestep))
    with torch.no_grad():
        full = masked_forward(model, x, t, texts[0], torch.arange(frames))
        unmasked = model(x, t, texts[0])
    assert (cached - full).abs().max() < TOL
    assert (cached - unmasked).abs().max() > 100 * TOL  # the mask matters: the test can tell
    assert stepper.cache.span == cfg.window_frames


@pytest.mark.parametrize("cfg, blocks", [(FULL, 4), (ROLL, 5)])
def test_block_steps_equal_masked_forwards(cfg, blocks):
    model, noise, texts, stepper = started(cfg, blocks)
    made = [stepper.step(noise[b]) for b in range(blocks)]
    with torch.no_grad():
        for b in range(blocks):
            prefix = torch.cat(made[:b], 2) if b else made[0][:, :, :0]
            ref = reference_block(model, prefix, torch.arange(prefix.shape[2]), noise[b], texts[0])
            assert (made[b] - ref).abs().max() < TOL, f"block {b}"
    assert int(stepper.cache.frame) == blocks * cfg.block_frames


def test_recache_on_prompt_switch_equals_masked_forward_over_held_frames():
    model, noise, texts, stepper = started(ROLL, 5)
    made = torch.cat([stepper.step(noise[b]) for b in range(4)], 2)  # frames 0..7; the ring holds 4..7
    held = torch.tensor([0, 1, 4, 5, 6, 7])
    assert sorted(stepper.cache.positions.tolist()) == held.tolist()
    stepper.recache(texts[1])
    switched = stepper.step(noise[4])
    with torch.no_grad():
        ref = reference_block(model, made[:, :, held], held, noise[4], texts[1])
        stale = reference_block(model, made[:, :, held], held, noise[4], texts[0])
    assert (switched - ref).abs().max() < TOL
    assert (switched - stale).abs().max() > 100 * TOL


def test_recache_with_the_same_prompt_keeps_an_unrolled_cache():
    _, noise, texts, stepper = started(FULL, 3)
    for b in range(3):
        stepper.step(noise[b])
    k, v = stepper.cache.k.clone(), stepper.cache.v.clone()
    stepper.recache(texts[0])
    assert (stepper.cache.k - k).abs().max() < TOL and (stepper.cache.v - v).abs().max() < TOL
    stepper.recache(texts[1])
    assert (stepper.cache.k - k).abs().max() > 100 * TOL


def op_shapes(stepper, noise) -> list[tuple]:
    with torch.profiler.profile(record_shapes=True) as prof:
        stepper.step(noise)
    return [(e.name, str(e.input_shapes)) for e in prof.events() if e.name.startswith("aten::")]


def test_a_full_window_runs_the_same_shapes_every_block():
    """Graph-capturable: once the window is full, consecutive blocks run the same ops on the same shapes
    (the block's position and slots are device data); while it fills, the span grows."""
    _, noise, _, stepper = started(ROLL, 6)
    filling = [op_shapes(stepper, noise[b]) for b in range(2)]
    assert filling[0] != filling[1]
    stepper.step(noise[2])
    full = [op_shapes(stepper, noise[b]) for b in range(3, 6)]
    assert full[0] == full[1] == full[2] and len(full[0]) > 100
