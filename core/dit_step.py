"""The DiT's block loop over its pure graphs, in numpy (torch-free): what a runtime does around
`dit_step` / `dit_cache_write` (see mirage.core.graphs), written once for every backend.

The graphs take the rolling KV cache as inputs and return the block's new keys/values; this module
owns the cache (batch-first, in the graphs' float dtype), computes the static per-block inputs
(timestep embeddings and RoPE angles in float64, as mirage.model.dit does; the block's cache rows and
the rows' validity) and writes the cache-write pass's keys/values into the block's rows. Frame f lives
in slot f while f < sink_frames, else in sink + (f - sink) mod (window - sink), as in
mirage.model.dit_cache.RollingKVCache; every row of the batch is at the same frame here.

`run(graph, feeds) -> {output name: array}` is the backend: ONNX Runtime sessions in export parity, the
PyTorch graph modules in tests.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mirage.core import graphs as G
from mirage.core.flow_schedule import block_schedule, flow_renoise, flow_x0

Run = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def timestep_embedding(cfg, t: np.ndarray) -> np.ndarray:
    """Wan's sinusoidal embedding [cos, sin] of t·10000^(-i/half), in float64 -> (..., freq_dim) float32."""
    half = cfg.freq_dim // 2
    angles = np.asarray(t, np.float64)[..., None] * np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def _inv_freq(dims: int, theta: float) -> np.ndarray:
    return 1.0 / np.power(theta, np.arange(0, dims, 2, dtype=np.float64) / dims)


def rope_tables(cfg, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (B, F·T, head_dim / 2) float32 of frames at absolute `positions` (B, F): Wan's 3-D RoPE,
    the channels split (frame, height, width) by cfg.rope_dims, angles in float64."""
    dt, dh, dw = cfg.rope_dims
    gh, gw = cfg.token_grid
    ah = np.arange(gh, dtype=np.float64)[:, None] * _inv_freq(dh, cfg.rope_theta)
    aw = np.arange(gw, dtype=np.float64)[:, None] * _inv_freq(dw, cfg.rope_theta)
    spatial = np.concatenate([np.broadcast_to(ah[:, None], (gh, gw, ah.shape[1])),
                              np.broadcast_to(aw[None], (gh, gw, aw.shape[1]))], axis=-1).reshape(gh * gw, -1)
    frame = np.asarray(positions, np.float64)[..., None] * _inv_freq(dt, cfg.rope_theta)  # (B, F, dt / 2)
    b, f = frame.shape[:2]
    angles = np.concatenate([np.broadcast_to(frame[:, :, None], (b, f, gh * gw, frame.shape[-1])),
                             np.broadcast_to(spatial, (b, f) + spatial.shape)], axis=-1).reshape(b, f * gh * gw, -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def block_inputs(cfg, frame: int, batch: int) -> dict[str, np.ndarray]:
    """The static inputs of a block starting at absolute frame `frame`: RoPE angles, the cache rows
    its frames take (`slots`) and the rows it attends over (`valid`: held frames plus its own)."""
    t = cfg.tokens_per_frame
    frames = frame + np.arange(cfg.block_frames)
    sink, ring = cfg.sink_frames, cfg.window_frames - cfg.sink_frames
    slots = np.where(frames < sink, frames, sink + (frames - sink) % ring)
    rows = (slots[:, None] * t + np.arange(t)).reshape(-1)
    span = min(frame + cfg.block_frames, cfg.window_frames)  # the held prefix, then the whole window
    valid = (np.arange(cfg.window_frames * t) < span * t).astype(np.float32)
    cos, sin = rope_tables(cfg, np.broadcast_to(frames, (batch, cfg.block_frames)))
    return {G.ROPE_COS: cos, G.ROPE_SIN: sin, G.SLOTS: np.broadcast_to(rows.astype(np.int32), (batch, rows.size)),
            G.VALID: np.broadcast_to(valid, (batch, valid.size))}


class DiTBlockLoop:
    """Generates video block by block through `run`: `set_prompt(text)`, then `step(noise)` per block."""

    def __init__(self, cfg, specs: dict[str, G.GraphSpec], run: Run):
        self.cfg, self.specs, self.run = cfg, specs, run
        step = specs[G.DIT_STEP]
        self.batch = step.tensor(G.X_T).shape[0]
        self.cache = {name: np.zeros(step.tensor(name).shape, step.tensor(name).dtype)
                      for name in (G.TEXT_K, G.TEXT_V, G.CACHE_K, G.CACHE_V)}
        self.schedule = block_schedule(cfg.denoising_steps, cfg.timestep_shift, cfg.warp_denoising_step)
        self.frame = 0  # the next block's first frame

    def _call(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        return self.run(graph, {x.name: np.ascontiguousarray(feeds[x.name], x.dtype) for x in spec.inputs})

    def set_prompt(self, text: np.ndarray) -> None:
        """The prompt's embeddings (B, text_len, text_dim), zero-padded as the model pads them."""
        pad = self.cfg.text_len - text.shape[1]
        out = self._call(G.DIT_TEXT, {G.TEXT: np.pad(text, ((0, 0), (0, pad), (0, 0)))})
        self.cache[G.TEXT_K][...], self.cache[G.TEXT_V][...] = out[G.TEXT_K], out[G.TEXT_V]

    def _feeds(self, x: np.ndarray, t: float, static: dict) -> dict[str, np.ndarray]:
        # float32 timesteps, as BlockStepper keeps them (its embedding then widens them to float64)
        emb = timestep_embedding(self.cfg, np.full((self.batch, self.cfg.block_frames), t, np.float32))
        return {G.X_T: x, G.T_EMB: emb, **self.cache, **static}

    def step(self, noise: np.ndarray) -> np.ndarray:
        """noise (steps, B, in_dim, N, h, w): the start noise, then one per re-noising (as
        BlockStepper.block_body takes it). Returns the clean block (B, in_dim, N, h, w) float32."""
        static = block_inputs(self.cfg, self.frame, self.batch)
        x = noise[0].astype(np.float32)
        for i, (t, sigma, sigma_next) in enumerate(self.schedule):
            v = self._call(G.DIT_STEP, self._feeds(x, t, static))[G.V].astype(np.float32)
            x0 = flow_x0(x, v, sigma)
            if i + 1 < len(self.schedule):
                x = flow_renoise(x0, noise[i + 1], sigma_next)
        out = self._call(G.DIT_CACHE_WRITE, self._feeds(x0, float(self.cfg.context_timestep), static))
        rows = static[G.SLOTS]
        for b in range(self.batch):  # the cache update the graphs leave to the runtime
            self.cache[G.CACHE_K][b][:, :, rows[b]] = out[G.NEW_K][b]
            self.cache[G.CACHE_V][b][:, :, rows[b]] = out[G.NEW_V][b]
        self.frame += self.cfg.block_frames
        return x0
