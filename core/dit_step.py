"""The DiT's block loop over its pure graphs (torch-free): what a runtime does around
`dit_step` / `dit_cache_write` (see mirage.core.graphs), written once for every backend.

The graphs take the rolling KV cache as inputs and return the block's new keys/values; this module
owns the cache (batch-first, in the graphs' float dtype), computes the static per-block inputs
(timestep embeddings and RoPE angles in float64, as mirage.model.dit does; the block's cache rows and
the rows' validity) and writes the cache-write pass's keys/values into the block's rows. Frame f lives
in slot f while f < sink_frames, else in sink + (f - sink) mod (window - sink), as in
mirage.model.dit_cache.RollingKVCache.

`BlockUnit` is the family's unit of work in the runtime (mirage.runtime.pipeline), and the one driver of
these graphs (export parity runs it too, through the runtime's CpuExecution): the block on buffers allocated
once from the specs, through the loop's Backend and Ops, each row its own stream at its own frame, so one
unit is one CUDA-graph replay on a GPU. With a codec's graphs (a per-frame autoencoder's, or TAEHV's with its
state) it decodes the block, and with a strength it restyles input blocks (video-to-video), each row at its own
strength.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from mirage.core import graphs as G
from mirage.core import taehv_layout as taehv
from mirage.core.config import check_cache_from
from mirage.core.errors import MirageError
from mirage.core.flow_schedule import block_schedule, strength_schedule

FRAME_SLOTS = "frame_slots"  # (B, N) int32: the cache slot of each frame of the block (not a graph input)


class RecacheError(MirageError):
    """A prompt switch whose re-cache the cache's layout does not allow."""
Array = Any  # as core.loop's: numpy, torch or device buffers


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


def block_inputs(cfg, starts) -> dict[str, np.ndarray]:
    """The static inputs of a block whose row b starts at absolute frame starts[b] (each row its own
    stream at its own frame): RoPE angles, the cache rows its frames take (`slots`) and the rows it
    attends over (`valid`: held frames plus its own)."""
    starts = np.asarray(starts, np.int64)
    t, n = cfg.tokens_per_frame, cfg.block_frames
    frames = starts[:, None] + np.arange(n)  # (B, N)
    sink, ring = cfg.sink_frames, cfg.window_frames - cfg.sink_frames
    slots = np.where(frames < sink, frames, sink + (frames - sink) % ring)
    rows = (slots[:, :, None] * t + np.arange(t)).reshape(len(starts), -1)
    span = np.minimum(starts + n, cfg.window_frames)  # the held prefix, then the whole window
    valid = (np.arange(cfg.window_frames * t)[None] < span[:, None] * t).astype(np.float32)
    cos, sin = rope_tables(cfg, frames)
    return {G.ROPE_COS: cos, G.ROPE_SIN: sin, G.SLOTS: rows.astype(np.int32), G.VALID: valid,
            FRAME_SLOTS: slots.astype(np.int32)}


def held_blocks(cfg, start: int) -> np.ndarray:
    """(blocks, N) absolute positions of the frames a stream at frame `start` holds in its cache, block by
    block, oldest first: every frame until the window is full, then the sink and the ring's latest."""
    n, window, sink = cfg.block_frames, cfg.window_frames, cfg.sink_frames
    held = np.arange(start) if start <= window else \
        np.concatenate([np.arange(sink), np.arange(start - (window - sink), start)])
    if sink % n or window % n:
        raise RecacheError(f"re-caching a prompt switch needs whole blocks in the cache: sink_frames={sink} and "
                           f"window_frames={window} must be multiples of block_frames={n}")
    return held.reshape(-1, n)


# Wan 2.1 plays its video at 16 fps, vae_stride[0] (4) video frames per latent frame
WAN_VIDEO_RATE = 16
_T_CTX = "t_emb_ctx"  # the host input of the cache-write pass's timestep embedding; steps' are t_emb_<i>
# per-row (B,) float32 host inputs: the video-to-video start x = (1 - s) source + s noise[0], and per pass i
# x0 = x + x0_v_<i> v (-σ) and the re-noising x = x_<i> x0 + noise_<i> noise[i + 1] (1 - σ_next, σ_next)
_START_SOURCE, _START_NOISE = "start_source", "start_noise"
# a temporal codec's state (TAEHV's memory and carry) moves on only in the rows that advance: per-row (B,) float32
# host inputs state = keep · state + take · new, 1 and 0 for a held row (`fresh`, G.FRESH, is the third such input)
_KEEP, _TAKE = "state_keep", "state_take"


def _t_step(i: int) -> str:
    return f"t_emb_{i}"


def _coefficients(i: int) -> tuple[str, str, str]:
    return f"x0_v_{i}", f"x_{i}", f"noise_{i}"


def frames_are(specs: dict[str, G.GraphSpec]) -> str:
    """What a DiT's frames out of the runtime show (the reports and manifests say it): video frames where its
    graphs include a decoder, else a preview of its latents."""
    if G.DECODE not in specs:
        return "latent preview: channels 0-2 of each latent frame, clamped to [-1, 1] (no decoder graph)"
    if G.state_inputs(specs[G.DECODE]):
        return f"video frames (a stream's first {taehv.WARM_UP_FRAMES} are TAEHV's warm-up frames)"
    return "video frames"


class VideoToVideoError(MirageError):
    """Video-to-video asked of a DiT that cannot do it, or at a strength outside [0, 1]."""


def check_strength(strength: float) -> float:
    if not 0 <= strength <= 1:
        raise VideoToVideoError(f"strength {strength}: choose a value in [0, 1]")
    return float(strength)


@dataclass
class BlockBuffers:
    """Every buffer one block touches; allocated once (shapes: the specs of core.graphs.dit_graphs)."""

    x: Array  # (B, in_dim, N, h, w) the block at the current noise level
    v: Array  # (B, out_dim, N, h, w) the velocity
    x0: Array  # (B, in_dim, N, h, w) the clean block it implies
    noise: list[Array]  # per pass, (B, in_dim, N, h, w): the start noise, then one per re-noising
    text: Array  # (B, text_len, text_dim) each row's prompt embeddings
    text_k: Array  # (B, L, H, text_len, D), and text_v: the prompt's cross-attention keys/values
    text_v: Array
    cache_k: Array  # (B, L, H, W·T, D), and cache_v: the rolling KV cache
    cache_v: Array
    latents: Array  # (B, in_dim, W, h, w) the clean latents of the frames in the cache, by slot (for a re-cache)
    new_k: Array  # (B, L, H, N·T, D), and new_v: a pass's keys/values of the block
    new_v: Array
    host: dict[str, Array]  # per block from the host: RoPE angles, slots, validity, timestep embeddings, coefficients
    rng: Array  # (B, 2) int64, per row (seed, draws so far)
    advance: Array  # (B,) int64, 1 = the row commits this block, 0 = held
    frame: Array  # (B·F, 3, H, W): the block's F frames a row, row-major (decoded, or the latents' float32 preview)
    one: Array  # (B,) float32 ones (flow_x0's coefficient of x)
    frame_graph: str = G.DIT_STEP  # the graph a non-finite frame is blamed on: dit_step, or decode
    input: Array | None = None  # video-to-video: (B·F, 3, H, W) the block's input frames; generation: None
    source: Array | None = None  # video-to-video: (B, in_dim, N, h, w) their latents
    # a temporal codec's state, (graph, input name) -> (the state each row holds, the graph's new state)
    state: dict[tuple[str, str], tuple[Array, Array]] = field(default_factory=dict)

    @property
    def made_by(self) -> tuple[str, tuple[str, Array]]:
        return self.frame_graph, (G.DIT_CACHE_WRITE, self.new_k)

    def all(self) -> list[Array]:
        return [self.x, self.v, self.x0, *self.noise, self.text, self.text_k, self.text_v, self.cache_k, self.cache_v,
                self.latents, self.new_k, self.new_v, *self.host.values(), self.rng, self.advance, self.frame,
                self.one] + [b for b in (self.input, self.source) if b is not None] + \
            [b for pair in self.state.values() for b in pair]


class BlockUnit:
    """The DiT's unit of work (see core.loop.FrameUnit for the interface): one block of N latent frames for
    every row, flow-matching passes of `dit_step` and the `dit_cache_write` pass, the block's keys/values
    scattered into each advancing row's cache rows, and the clean latents decoded into frames by the
    artifact's `decode` graph, else shown as their preview (`Ops.preview_`). Each row's frame position lives on
    the host (`starts`): the RoPE angles, slots and validity of its next block are computed there and staged
    with the block.

    The codec is a per-frame autoencoder (one video frame per latent frame) or TAEHV (4 per latent frame, F = 4N
    a block): TAEHV's graphs take their state (MemBlock memory, the encoder's carried frames) as inputs and give
    its new value as outputs (core.graphs.taehv_graphs); it lives in buffers here, and the new value is copied in
    only for the rows that advance (a held row keeps its state), with per-row coefficients, so nothing branches.
    A row at frame 0 is `fresh`: the graphs take its state as a new video's, so a reset needs nothing more.

    Video-to-video (`strength` not None; needs the `encode` graph): each row's input block is encoded, put at
    its row's noise level σ = strength and denoised through the steps left (flow_schedule.strength_schedule,
    as model.dit_cache.BlockStepper does it), each row at its own strength in the one batched block: a row's
    passes come first and the passes after them leave it as it is (σ = 0: x0 = x), its timesteps and σs are
    per-row host inputs, so nothing in the captured block branches on a row."""

    def __init__(self, cfg, specs: dict[str, G.GraphSpec], strength: float | None = None, max_strength: float = 1.0,
                 cache_from: str = "output"):
        self.cfg, self.specs = cfg, specs
        self.v2v, self.decodes = strength is not None, G.DECODE in specs
        if self.v2v and G.ENCODE not in specs:
            raise VideoToVideoError(f"{cfg.name} has no encoder graph: video-to-video needs a DiT on a per-frame "
                                    "autoencoder (a config with `autoencoder`, such as dit-tiny-taesd) or a TAEHV "
                                    "--decoder with its encoder (taew2_1.pth)")
        # the block the cache-write pass takes (core.config.CACHE_FROM): the input's latents or the output's
        self.cache_input = check_cache_from(cache_from) == "input"
        if self.cache_input and not self.v2v:
            raise VideoToVideoError("cache_from='input' caches a video-to-video block's input; generation has none")
        self.default_strength = 1.0 if strength is None else check_strength(strength)
        self.max_strength = check_strength(max_strength) if self.v2v else 1.0
        self.controls = {"prompt": True, **({"strength": (0.0, self.max_strength)} if self.v2v else {})}
        self.frames_are = frames_are(specs)
        self.batch = specs[G.DIT_STEP].tensor(G.X_T).shape[0]
        # video frames a block shows (and, video-to-video, takes): the decoder's, else one preview per latent frame
        self.frames = specs[G.DECODE].output.shape[0] // self.batch if self.decodes else cfg.block_frames
        self.video_rate = WAN_VIDEO_RATE * self.frames / (cfg.block_frames * cfg.vae_stride[0])
        self.schedule = block_schedule(cfg.denoising_steps, cfg.timestep_shift, cfg.warp_denoising_step)
        self.steps = len(self.schedule)
        self.frames_in = self.frames if self.v2v else 0
        # a temporal codec's state (TAEHV's; else ()), of the graphs a block runs: encode only for video-to-video
        self.state = {g: G.state_inputs(specs[g]) for g in (G.ENCODE,) * self.v2v + (G.DECODE,) if g in specs}
        self.temporal = any(self.state.values())
        # passes per block: the most any row's strength may need (max_strength 1: the whole schedule from noise);
        # at least one, which at strength 0 takes the input as the clean block (σ = 0: x0 = x)
        self.passes = max(1, len(strength_schedule(self.schedule, self.max_strength))) if self.v2v else self.steps
        self.frame_shape = (cfg.height, cfg.width, G.RGB)
        self.text_shape = (cfg.text_len, cfg.text_dim)  # a prompt's embeddings, padded
        self.starts = np.zeros(self.batch, np.int64)  # each row's next block's first frame
        self.strengths = np.full(self.batch, self.default_strength)  # each row's (generation: 1, from noise)
        self._passes: dict[tuple, dict[str, np.ndarray]] = {}  # the rows' strengths -> their per-pass host inputs
        # the cache-write pass's timestep embedding: the same for every block (a float32 timestep, as
        # BlockStepper keeps it)
        self.t_ctx = timestep_embedding(cfg, np.full((self.batch, cfg.block_frames), float(cfg.context_timestep),
                                                     np.float32))

    def set_strength(self, row: int, strength: float) -> None:
        """Row `row`'s strength from its next block on (video-to-video)."""
        if not self.v2v:
            raise VideoToVideoError(f"{self.cfg.name} runs generation here: a strength needs video-to-video "
                                    "(open it with a strength)")
        if check_strength(strength) > self.max_strength:
            raise VideoToVideoError(f"strength {strength} is over this pipeline's max_strength {self.max_strength:g}, "
                                    f"for which its block runs {self.passes} flow pass(es); open it with a higher "
                                    "max_strength (mirage-serve --max-strength)")
        self.strengths[row] = strength

    def pass_inputs(self) -> dict[str, np.ndarray]:
        """The per-pass host inputs of the rows' strengths: timestep embeddings (B, N, freq_dim) and the
        per-row coefficients of the start, of flow_x0 and of the re-noising (made once per set of strengths)."""
        key = tuple(self.strengths) if self.v2v else ()
        if key not in self._passes:
            idle = (float(self.cfg.context_timestep), 0.0, 0.0)  # a pass that leaves the row as it is
            rows = []
            for s in self.strengths:
                own = strength_schedule(self.schedule, float(s)) if self.v2v else self.schedule
                rows.append(own + [idle] * (self.passes - len(own)))
            table = np.array(rows, np.float64)  # (B, passes, 3): t, σ, σ_next
            frames = (self.batch, self.cfg.block_frames)
            feeds = {_START_SOURCE: (1 - self.strengths).astype(np.float32),
                     _START_NOISE: self.strengths.astype(np.float32)} if self.v2v else {}
            for i in range(self.passes):
                t, sigma, sigma_next = table[:, i].T
                x0_v, x, noise = _coefficients(i)
                # float32 timesteps, as BlockStepper keeps them (its embedding then widens them to float64)
                feeds[_t_step(i)] = timestep_embedding(self.cfg, np.broadcast_to(t.astype(np.float32)[:, None], frames))
                feeds.update({x0_v: (-sigma).astype(np.float32), x: (1 - sigma_next).astype(np.float32),
                              noise: sigma_next.astype(np.float32)})
            self._passes = {key: feeds}  # one set kept: strengths change rarely, and a server's must not pile up
        return self._passes[key]

    def make_buffers(self, alloc: Callable, fill: Callable, dtype_of: Callable) -> BlockBuffers:
        def new(graph, name):
            return alloc(self.specs[graph].tensor(name).shape, dtype_of(graph, name))

        host = {name: new(G.DIT_STEP, name) for name in (G.ROPE_COS, G.ROPE_SIN, G.SLOTS, G.VALID)}
        host.update({key: new(G.DIT_STEP, G.T_EMB) for key in [_t_step(i) for i in range(self.passes)] + [_T_CTX]})
        host.update({key: alloc((self.batch,), "float32") for key in self.pass_inputs() if key not in host})
        host.update({key: alloc((self.batch,), "float32") for key in self.codec_inputs(np.zeros(self.batch))})
        host[FRAME_SLOTS] = alloc((self.batch, self.cfg.block_frames), "int32")
        advance, one = alloc((self.batch,), "int64"), alloc((self.batch,), "float32")
        fill(advance, 1)
        fill(one, 1.0)
        x = self.specs[G.DIT_STEP].tensor(G.X_T)
        h, w, c = self.frame_shape
        return BlockBuffers(
            x=new(G.DIT_STEP, G.X_T), v=new(G.DIT_STEP, G.V), x0=new(G.DIT_STEP, G.X_T),
            noise=[new(G.DIT_STEP, G.X_T) for _ in range(self.passes)], text=new(G.DIT_TEXT, G.TEXT),
            text_k=new(G.DIT_TEXT, G.TEXT_K), text_v=new(G.DIT_TEXT, G.TEXT_V), cache_k=new(G.DIT_STEP, G.CACHE_K),
            cache_v=new(G.DIT_STEP, G.CACHE_V), new_k=new(G.DIT_STEP, G.NEW_K), new_v=new(G.DIT_STEP, G.NEW_V),
            latents=alloc((self.batch, x.shape[1], self.cfg.window_frames, *x.shape[3:]), dtype_of(G.DIT_STEP, G.X_T)),
            host=host, rng=alloc((self.batch, 2), "int64"), advance=advance, one=one,
            frame=new(G.DECODE, G.IMAGE) if self.decodes else alloc((self.batch * self.frames, c, h, w), "float32"),
            frame_graph=G.DECODE if self.decodes else G.DIT_STEP,
            input=new(G.ENCODE, G.IMAGE) if self.v2v else None, source=new(G.ENCODE, G.Z) if self.v2v else None,
            state={(g, name): (new(g, name), new(g, G.next_state(name))) for g, names in self.state.items()
                   for name in names})

    def buffer_bytes(self) -> int:
        """The memory make_buffers takes, counted without allocating (as core.loop.buffer_bytes)."""
        sizes = []
        self.make_buffers(lambda shape, dtype: sizes.append(int(np.prod(shape)) * np.dtype(dtype).itemsize),
                          lambda buf, value: None, lambda graph, name: self.specs[graph].tensor(name).dtype)
        return sum(sizes)

    def host_inputs(self, advance: np.ndarray) -> dict[str, np.ndarray]:
        """The next block's per-row inputs from the rows' frame positions and strengths; the positions then
        move on by a block for the rows that advance."""
        feeds = {**block_inputs(self.cfg, self.starts), **self.pass_inputs(), _T_CTX: self.t_ctx,
                 **self.codec_inputs(advance)}
        self.starts += self.cfg.block_frames * np.asarray(advance, np.int64)
        return feeds

    def codec_inputs(self, advance: np.ndarray) -> dict[str, np.ndarray]:
        """A temporal codec's per-row inputs: which rows start a video (fresh), whose state moves on (none
        without one)."""
        if not self.temporal:
            return {}
        take = np.asarray(advance, np.float32)
        return {G.FRESH: (self.starts == 0).astype(np.float32), _KEEP: 1 - take, _TAKE: take}

    def run(self, backend, ops, buf: BlockBuffers) -> None:
        """One block for every row: the captured body (no host work, nothing allocated)."""
        static, memory, host = _static(buf), _memory(buf), buf.host
        for noise in buf.noise:
            ops.randn_(noise, buf.rng, buf.advance)
        if self.v2v:  # x = flow_renoise(encode(input), noise[0], strength), per row
            self._code(backend, ops, buf, G.ENCODE, {G.IMAGE: buf.input}, {G.Z: buf.source})
            ops.lincomb_rows_(buf.x, host[_START_SOURCE], buf.source, host[_START_NOISE], buf.noise[0])
        else:
            ops.lincomb_(buf.x, 1.0, buf.noise[0], 0.0, buf.noise[0])
        for i in range(self.passes):
            x0_v, keep, renoise = _coefficients(i)
            backend.run(G.DIT_STEP, {G.X_T: buf.x, G.T_EMB: host[_t_step(i)], **memory, **static},
                        {G.V: buf.v, G.NEW_K: buf.new_k, G.NEW_V: buf.new_v})
            ops.lincomb_rows_(buf.x0, buf.one, buf.x, host[x0_v], buf.v)  # flow_x0
            if i + 1 < self.passes:
                ops.lincomb_rows_(buf.x, host[keep], buf.x0, host[renoise], buf.noise[i + 1])  # flow_renoise
        cached = buf.source if self.cache_input else buf.x0
        ops.scatter_rows_(buf.latents, cached, buf.host[FRAME_SLOTS], buf.advance, 2)
        self._write_cache(backend, ops, buf, cached, static, memory)
        if self.decodes:
            self._code(backend, ops, buf, G.DECODE, {G.Z: buf.x0}, {G.IMAGE: buf.frame})
        else:
            ops.preview_(buf.frame, buf.x0)

    def _code(self, backend, ops, buf: BlockBuffers, graph: str, inputs: dict, outputs: dict) -> None:
        """A codec graph; a temporal codec's with its state, the new state copied in for the advancing rows."""
        state = [(name, *buf.state[graph, name]) for name in self.state[graph]]
        inputs = {**inputs, **({G.FRESH: buf.host[G.FRESH]} if state else {}), **{n: held for n, held, _ in state}}
        backend.run(graph, inputs, {**outputs, **{G.next_state(n): new for n, _, new in state}})
        for _, held, new in state:
            ops.lincomb_rows_(held, buf.host[_KEEP], held, buf.host[_TAKE], new)

    def _write_cache(self, backend, ops, buf: BlockBuffers, clean, static: dict, memory: dict) -> None:
        """The cache-write pass of the clean block `clean` and its keys/values into the block's rows of each
        advancing row."""
        backend.run(G.DIT_CACHE_WRITE, {G.X_T: clean, G.T_EMB: buf.host[_T_CTX], **memory, **static},
                    {G.NEW_K: buf.new_k, G.NEW_V: buf.new_v})
        for cache, new in ((buf.cache_k, buf.new_k), (buf.cache_v, buf.new_v)):
            ops.scatter_rows_(cache, new, buf.host[G.SLOTS], buf.advance, 3)

    def recache_inputs(self, row: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """LongLive's re-cache of row `row` after its prompt changed: per held block, oldest first, the host
        inputs of `recache` (every row given this row's, so no row attends over nothing) and the advance
        flags that let only this row write. Each block sees the held blocks before it and itself, as
        BlockStepper.recache's block-causal pass over the held frames does."""
        cfg = self.cfg
        blocks = held_blocks(cfg, int(self.starts[row]))
        advance = np.zeros(self.batch, np.int64)
        advance[row] = 1
        t = cfg.tokens_per_frame
        for i, positions in enumerate(blocks):
            feeds = {k: np.broadcast_to(v[:1], (self.batch,) + v.shape[1:])
                     for k, v in block_inputs(cfg, positions[:1]).items()}
            seen = [block_inputs(cfg, b[:1])[FRAME_SLOTS][0] for b in blocks[:i + 1]]
            valid = np.zeros(cfg.window_frames * t, np.float32)
            for slot in np.concatenate(seen):
                valid[slot * t:(slot + 1) * t] = 1
            feeds[G.VALID] = np.broadcast_to(valid, (self.batch, valid.size))
            feeds[_T_CTX] = self.t_ctx
            yield feeds, advance

    def recache(self, backend, ops, buf: BlockBuffers) -> None:
        """One held block of the advancing rows (recache_inputs staged) re-run under their current prompt:
        its latents gathered from the cache's, its keys/values written back in place."""
        ops.gather_rows_(buf.x0, buf.latents, buf.host[FRAME_SLOTS], 2)
        self._write_cache(backend, ops, buf, buf.x0, _static(buf), _memory(buf))

    def held(self, row: int) -> bool:
        """Whether row `row` holds frames in its cache (a prompt switch then re-caches them)."""
        return bool(self.starts[row])

    def encode_text(self, backend, buf: BlockBuffers) -> None:
        """Every row's prompt keys/values from its embeddings in buf.text (after a prompt changed)."""
        backend.run(G.DIT_TEXT, {G.TEXT: buf.text}, {G.TEXT_K: buf.text_k, G.TEXT_V: buf.text_v})

    def reset_row(self, ops, buf: BlockBuffers, row: int, seed: int) -> None:
        """Row `row` starts a new video at frame 0 (its old cache rows are masked until rewritten, a temporal
        codec's state is taken as fresh) with noise from `seed`, at the default strength."""
        self.starts[row] = 0
        self.strengths[row] = self.default_strength
        ops.seed_row_(buf.rng, row, seed)


def _static(buf: BlockBuffers) -> dict[str, Array]:
    return {name: buf.host[name] for name in (G.ROPE_COS, G.ROPE_SIN, G.SLOTS, G.VALID)}


def _memory(buf: BlockBuffers) -> dict[str, Array]:
    return {G.TEXT_K: buf.text_k, G.TEXT_V: buf.text_v, G.CACHE_K: buf.cache_k, G.CACHE_V: buf.cache_v}
