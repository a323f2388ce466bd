"""One frame of the Mirage loop, written once for every backend and array library.

Per frame (paper notation in mirage.model.diffusion; eta = 0), for every row b of the batch
(a row is one independent stream: its own memory, ages, slot and noise seed):

    1. x ~ N(0, I)                                   (x_T)
    2. for each DDIM step i:  v = denoise(x, t_i, cond, memory, ages)
                              x = p_i x + q_i v       (the DDIM update folded into two scalars)
    3. frame = clamp(x, -1, 1)                      (a latent model keeps x: its context is the latent)
    4. ctx = α_c frame + σ_c noise                    (history augmentation at inference)
    5. kv = context_encode(ctx, t_ctx); memory[b, slot_b] = kv_b; ages_b += (ages_b > 0);
       ages[b, slot_b] = 1; slot_b = (slot_b + 1) mod K

A row whose `advance` flag is 0 is computed but commits nothing (no ring write, no noise
draw counted): its stream is held, and its next frame is the one it would have had (stream
slots that wait for an input). Every tensor is a buffer allocated once, and the slot indices,
noise counters and advance flags live in buffers too, so the whole frame can be captured in one CUDA graph and replayed with no host
work in between. `Ops` does the element-wise work for one array library (numpy here, torch in
mirage.model.torch_ops, NVRTC kernels in mirage.runtime.cuda); a backend only runs graphs on
buffers. The noise is drawn by the loop, not the backend, from a counter-based generator
(`normal`) that every Ops implements identically: the same seed gives the same video on every
backend, and a row's noise depends on its own seed and frame count alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from mirage.core import graphs as G
from mirage.core.schedule import ALPHAS_CUMPROD, CONTEXT_NOISE, ddim_coefficients, ddim_step

Array = Any  # numpy.ndarray, torch.Tensor or runtime.cuda.DeviceBuffer: the loop never looks inside


class Backend(Protocol):
    """What the pipeline needs of a backend: where its buffers live and how to run a graph."""

    device: str  # "cpu" | "cuda:N": where its buffers live (made by the pipeline's plumbing: runtime.execution)

    def buffer_dtype(self, graph: str, name: str) -> str:
        """numpy dtype name of the buffer for tensor `name` of `graph`."""

    def use_stream(self, stream) -> None:
        """The stream graphs are enqueued on (GPU backends; the one the frame graph captures)."""

    def run(self, graph: str, inputs: dict[str, Array], output: Array | dict[str, Array]) -> None:
        """Run `graph` on the input buffers, writing into `output` (asynchronously where the device allows);
        a graph with several outputs (the DiT's) gets them as {output name: buffer}."""

    def close(self) -> None: ...


class Ops(Protocol):
    def randn_(self, buf: Array, rng: Array, advance: Array) -> None:
        """Fill buf (B, ...) with N(0, 1) from each row's (seed, counter) in rng (B, 2) int64;
        counters += advance (B,)."""

    def lincomb_(self, dst: Array, a: float, x: Array, b: float, y: Array) -> None: ...

    def lincomb_rows_(self, dst: Array, a: Array, x: Array, b: Array, y: Array) -> None:
        """dst[r] = a[r] x[r] + b[r] y[r] for each row r: lincomb_ with per-row coefficients a, b (B,) float32
        (buffers, so a captured graph reads the values the host staged for this unit)."""

    def clamp_(self, dst: Array, src: Array) -> None: ...

    def ring_write_(self, memory: Array, ages: Array, slot: Array, kv: Array, advance: Array) -> None:
        """For rows with advance[b] = 1: memory[b, slot[b]] = kv[b]; filled slots age by one, the
        written one becomes 1; slot += 1 mod K. Other rows are left as they are."""

    def reset_row_(self, buf: "Buffers", row: int, seed: int) -> None:
        """Empty row `row`'s memory, ages and slot, and restart its noise at (seed, 0) (advance unchanged).
        On a GPU: enqueued on the current stream like a frame's ops, with no host wait (the execution
        orders it between the frames in flight and the next: runtime.execution)."""

    def seed_row_(self, rng: Array, row: int, seed: int) -> None:
        """Restart row `row`'s noise at (seed, 0) (enqueued like reset_row_)."""

    def scatter_rows_(self, dst: Array, src: Array, rows: Array, advance: Array, axis: int) -> None:
        """For rows b with advance[b] = 1: dst[b, ..., rows[b, j], ...] = src[b, ..., j, ...] along `axis` (> 0)
        of both (the DiT's cache write: dst (B, L, H, R, D), src (B, L, H, n, D), rows (B, n) int32, axis 3).
        Other rows are left as they are."""

    def gather_rows_(self, dst: Array, src: Array, rows: Array, axis: int) -> None:
        """dst[b, ..., j, ...] = src[b, ..., rows[b, j], ...] along `axis` (> 0), for every row b."""

    def preview_(self, dst: Array, src: Array) -> None:
        """Latent frames as pictures: dst (B·N, 3, H, W) = clamp(channels 0..2 of src (B, C, N, h, w), -1, 1),
        each latent pixel an (H / h) x (W / w) square (a DiT artifact without a decoder graph shows these)."""

    def to_uint8_(self, dst: Array, finite: Array, src: Array) -> None:
        """A frame for the host as bytes: dst (B, H, W, 3) uint8 = src (B, 3, H, W) mapped as
        mirage.core.video_io.to_uint8 maps a float32 frame; finite (B,) uint8 = 1 where row b of src is
        all finite (bytes cannot carry a NaN, and a NaN frame must still stop the run)."""

    def to_float_(self, dst: Array, src: Array) -> None:
        """An input frame from the host's bytes: dst (B, 3, H, W) = video_io.to_float of src (B, H, W, 3) uint8."""

    def fill_(self, dst: Array, value: float) -> None:
        """Every element of dst (float32 or int64) set to value (the timesteps, the advance flags)."""


Callback = Callable[[dict], None]  # {"graph", "step" (DDIM step index; None for context_encode), "inputs", "output"}


@dataclass(frozen=True)
class Schedule:
    """Host-side constants of the loop: per DDIM step (t_i, p_i, q_i), and the context noise."""

    timesteps: tuple[float, ...]
    p: tuple[float, ...]
    q: tuple[float, ...]
    t_ctx: float
    ctx_alpha: float
    ctx_sigma: float

    @classmethod
    def make(cls, coefficients: list[list[float]], abar_ctx: float, t_ctx: float) -> "Schedule":
        """From rows [t, α_t, σ_t, α_prev, c_eps, c_rand] of schedule.ddim_coefficients (eta = 0)."""
        if any(row[5] > 0 for row in coefficients):
            raise ValueError("the runtime loop is deterministic DDIM (eta = 0)")
        # the DDIM step is linear in (x, v): x_prev = p x + q v, p = step(x=1, v=0), q = step(x=0, v=1)
        p = tuple(ddim_step(1.0, 0.0, *r[1:5]) for r in coefficients)
        q = tuple(ddim_step(0.0, 1.0, *r[1:5]) for r in coefficients)
        return cls(tuple(float(r[0]) for r in coefficients), p, q, float(t_ctx), math.sqrt(abar_ctx),
                   math.sqrt(1 - abar_ctx))

    @classmethod
    def ddim(cls, steps: int, context_noise: int = CONTEXT_NOISE) -> "Schedule":
        return cls.make(ddim_coefficients(steps), ALPHAS_CUMPROD[context_noise], context_noise)


@dataclass
class Buffers:
    """Every buffer one frame touches; allocated once by the pipeline (shapes: core.graphs specs)."""

    x: Array  # (B, C, H, W) x_t, updated in place
    v: Array  # (B, C, H, W) denoiser output
    frame: Array  # (B, C, H, W) the finished frame
    noise: Array  # (B, C, H, W) context noise
    ctx: Array  # (B, C, H, W) noised frame fed to context_encode
    kv: Array  # (B, 2, N, D) one memory slot
    memory: Array  # (B, K, 2, N, D) the ring buffer
    ages: Array  # (B, K) int32, 0 = empty
    slot: Array  # (B,) int64, next slot to write per row
    rng: Array  # (B, 2) int64, per row (seed, draws so far)
    advance: Array  # (B,) int64, 1 = the row commits this frame, 0 = held
    t: list[Array]  # per DDIM step, (B,) float32 timesteps
    t_ctx: Array  # (B,) float32
    cond: Array | None  # (B, C, H, W) video-to-video input of the denoiser, or None
    image: Array | None = None  # latent models: (B, 3, S, S) the decoder's output
    cond_image: Array | None = None  # latent video-to-video: (B, 3, S, S) the input frame, encoded into cond
    host: dict[str, Array] = field(default_factory=dict)  # inputs the host computes per unit: none for a frame

    @property
    def made_by(self) -> tuple[str, tuple[str, Array]]:
        """What a finite check blames: the graph that makes the frame, and (graph, buffer) of the memory's
        new entry."""
        return G.DECODE if self.image is not None else G.DENOISE, (G.CONTEXT, self.kv)

    @property
    def input(self) -> Array | None:
        """The buffer a frame's input is staged into."""
        return self.cond_image if self.cond_image is not None else self.cond

    def denoise_inputs(self, step: int) -> dict[str, Array]:
        values = {G.X_T: self.x, G.T: self.t[step], G.COND: self.cond, G.MEMORY: self.memory, G.AGES: self.ages}
        names = (G.X_T, G.T, G.COND, G.MEMORY, G.AGES) if self.cond is not None else (G.X_T, G.T, G.MEMORY, G.AGES)
        return {k: values[k] for k in names}

    def all(self) -> list[Array]:
        """Every buffer (for the stale-graph check: a captured graph holds their addresses)."""
        return [self.x, self.v, self.frame, self.noise, self.ctx, self.kv, self.memory, self.ages, self.slot,
                self.rng, self.advance, *self.t, self.t_ctx] + \
            [b for b in (self.cond, self.image, self.cond_image) if b is not None]


DEFAULT_VIDEO_RATE = 16  # frames per second a U-Net's video plays at (mirage-run --fps's default)


class FrameUnit:
    """The U-Net's unit of work: one frame for every row (`run_frame`) on `Buffers` made from its specs.
    A family's unit (this, or the DiT's core.dit_step.BlockUnit) is what the executions run and capture
    without knowing what it does: `make_buffers`, `host_inputs` (per unit, computed on the host and
    staged), `run` (the captured body), `reset_row`; `frames` per row per unit, `frames_in` input frames
    per row per unit (0: generation), `frame_shape`, `steps`, `controls` (what `Pipeline.control`
    accepts) and `video_rate`."""

    frames = 1
    frames_are = "video frames"
    controls: dict = {}
    video_rate = DEFAULT_VIDEO_RATE

    def __init__(self, cfg, specs: dict, steps: int, context_noise: int):
        self.cfg, self.specs = cfg, specs
        self.schedule = Schedule.ddim(steps, context_noise)
        self.steps = len(self.schedule.timesteps)
        self.frame_shape = (cfg.pixels, cfg.pixels, G.RGB)
        self.frames_in = 1 if cfg.cond_channels else 0

    def make_buffers(self, alloc: Callable, fill: Callable, dtype_of: Callable) -> "Buffers":
        return make_buffers(self.specs, self.schedule, alloc, fill, dtype_of)

    def buffer_bytes(self) -> int:
        return buffer_bytes(self.specs, self.schedule)

    def host_inputs(self, advance) -> dict:
        return {}

    def run(self, backend: Backend, ops: Ops, buf: "Buffers") -> None:
        run_frame(backend, ops, buf, self.schedule)

    def reset_row(self, ops: Ops, buf: "Buffers", row: int, seed: int) -> None:
        ops.reset_row_(buf, row, seed)


def run_frame(backend: Backend, ops: Ops, buf: Buffers, sched: Schedule, callback: Callback | None = None) -> None:
    """One frame for every row of the buffers. `callback` (k-diffusion style) sees each graph call."""
    latent = buf.image is not None
    if buf.cond_image is not None:  # 6: the input frame into the latent space
        _run(backend, G.ENCODE, {G.IMAGE: buf.cond_image}, buf.cond, callback)
    ops.randn_(buf.x, buf.rng, buf.advance)  # 1
    denoise_steps(backend, ops, buf, sched, callback)  # 2
    if not latent:
        ops.clamp_(buf.frame, buf.x)  # 3
    remember(backend, ops, buf, sched, buf.x if latent else buf.frame, callback)  # 4, 5
    if latent:  # 6
        _run(backend, G.DECODE, {G.Z: buf.x}, buf.image, callback)
        ops.clamp_(buf.frame, buf.image)


def denoise_steps(backend: Backend, ops: Ops, buf: Buffers, sched: Schedule, callback: Callback | None = None,
                  first: int = 0) -> None:
    """Step 2: the DDIM steps first .. on buf.x in place (first > 0: x is a sample at that step's
    timestep, a partly noised frame, as in SDEdit)."""
    for i in range(first, len(sched.timesteps)):
        _run(backend, G.DENOISE, buf.denoise_inputs(i), buf.v, callback, step=i)
        ops.lincomb_(buf.x, sched.p[i], buf.x, sched.q[i], buf.v)


def remember(backend: Backend, ops: Ops, buf: Buffers, sched: Schedule, frame: Array,
             callback: Callback | None = None) -> None:
    """Steps 4 and 5: `frame` noised to t_ctx, encoded and written into each advancing row's ring slot."""
    ops.randn_(buf.noise, buf.rng, buf.advance)
    ops.lincomb_(buf.ctx, sched.ctx_alpha, frame, sched.ctx_sigma, buf.noise)
    _run(backend, G.CONTEXT, {G.FRAME: buf.ctx, G.T_CTX: buf.t_ctx}, buf.kv, callback)
    ops.ring_write_(buf.memory, buf.ages, buf.slot, buf.kv, buf.advance)


def _run(backend: Backend, graph: str, inputs: dict, output: Array, callback: Callback | None,
         step: int | None = None) -> None:
    backend.run(graph, inputs, output)
    if callback is not None:
        callback({"graph": graph, "step": step, "inputs": inputs, "output": output})


# ---------------------------------------------------------------------------------------------
# The counter-based normal generator (splitmix64 + Box-Muller). Element j of row b at draw c:
#   r = mix(seed_b ^ mix(c * 2^32 + j)),  u1 = (r >> 40 + 1) / (2^24 + 1),  u2 = (r & (2^24 - 1) + 0.5) / 2^24
#   n = sqrt(-2 ln u1) cos(2π u2)
# mirage.model.torch_ops and runtime.cuda implement the same formula.
GOLDEN_GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


# Seeds the CLIs and the server accept: 0 <= seed <= MAX_SEED. The generator keys on a seed's low 64
# bits (int64_bits), so a larger int would silently be another seed's video; a non-negative int64 is
# also what every JSON reader and the int64 rng buffer hold as written.
MAX_SEED = 2 ** 63 - 1


def int64_bits(value: int) -> int:
    """The int64 with the low 64 bits of `value`: how a seed (any Python int) is stored in rng[b, 0],
    and how torch, which has no uint64 arithmetic, holds the generator's constants."""
    u = value % (1 << 64)
    return u - (1 << 64) if u >= 1 << 63 else u


def _mix(z):
    import numpy as np

    with np.errstate(over="ignore"):
        z = z + np.uint64(GOLDEN_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def normal(seed: int, counter: int, n: int):
    """n float32 draws of row (seed, counter), numpy."""
    import numpy as np

    j = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        r = _mix(np.uint64(seed & (2**64 - 1)) ^ _mix(np.uint64(counter) * np.uint64(1 << 32) + j))
    u1 = ((r >> np.uint64(40)).astype(np.float32) + np.float32(1)) * np.float32(1 / 16777217)
    u2 = ((r & np.uint64(0xFFFFFF)).astype(np.float32) + np.float32(0.5)) * np.float32(1 / 16777216)
    return np.sqrt(np.float32(-2) * np.log(u1)) * np.cos(np.float32(2 * math.pi) * u2)


class NumpyOps:
    def __init__(self):
        import numpy as np

        self.np = np

    def randn_(self, buf, rng, advance):
        n = buf[0].size
        for b in range(buf.shape[0]):
            buf[b] = normal(int(rng[b, 0]), int(rng[b, 1]), n).reshape(buf.shape[1:])
        rng[:, 1] += advance

    def lincomb_(self, dst, a, x, b, y):
        self.np.add(a * x, b * y, out=dst, casting="unsafe")

    def lincomb_rows_(self, dst, a, x, b, y):
        rows = (-1,) + (1,) * (x.ndim - 1)
        self.np.add(a.reshape(rows) * x, b.reshape(rows) * y, out=dst, casting="unsafe")

    def clamp_(self, dst, src):
        self.np.clip(src, -1.0, 1.0, out=dst, casting="unsafe")

    def ring_write_(self, memory, ages, slot, kv, advance):
        rows = self.np.flatnonzero(advance)
        memory[rows, slot[rows]] = kv[rows]
        ages[rows] += ages[rows] > 0
        ages[rows, slot[rows]] = 1
        slot[rows] = (slot[rows] + 1) % memory.shape[1]

    def reset_row_(self, buf, row, seed):
        buf.memory[row] = 0
        buf.ages[row] = 0
        buf.slot[row] = 0
        self.seed_row_(buf.rng, row, seed)

    def seed_row_(self, rng, row, seed):
        rng[row] = (int64_bits(seed), 0)

    def scatter_rows_(self, dst, src, rows, advance, axis):
        for b in self.np.flatnonzero(advance):
            self.np.moveaxis(dst[b], axis - 1, 0)[rows[b]] = self.np.moveaxis(src[b], axis - 1, 0)

    def gather_rows_(self, dst, src, rows, axis):
        for b in range(len(dst)):
            self.np.moveaxis(dst[b], axis - 1, 0)[...] = self.np.moveaxis(src[b], axis - 1, 0)[rows[b]]

    def preview_(self, dst, src):
        b, _, n, h, w = src.shape
        rgb = self.np.clip(src[:, :3].astype(self.np.float32), -1.0, 1.0).transpose(0, 2, 1, 3, 4)
        dst[...] = rgb.reshape(b * n, 3, h, w).repeat(dst.shape[2] // h, 2).repeat(dst.shape[3] // w, 3)

    def to_uint8_(self, dst, finite, src):
        from mirage.core.video_io import to_uint8

        frame = src.astype(self.np.float32)  # as a float frame reaches the host
        finite[...] = self.np.isfinite(frame).reshape(len(frame), -1).all(axis=1)
        with self.np.errstate(invalid="ignore"):  # a non-finite row's bytes are garbage, and flagged
            dst[...] = to_uint8(frame.transpose(0, 2, 3, 1))

    def to_float_(self, dst, src):
        from mirage.core.video_io import to_float

        dst[...] = to_float(src).transpose(0, 3, 1, 2)

    def fill_(self, dst, value):
        dst[...] = value


def make_buffers(specs: dict, schedule: Schedule, alloc: Callable, fill: Callable, dtype_of: Callable) -> Buffers:
    """Every buffer of a frame at the specs' shapes: alloc(shape, dtype) makes a zeroed buffer,
    fill(buf, value) sets one (Ops.fill_), dtype_of(graph, name) is the backend's dtype for a tensor."""
    d, c = specs[G.DENOISE], specs[G.CONTEXT]

    def new(spec, name):
        return alloc(spec.tensor(name).shape, dtype_of(spec.name, name))

    b = d.inputs[0].shape[0]
    t = [new(d, G.T) for _ in schedule.timesteps]
    for buf, value in zip(t, schedule.timesteps):
        fill(buf, value)
    t_ctx = new(c, G.T_CTX)
    fill(t_ctx, schedule.t_ctx)
    cond = new(d, G.COND) if G.COND in d.input_names else None
    advance = alloc((b,), "int64")
    fill(advance, 1)
    dec = specs.get(G.DECODE)
    return Buffers(x=new(d, G.X_T), v=new(d, G.V), frame=new(dec, G.IMAGE) if dec else new(d, G.X_T),
                   noise=new(c, G.FRAME), ctx=new(c, G.FRAME), kv=new(c, G.KV), memory=new(d, G.MEMORY),
                   ages=new(d, G.AGES), slot=alloc((b,), "int64"), rng=alloc((b, 2), "int64"), advance=advance, t=t,
                   t_ctx=t_ctx, cond=cond, image=new(dec, G.IMAGE) if dec else None,
                   cond_image=new(specs[G.ENCODE], G.IMAGE) if G.ENCODE in specs else None)


def buffer_bytes(specs: dict, schedule: Schedule) -> int:
    """The memory make_buffers takes for these specs, counted without allocating (the runtime's
    memory estimate beyond the weights). It errs low, leaving out the backends' own activations, so
    a check against it refuses what cannot fit, not everything that will not."""
    import numpy as np

    sizes = []

    def count(shape, dtype):
        sizes.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)

    make_buffers(specs, schedule, count, lambda buf, value: None, lambda graph, name: specs[graph].tensor(name).dtype)
    return sum(sizes)
