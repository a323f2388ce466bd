"""`mirage-serve` itself (its options, banner, logging and server) over a stand-in pool, for the attack
suite (tests/test_serve_attack.py) and the page's block-model test (tests/test_browser.py):

    python tests/serve_standin.py STEP_MS [--block N [--strength S]] [mirage-serve options]

The stand-in's step sleeps STEP_MS and hands each slot its input back: like a GPU pool's step it takes
neither a core nor the GIL, so what the suite measures on a shared 2-core machine is the server and the
attack, not the CPU model's share of the cores (tests/test_serve.py runs the server on the real pool).
With --block N it is a BlockPool: a DiT-like pool of blocks of N frames at 16 FPS that takes a prompt
and a strength (tests/test_serve_blocks.py), every stream starting at strength S (default 0), as mirage-serve
--strength starts a DiT's.
"""
from __future__ import annotations

import collections
import sys
import time

import numpy as np

from mirage.core.errors import MirageError
from mirage.core.video_io import to_float
from mirage.runtime import pool as pool_module


class SleepPool:
    depth, frame_shape, video_to_video = 1, (32, 32, 3), True
    # the U-Net's block contract: a frame a step, no control, inputs degraded by the server
    frames_in, controls, video_rate, restores = 1, {}, None, True
    devices = ["stand-in"]

    def __init__(self, slots: int, step_s: float):
        self.slots, self.step_s = slots, step_s
        self.active: list[int] = []
        self.outputs: collections.deque[dict] = collections.deque()

    def attach(self, seed: int = 0) -> int:
        free = [s for s in range(self.slots) if s not in self.active]
        if not free:
            raise pool_module.PoolFull(f"all {self.slots} stream slots are busy")
        self.active.append(free[0])
        return free[0]

    def detach(self, slot: int) -> None:
        self.active.remove(slot)

    def submit(self, inputs: dict) -> None:
        time.sleep(self.step_s)
        self.outputs.append({slot: frame[None] for slot, frame in inputs.items()})  # (1, H, W, 3): one frame a step

    def collect(self) -> dict:
        return self.outputs.popleft()

    def close(self) -> None:
        self.active = []


class StandinError(MirageError):
    """What the stand-in's pool refuses, as a real pool's MirageError."""


class BlockPool(SleepPool):
    """The block contract (docs/SERVING.md) without a model: a step sleeps step_s and makes `block` frames per
    row (video-to-video: its input block times 1 - its strength; generation, every attached row as
    StreamPool does: the row's frames numbered from its attach, frame c filled with (c % COUNTER) / COUNTER),
    and pool.control is logged in `calls`, in order with the submits. A prompt of more than MAX_TOKENS words
    is refused, as a text encoder's limit would be."""

    MAX_TOKENS = 8
    COUNTER = 64
    controls = {"prompt": True, "strength": (0.0, 1.0)}
    restores = False  # a DiT's inputs: the frames as sent

    def __init__(self, slots: int, step_s: float, block: int = 4, video_rate: float = 16.0,
                 video_to_video: bool = True, strength: float = 0.0):
        super().__init__(slots, step_s)
        self.block, self.video_rate, self.video_to_video = block, video_rate, video_to_video
        self.frames_in = block if video_to_video else 0
        self.start_strength = strength  # a new stream's (StreamPool: PipelineOptions.strength)
        self.strength = np.full(slots, strength, np.float32)
        self.made = np.zeros(slots, np.int64)  # frames each row has generated since its attach
        self.calls: list[tuple] = []

    def attach(self, seed: int = 0) -> int:
        slot = super().attach(seed)
        self.made[slot] = 0
        self.strength[slot] = self.start_strength
        return slot

    def conditioning(self, slot: int) -> dict:
        return {"strength": float(self.strength[slot])}

    def control(self, slot: int, prompt: str | None = None, strength: float | None = None) -> None:
        if prompt is not None and len(prompt.split()) > self.MAX_TOKENS:
            raise StandinError(f"a prompt of {len(prompt.split())} tokens; the text encoder takes {self.MAX_TOKENS}")
        if strength is not None:
            self.strength[slot] = strength
        self.calls.append(("control", slot, prompt, strength))

    def submit(self, inputs: dict) -> None:
        for frames in inputs.values():
            if np.shape(frames) != (self.block, *self.frame_shape):
                raise StandinError(f"input block of shape {np.shape(frames)}; the model takes "
                                   f"{(self.block, *self.frame_shape)}")
        time.sleep(self.step_s)
        self.calls.append(("submit", sorted(inputs)))
        if self.video_to_video:
            # the server hands a pool uint8 frames: scaled as the model's [-1, 1] floats (strength 1: gray)
            self.outputs.append({s: to_float(x) * (1 - self.strength[s]) for s, x in inputs.items()})
        else:
            self.outputs.append({s: self.generated(s) for s in self.active})

    def generated(self, slot: int) -> np.ndarray:
        counts = (self.made[slot] + np.arange(self.block)) % self.COUNTER
        self.made[slot] += self.block
        levels = counts.astype(np.float32)[:, None, None, None] / self.COUNTER
        return np.broadcast_to(levels, (self.block, *self.frame_shape))


if __name__ == "__main__":
    step_s = float(sys.argv.pop(1)) / 1e3
    standin = {"--block": 0, "--strength": 0.0, "--size": 32}  # the stand-in's own options, before mirage-serve's
    while sys.argv[1:2] and sys.argv[1] in standin:
        standin[sys.argv[1]] = type(standin[sys.argv[1]])(sys.argv[2])
        del sys.argv[1:3]
    block, strength, size = standin["--block"], standin["--strength"], standin["--size"]
    SleepPool.frame_shape = (size, size, 3)  # square frames of --size pixels (the page at a model's size)
    pool_module.StreamPool.open = classmethod(lambda cls, path, slots, **kw: BlockPool(slots, step_s, block,
                                                                                       strength=strength)
                                              if block else SleepPool(slots, step_s))
    from mirage.cli.serve import main

    main()
