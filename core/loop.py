"""One frame of the Mirage loop, written once for every backend and array library.

Per frame (paper notation in mirage.model.diffusion; eta = 0):

    1. x ~ N(0, I)                                   (x_T)
    2. for each DDIM step i:  v = denoise(x, t_i, cond, memory, ages)
                              x = p_i x + q_i v       (the DDIM update folded into two scalars)
    3. frame = clamp(x, -1, 1)
    4. ctx = α_c frame + σ_c noise                    (history augmentation at inference)
    5. kv = context_encode(ctx, t_ctx); memory[slot] = kv; ages += (ages > 0); ages[slot] = 1;
       slot = (slot + 1) mod K

Every tensor is a buffer allocated once, and the slot index lives in a buffer too, so the
whole frame can be captured in one CUDA graph and replayed with no host work in between.
`Ops` does the element-wise work for one array library (numpy on the CPU, torch anywhere);
a backend only runs graphs on buffers (`backend.run(graph, inputs, output)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from mirage.core import graphs as G

Array = Any  # numpy.ndarray or torch.Tensor: the loop never looks inside


class Backend(Protocol):
    def run(self, graph: str, inputs: dict[str, Array], output: Array) -> None:
        """Run `graph` on the input buffers, writing into `output` (asynchronously where the device allows)."""


class Ops(Protocol):
    def randn_(self, buf: Array) -> None: ...

    def lincomb_(self, dst: Array, a: float, x: Array, b: float, y: Array) -> None: ...

    def clamp_(self, dst: Array, src: Array) -> None: ...

    def ring_write_(self, memory: Array, ages: Array, slot: Array, kv: Array) -> None: ...

    def zero_(self, buf: Array) -> None: ...


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
        """From rows [t, α_t, σ_t, α_prev, c_eps, c_rand] of diffusion.ddim_coefficients (eta = 0)."""
        if any(row[5] > 0 for row in coefficients):
            raise ValueError("the runtime loop is deterministic DDIM (eta = 0)")
        # x_prev = α_prev x̂_0 + c_eps ε̂ with x̂_0 = α_t x - σ_t v and ε̂ = σ_t x + α_t v
        p = tuple(r[3] * r[1] + r[4] * r[2] for r in coefficients)
        q = tuple(r[4] * r[1] - r[3] * r[2] for r in coefficients)
        return cls(tuple(float(r[0]) for r in coefficients), p, q, float(t_ctx), math.sqrt(abar_ctx),
                   math.sqrt(1 - abar_ctx))


@dataclass
class Buffers:
    """Every buffer one frame touches; allocated once by the pipeline."""

    x: Array  # (B, C, H, W) x_t, updated in place
    v: Array  # (B, C, H, W) denoiser output
    frame: Array  # (B, C, H, W) the finished frame
    noise: Array  # (B, C, H, W) context noise
    ctx: Array  # (B, C, H, W) noised frame fed to context_encode
    kv: Array  # (B, 2, N, D) one memory slot
    memory: Array  # (B, K, 2, N, D) the ring buffer
    ages: Array  # (B, K) int32, 0 = empty
    slot: Array  # (1,) int64, next slot to write
    t: list[Array]  # per DDIM step, (B,) float32 timesteps
    t_ctx: Array  # (B,) float32
    cond: Array | None  # (B, C, H, W) video-to-video input, or None

    def denoise_inputs(self, step: int) -> dict[str, Array]:
        values = {G.X_T: self.x, G.T: self.t[step], G.COND: self.cond, G.MEMORY: self.memory, G.AGES: self.ages}
        return {k: values[k] for k in G.denoise_inputs(self.cond is not None)}


def run_frame(backend: Backend, ops: Ops, buf: Buffers, sched: Schedule) -> None:
    ops.randn_(buf.x)  # 1
    for i in range(len(sched.timesteps)):  # 2
        backend.run(G.DENOISE, buf.denoise_inputs(i), buf.v)
        ops.lincomb_(buf.x, sched.p[i], buf.x, sched.q[i], buf.v)
    ops.clamp_(buf.frame, buf.x)  # 3
    ops.randn_(buf.noise)  # 4
    ops.lincomb_(buf.ctx, sched.ctx_alpha, buf.frame, sched.ctx_sigma, buf.noise)
    backend.run(G.CONTEXT, {G.FRAME: buf.ctx, G.T_CTX: buf.t_ctx}, buf.kv)  # 5
    ops.ring_write_(buf.memory, buf.ages, buf.slot, buf.kv)


def reset_memory(ops: Ops, buf: Buffers) -> None:
    ops.zero_(buf.memory)
    ops.zero_(buf.ages)
    ops.zero_(buf.slot)


class NumpyOps:
    def __init__(self, seed: int = 0):
        import numpy as np

        self.np, self.rng = np, np.random.default_rng(seed)

    def seed(self, seed: int) -> None:
        self.rng = self.np.random.default_rng(seed)

    def randn_(self, buf):
        if buf.dtype == self.np.float32:
            self.rng.standard_normal(out=buf, dtype=self.np.float32)
        else:
            buf[...] = self.rng.standard_normal(buf.shape, dtype=self.np.float32)

    def lincomb_(self, dst, a, x, b, y):
        self.np.add(a * x, b * y, out=dst, casting="unsafe")

    def clamp_(self, dst, src):
        self.np.clip(src, -1.0, 1.0, out=dst, casting="unsafe")

    def ring_write_(self, memory, ages, slot, kv):
        s = int(slot[0])
        memory[:, s] = kv
        ages += ages > 0
        ages[:, s] = 1
        slot[0] = (s + 1) % memory.shape[1]

    def zero_(self, buf):
        buf[...] = 0
