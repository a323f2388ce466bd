"""Stream slots: B independent streams advanced by one batched frame (one CUDA-graph replay on a GPU).

    pool = StreamPool.open("artifacts/tiny-v2v", slots=8)  # a checkpoint: load=mirage.bridge.pipeline.load_pipeline
    a = pool.attach(seed=1)                     # a free slot: fresh memory, its own noise seed
    outs = pool.step({a: frame})                 # every attached slot advances one step: {a: (n, H, W, 3)}
    pool.detach(a)

A step is the model's unit of work: one frame per slot for the U-Net (n = 1), a block of frames for the
video DiT (n = its block's latent frames), so every result is (n, H, W, 3) whatever the family.
`frames_in` is how many input frames one step takes per slot (0: generation), `control(slot, prompt=...,
strength=...)` changes one stream's conditioning between steps (what `controls` lists), `video_rate`
is the frame rate the output plays at (a server paces a block's frames out by it), `restores` says
whether its inputs are degraded frames to restore (the U-Net's video-to-video: a server degrades what
clients send, as mirage-run does) or frames taken as they are (the DiT's), and `devices` names where
the pool runs.

Each slot is one row of a Pipeline of batch B: its own ring buffer, ages, slot index and noise
counter, so a stream's frames depend only on its own seed and inputs. Attaching resets that row
for the next step submitted (steps in flight finish with the old one; on a GPU the reset is
queued behind them, the step thread does not wait); the captured graph is never recaptured.
Opening a pool resets every row the same way: on a GPU it returns before the reset has run, and
every host read here (collect, close) waits for the GPU first. A step advances the slots it has
inputs for (video-to-video; every attached slot for generation): the others are held (computed,
nothing committed), so a stream's video does not depend on when its neighbours send. A free row
still computes (a captured graph has a fixed batch): its output is dropped, and it costs what a
busy row costs.
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from mirage.core.config import PipelineOptions
from mirage.core.errors import MirageError
from mirage.core.graphs import MANIFEST
from mirage.core.video_io import as_uint8, to_float
from mirage.engine.manifest import read_manifest
from mirage.runtime.pipeline import Pipeline, PipelineError


class PoolFull(MirageError):
    """Every slot of the pool is taken."""


DEFAULT_SLOTS = 4


def default_slots(path: str | Path) -> int:
    """A server's slots when none are asked for: a static-batch artifact's batch (its engines and graphs run that
    batch only, so any other is refused), else DEFAULT_SLOTS, at most a dynamic artifact's max_batch (a
    checkpoint runs any batch)."""
    if not (Path(path) / MANIFEST).is_file():
        return DEFAULT_SLOTS
    manifest = read_manifest(path)
    return min(DEFAULT_SLOTS, manifest["max_batch"]) if manifest["max_batch"] else manifest["batch"]


class StreamPool:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.slots = pipeline.batch
        self.frame_shape = pipeline.frame_shape
        self.video_to_video = pipeline.video_to_video
        self.frames_in, self.video_rate = pipeline.frames_in, pipeline.video_rate
        self.restores = pipeline.cfg.restores  # its input frames are degraded ones to restore (the U-Net's v2v)
        # where it runs, as resolved (auto -> cpu; a GPU: cuda or cuda:N, and its name), for a server's banner
        device, name = str(pipeline.backend.device), pipeline.describe()[0]
        self.devices = [device if name == device else f"{device} ({name})"]
        self.active: list[int] = []
        # each slot's latest input, kept as the pipeline's frames cross (PipelineOptions.frames): bytes stay bytes
        self.input_shape = pipeline.input_shape  # a slot's input per step: a frame, or a block's frames
        self._inputs = np.zeros((self.slots, *self.input_shape), np.uint8 if pipeline.options.frames == "uint8"
                                else np.float32)
        self._moving: collections.deque[list[int]] = collections.deque()  # per frame in flight: the slots it advances
        self.depth = pipeline.depth  # steps in flight at once: submit() the next before collect()ing this one
        pipeline.reset(0)

    @classmethod
    def open(cls, path: str | Path, slots: int, backend: str = "auto", device: str = "auto",
             options: PipelineOptions = PipelineOptions(),
             load: Callable[..., Pipeline] = Pipeline.load) -> "StreamPool":
        """A pool of `slots` rows, every row reset (Pipeline.reset: on a GPU enqueued, not yet run,
        when this returns). `load(path, backend, device, options)` opens the model: Pipeline.load for
        artifacts, mirage.bridge.pipeline.load_pipeline for checkpoints too."""
        return cls(load(path, backend, device, dataclasses.replace(options, batch=slots)))

    def attach(self, seed: int = 0) -> int:
        free = [s for s in range(self.slots) if s not in self.active]
        if not free:
            raise PoolFull(f"all {self.slots} stream slots are busy")
        slot = free[0]
        self.pipeline.reset_row(slot, seed)
        self._inputs[slot] = 0
        self.active.append(slot)
        return slot

    def detach(self, slot: int) -> None:
        self._attached(slot)
        self.active.remove(slot)

    @property
    def controls(self) -> dict:
        """What `control` accepts ({} for the U-Net; {"prompt": True} for a DiT with a prompt encoder)."""
        return self.pipeline.controls

    def control(self, slot: int, prompt: str | None = None, strength: float | None = None) -> None:
        """Change one stream's prompt or strength from its next step on, without restarting it; a value the
        model does not take is refused (a MirageError) and the other streams are untouched."""
        self._attached(slot)
        self.pipeline.control(slot, prompt=prompt, strength=strength)

    def conditioning(self, slot: int) -> dict:
        """One stream's current values of what `control` sets ({"strength": s} for a video-to-video DiT: a new
        stream's is the pool's PipelineOptions.strength), for a client to show before it changes them."""
        self._attached(slot)
        return self.pipeline.conditioning(slot)

    def step(self, inputs: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Advance the slots given inputs (video-to-video) or every attached slot (generation) one
        step; returns {slot: (n, H, W, 3) frames} for the slots that advanced (float32 in [-1, 1], or uint8
        with PipelineOptions(frames="uint8"))."""
        self.submit(inputs)
        return self.collect()

    def submit(self, inputs: dict[int, np.ndarray] | None = None) -> None:
        """Start step() without waiting for it (GPU: asynchronously); up to `depth` steps in flight.
        Call submit, collect, attach and detach from one thread (on a GPU, a collect from another thread
        than the submit's gave wrong frames: runtime/server.py)."""
        for slot, frame in (inputs or {}).items():
            self._attached(slot)
            if np.ndim(frame) == 4 and len(frame) == 1 and self.frames_in <= 1:  # (1, H, W, 3): frames_in of one
                frame = frame[0]
            if tuple(np.shape(frame)) != self.input_shape:
                raise PipelineError(f"input frames have shape {tuple(np.shape(frame))}, the model takes "
                                    f"{self.input_shape}")
            self._inputs[slot] = (as_uint8(frame) if self._inputs.dtype == np.uint8
                                  else to_float(frame) if frame.dtype == np.uint8 else frame)
        moving = list(inputs or {}) if self.video_to_video else list(self.active)
        advance = np.zeros(self.slots, np.int64)
        advance[moving] = 1
        self.pipeline.submit_batch(self._inputs if self.video_to_video else None, advance)
        self._moving.append(moving)

    def collect(self) -> dict[int, np.ndarray]:
        """The oldest submitted step's outputs, as step() returns them."""
        moving = self._moving.popleft()  # first: a step that fails is still taken off the queue
        out = self.pipeline.collect_batch()  # (B, H, W, 3), or (B, n, H, W, 3)
        out = out.reshape(self.slots, -1, *self.frame_shape)
        return {slot: out[slot] for slot in moving}

    def _attached(self, slot: int) -> None:
        if slot not in self.active:
            raise PipelineError(f"slot {slot} is not attached")

    def close(self) -> None:
        self.pipeline.close()
        self.active = []

    def __enter__(self) -> "StreamPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PoolGroup:
    """One StreamPool per device (one per GPU of a host) behind the StreamPool interface: a new
    stream goes to the least-loaded pool, and a step advances every pool that has streams at once,
    each in its own thread (the pools' frame graphs run concurrently on their GPUs). A stream's
    slot number is its pool's offset plus its slot in that pool."""

    def __init__(self, pools: list[StreamPool]):
        if not pools or len({(p.frame_shape, p.video_to_video) for p in pools}) != 1:
            raise PipelineError("a pool group needs one or more pools of the same model")
        from concurrent.futures import ThreadPoolExecutor

        self.pools = pools
        self.offsets = [sum(p.slots for p in pools[:i]) for i in range(len(pools))]
        self.slots = sum(p.slots for p in pools)
        self.frame_shape, self.video_to_video = pools[0].frame_shape, pools[0].video_to_video
        self.depth = min(p.depth for p in pools)
        self._busy: collections.deque[list[int]] = collections.deque()  # per step in flight: the pools it runs on
        # per pool: outputs of its steps in flight collected ahead of time, oldest first (a failed group
        # submit drains the pools whose part went through: see submit)
        self._ready: list[collections.deque[dict]] = [collections.deque() for _ in pools]
        # one thread per pool, so that everything done to pool i (attach, detach, submit, collect) happens in
        # thread i: a collect from another thread than the submit's gave wrong frames on an H100 (runtime/server.py)
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"mirage-pool{i}") for i in range(len(pools))]

    @classmethod
    def open(cls, path: str | Path, slots: int, devices: list[str], backend: str = "auto",
             options: PipelineOptions = PipelineOptions(),
             load: Callable[..., Pipeline] = Pipeline.load) -> "PoolGroup":
        """`slots` per device (`load` as in StreamPool.open)."""
        return cls([StreamPool.open(path, slots, backend, device, options, load) for device in devices])

    @property
    def frames_in(self) -> int:
        return self.pools[0].frames_in

    @property
    def restores(self) -> bool:
        return self.pools[0].restores

    @property
    def devices(self) -> list[str]:
        return [d for pool in self.pools for d in pool.devices]

    @property
    def video_rate(self) -> float:
        return self.pools[0].video_rate

    @property
    def controls(self) -> dict:
        return self.pools[0].controls

    @property
    def active(self) -> list[int]:
        return [off + s for off, pool in zip(self.offsets, self.pools) for s in pool.active]

    def _locate(self, slot: int) -> tuple[StreamPool, int]:
        for off, pool in zip(self.offsets, self.pools):
            if off <= slot < off + pool.slots:
                return pool, slot - off
        raise PipelineError(f"slot {slot} is not in this group of {self.slots}")

    def attach(self, seed: int = 0) -> int:
        free = [(len(p.active), i) for i, p in enumerate(self.pools) if len(p.active) < p.slots]
        if not free:
            raise PoolFull(f"all {self.slots} stream slots on {len(self.pools)} devices are busy")
        i = min(free)[1]  # least loaded, the first such device on a tie
        return self.offsets[i] + self._threads[i].submit(self.pools[i].attach, seed).result()

    def detach(self, slot: int) -> None:
        pool, local = self._locate(slot)
        i = self.pools.index(pool)
        self._threads[i].submit(pool.detach, local).result()

    def control(self, slot: int, prompt: str | None = None, strength: float | None = None) -> None:
        pool, local = self._locate(slot)
        i = self.pools.index(pool)
        self._threads[i].submit(pool.control, local, prompt, strength).result()

    def conditioning(self, slot: int) -> dict:
        pool, local = self._locate(slot)
        return self._threads[self.pools.index(pool)].submit(pool.conditioning, local).result()

    def step(self, inputs: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        self.submit(inputs)
        return self.collect()

    def submit(self, inputs: dict[int, np.ndarray] | None = None) -> None:
        per_pool: dict[int, dict[int, np.ndarray]] = {i: {} for i in range(len(self.pools))}
        for slot, frame in (inputs or {}).items():
            pool, local = self._locate(slot)
            per_pool[self.pools.index(pool)][local] = frame
        busy = [i for i, p in enumerate(self.pools) if (per_pool[i] if self.video_to_video else p.active)]
        # a step with no work anywhere is an idle step of every pool (computed, nothing committed): the one
        # the server's calibration times, which would otherwise time nothing
        busy = busy or list(range(len(self.pools)))
        futures = {i: self._threads[i].submit(self.pools[i].submit, per_pool[i]) for i in busy}  # all at once
        failed = [i for i, f in futures.items() if f.exception() is not None]  # (a CPU pool computes in submit)
        if failed:  # the pools whose submit went through hold a step: drop it, so that all stay in step
            for i in busy:
                if i not in failed:
                    self._threads[i].submit(self._drop_newest, i).result()
            futures[failed[0]].result()  # raises the first failure
        self._busy.append(busy)

    def _drop_newest(self, i: int) -> None:
        """In pool i's thread: collect all of its steps in flight, keep the outputs of the older ones
        (the group's steps still to be collected) for collect(), drop the newest (a failed group step)."""
        older = sum(i in pools for pools in self._busy) - len(self._ready[i])
        for _ in range(older):
            self._ready[i].append(self.pools[i].collect())
        self.pools[i].collect()

    def _collect(self, i: int) -> dict[int, np.ndarray]:
        return self._ready[i].popleft() if self._ready[i] else self.pools[i].collect()

    def collect(self) -> dict[int, np.ndarray]:
        futures = {i: self._threads[i].submit(self._collect, i) for i in self._busy.popleft()}
        return {self.offsets[i] + s: frame for i, f in futures.items() for s, frame in f.result().items()}

    def close(self) -> None:
        for thread in self._threads:
            thread.shutdown()
        for pool in self.pools:
            pool.close()

    def __enter__(self) -> "PoolGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
