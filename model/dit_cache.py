"""Chunk-causal generation with the Wan DiT: a pre-allocated rolling KV cache, the block step, the re-cache.

The cache (per layer, keys and values of `window_frames` latent frames) is allocated once. Frame f lives
in slot f while f < sink_frames (the attention sink, kept for good) and otherwise in the ring
sink + (f - sink) mod (window - sink). Keys are stored already rotated by RoPE at their absolute frame
position, as Self-Forcing and LongLive store them, so a query at its own absolute position sees every
cached key at the right relative distance however the ring has turned, and slots need never move
(Self-Forcing shifts the whole cache left instead).

A block of N frames writes its keys/values into its slots at every pass, which overwrite the N frames
that just left the window, then attends over the cache prefix of `span` frames: all frames so far
until the cache is full, then all `window_frames` slots. The block's queries therefore see exactly the
frames `block_causal_mask` allows: its own block, the sink, and the window ending with it.

Shapes depend only on `span`, a Python int that stops changing once the cache is full (from then on
every block runs the same kernels on the same buffers); the block's frame position, its slot indices
and the slot -> frame map live in device tensors. One block step therefore is one CUDA graph per
distinct span (window_frames / block_frames of them at most), and a single one in the long run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mirage.core.flow_schedule import block_schedule, flow_renoise, flow_x0, strength_schedule
from mirage.model.dit import Block, Rope, WanDiT, block_causal_mask


def cached_layer(blk: Block, h: torch.Tensor, e0: torch.Tensor, rope: Rope, text_k: torch.Tensor, text_v: torch.Tensor,
                 cache_k: torch.Tensor, cache_v: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    """One block over the current block's tokens against one layer's cache (B, heads, window·T, head_dim):
    the block's keys/values go to token rows `index`, then its queries attend over the first `tokens`
    rows. Only tensors and the span's token count come in, so one compilation serves every layer."""

    def attend(q, k, v):
        cache_k.index_copy_(2, index, k)
        cache_v.index_copy_(2, index, v)
        return F.scaled_dot_product_attention(q, cache_k[:, :, :tokens], cache_v[:, :, :tokens])

    return blk(h, e0, rope, (text_k, text_v), attend)


class RollingKVCache:
    """Keys/values (layers, B, heads, window·T, head_dim) of the frames in the window, the text's
    cross-attention keys/values, and the clean latents and absolute positions of the frames held (for
    the re-cache on a prompt switch). `frame` (device, int64) is the next block's first frame."""

    def __init__(self, model: WanDiT, batch: int, device=None, dtype: torch.dtype = torch.float32):
        cfg = self.cfg = model.cfg
        tokens = cfg.window_frames * cfg.tokens_per_frame
        shape = (cfg.num_layers, batch, cfg.num_heads, tokens, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        text_shape = (cfg.num_layers, batch, cfg.num_heads, cfg.text_len, cfg.head_dim)
        self.text_k = torch.zeros(text_shape, device=device, dtype=dtype)
        self.text_v = torch.zeros(text_shape, device=device, dtype=dtype)
        self.latents = torch.zeros(batch, cfg.in_dim, cfg.window_frames, *cfg.latent_size, device=device)
        self.positions = torch.full((cfg.window_frames,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.frame = torch.zeros((), dtype=torch.long, device=device)
        self.frames_written = 0  # host mirror of `frame`: decides the span (a shape), never read in a step
        self._offsets = torch.arange(cfg.block_frames, device=device)
        self._token = torch.arange(cfg.tokens_per_frame, device=device)

    @property
    def span(self) -> int:
        """Frames the next block attends to, its own included: a shape, constant once the cache is full."""
        return min(self.frames_written + self.cfg.block_frames, self.cfg.window_frames)

    @property
    def held(self) -> int:
        """Slots holding a finished frame (they form the prefix until the cache is full)."""
        return min(self.frames_written, self.cfg.window_frames)

    def slots(self, frames: torch.Tensor) -> torch.Tensor:
        sink, ring = self.cfg.sink_frames, self.cfg.window_frames - self.cfg.sink_frames
        return torch.where(frames < sink, frames, sink + (frames - sink) % ring)

    def token_index(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots[:, None] * self.cfg.tokens_per_frame + self._token).flatten()

    def set_text(self, text_kv) -> None:
        """Copy a prompt's per-layer cross-attention keys/values into the static buffers (graph-safe)."""
        for i, (k, v) in enumerate(text_kv):
            self.text_k[i].copy_(k)
            self.text_v[i].copy_(v)


class BlockStepper:
    """Runs `model` block by block: `set_prompt`, then `step(noise)` per block, `recache(text)` on a switch."""

    def __init__(self, model: WanDiT, batch: int = 1, device=None, dtype: torch.dtype = torch.float32):
        self.model, self.cfg = model, model.cfg
        self.cache = RollingKVCache(model, batch, device, dtype)
        self.schedule = block_schedule(self.cfg.denoising_steps, self.cfg.timestep_shift, self.cfg.warp_denoising_step)
        # Per-frame timesteps (B, N) of each step and of the cache-write pass, made once: tensors, not
        # Python floats, so a compiled pass is one graph for every step
        self._shape, self._device = (batch, self.cfg.block_frames), device
        self._timesteps = [torch.full(self._shape, t, device=device) for t, _, _ in self.schedule]
        self._rows = [(ts, sigma, sigma_next) for ts, (_, sigma, sigma_next) in zip(self._timesteps, self.schedule)]
        self._context_t = torch.full(self._shape, float(self.cfg.context_timestep), device=device)
        self._layer = cached_layer
        self.cache_input = False  # video-to-video: cache a block's `source` instead of its x_0 (core.config.CACHE_FROM)
        self.set_strength(1.0)

    def set_strength(self, strength: float) -> None:
        """Video-to-video: how far a `source` block is noised before the steps left denoise it
        (flow_schedule.strength_schedule; 1: from pure noise, 0: the source is taken as it is). Takes
        effect from the next block; generation (no source) always runs the whole schedule."""
        self._v2v_rows = [(torch.full(self._shape, t, device=self._device), sigma, sigma_next)
                          for t, sigma, sigma_next in strength_schedule(self.schedule, strength)]

    def reset(self) -> None:
        """Start a new video: an empty window at frame 0 (stale slots are never read: a slot is
        written before any block's prefix includes it)."""
        self.cache.frame.zero_()
        self.cache.positions.fill_(-1)
        self.cache.frames_written = 0

    def compile(self, **options) -> None:
        """Run each layer through torch.compile (Inductor), compiled once for all layers (their weights
        are inputs: regional compilation) and once per span. Dynamo keeps compilations per code object,
        shared by every stepper, so each call raises the recompile limit by this stepper's spans.
        Inductor fuses the cache writes into the key/value epilogues, in place (checked in the
        generated code, CPU)."""
        torch._dynamo.config.recompile_limit += self.cfg.window_frames // self.cfg.block_frames + 2
        self._layer = torch.compile(cached_layer, dynamic=False, **options)

    @torch.no_grad()
    def set_prompt(self, text: torch.Tensor) -> None:
        """The prompt's embeddings (B, ≤ text_len, text_dim) for the blocks that follow (no re-cache)."""
        self.cache.set_text(self.model.text_kv(text))

    def _pass(self, x: torch.Tensor, timesteps: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
              span: int) -> torch.Tensor:
        """One model pass over the block at `timesteps` (B, N): each layer writes its keys/values into the
        block's slots and attends over the first `span` slots; returns the velocity."""
        cache, tokens = self.cache, span * self.cfg.tokens_per_frame
        index = cache.token_index(slots)
        return self.model.run(x, timesteps, positions, lambda i, blk, h, e0, rope: self._layer(
            blk, h, e0, rope, cache.text_k[i], cache.text_v[i], cache.k[i], cache.v[i], index, tokens))

    def _block_frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions and cache slots of the next block's frames (device tensors)."""
        positions = self.cache.frame + self.cache._offsets
        return positions, self.cache.slots(positions)

    def block_body(self, noise: torch.Tensor, span: int, source: torch.Tensor | None = None) -> torch.Tensor:
        """The graph-capturable part of a block: `noise` (steps, B, in_dim, N, h, w) float32, the start
        noise then one fresh noise per re-noising; returns the clean block x_0 (B, in_dim, N, h, w).
        Reads and advances only device state (the frame position, the cache, the slot map).
        `source`: video-to-video, an input block's clean latents, put at the strength's noise level with
        noise[0] and denoised through the steps left (`set_strength`)."""
        positions, slots = self._block_frames()
        rows = self._rows if source is None else self._v2v_rows
        x0 = x = noise[0] if source is None else source
        if source is not None and rows:
            x = flow_renoise(source, noise[0], rows[0][1])
        for i, (timesteps, sigma, sigma_next) in enumerate(rows):
            x0 = flow_x0(x, self._pass(x, timesteps, slots, positions, span).float(), sigma)
            if i + 1 < len(rows):
                x = flow_renoise(x0, noise[i + 1], sigma_next)
        self.append_body(source if source is not None and self.cache_input else x0, span)
        return x0

    def append_body(self, x0: torch.Tensor, span: int) -> torch.Tensor:
        """The cache-write pass: the clean block at the context timestep (Self-Forcing passes x_0 itself,
        labelled context_noise); its keys/values stay in the cache and the window moves on by a block.
        Returns that pass's velocity."""
        cache = self.cache
        positions, slots = self._block_frames()
        cache.latents.index_copy_(2, slots, x0.float())
        cache.positions.index_copy_(0, slots, positions)
        velocity = self._pass(x0, self._context_t, slots, positions, span)
        cache.frame.add_(self.cfg.block_frames)
        return velocity

    @torch.no_grad()
    def step(self, noise: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise the next block (see `block_body`)."""
        x0 = self.block_body(noise, self.cache.span, source)
        self.cache.frames_written += self.cfg.block_frames
        return x0

    @torch.no_grad()
    def append(self, x0: torch.Tensor) -> torch.Tensor:
        """Cache a given clean block instead of generating it (Self-Forcing's initial_latent path:
        video extension, or the frames of an input video)."""
        velocity = self.append_body(x0, self.cache.span)
        self.cache.frames_written += self.cfg.block_frames
        return velocity

    @torch.no_grad()
    def recache(self, text: torch.Tensor) -> None:
        """Prompt switch (LongLive's re-cache): the new prompt's text keys/values, and every held frame's
        keys/values recomputed from its clean latents under the new prompt, in one pass over the held
        frames at their absolute positions with `block_causal_mask`, so that with an unchanged prompt
        and an unturned ring the cache comes back as it was.

        LongLive's own (pipeline/interactive_causal_inference.py, _recache_after_switch) differs in two
        details: its cache path ignores the block mask, so the re-run frames see each other both ways,
        and with `global_sink: false` (its interactive config) it zeroes the cache and its re-run does not
        rewrite the sink slots once past them, which stay zero."""
        self.set_prompt(text)
        held, cache, tokens = self.cache.held, self.cache, self.cache.held * self.cfg.tokens_per_frame
        if not held:
            return
        positions = cache.positions[:held]
        mask = block_causal_mask(self.cfg, positions)

        def layer(i, blk, h, e0, rope):
            def attend(q, k, v):
                cache.k[i, :, :, :tokens].copy_(k)
                cache.v[i, :, :, :tokens].copy_(v)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            return blk(h, e0, rope, (cache.text_k[i], cache.text_v[i]), attend)

        x = cache.latents[:, :, :held]
        timesteps = torch.full(x.shape[:1] + x.shape[2:3], float(self.cfg.context_timestep), device=x.device)
        self.model.run(x, timesteps, positions, layer)


class CapturedBlockStep:
    """`stepper.step` as CUDA-graph replays: one graph per span, captured on first use, with the noise
    copied into a static input. Needs a CUDA device. The latents `step` returns are the graph's static
    output: valid until the next step."""

    def __init__(self, stepper: BlockStepper):
        self.stepper = stepper
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all graphs: they replay one at a time

    @torch.no_grad()
    def capture(self, span: int, noise: torch.Tensor) -> None:
        """Warm up on a side stream (PyTorch's capture rule), then capture; the warm-up's writes land in
        the slots the next real block writes before reading, and the frame position is restored."""
        stepper, frame = self.stepper, self.stepper.cache.frame.clone()
        static_noise = noise.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                stepper.block_body(static_noise, span)
                stepper.cache.frame.copy_(frame)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = stepper.block_body(static_noise, span)
        self.graphs[span] = (graph, static_noise, out)

    @torch.no_grad()
    def step(self, noise: torch.Tensor) -> torch.Tensor:
        span = self.stepper.cache.span
        if span not in self.graphs:
            self.capture(span, noise)
        graph, static_noise, out = self.graphs[span]
        static_noise.copy_(noise)
        graph.replay()
        self.stepper.cache.frames_written += self.stepper.cfg.block_frames
        return out
