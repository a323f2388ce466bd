"""`mirage-serve` itself (its options, banner, logging and server) over a stand-in pool, for the attack
suite (tests/test_serve_attack.py):

    python tests/serve_standin.py STEP_MS [mirage-serve options]

The stand-in's step sleeps STEP_MS and hands each slot its input back: like a GPU pool's step it takes
neither a core nor the GIL, so what the suite measures on a shared 2-core machine is the server and the
attack, not the CPU model's share of the cores (tests/test_serve.py runs the server on the real pool).
"""
from __future__ import annotations

import collections
import sys
import time

from mirage.runtime import pool as pool_module


class SleepPool:
    depth, frame_shape, video_to_video = 1, (32, 32, 3), True

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


if __name__ == "__main__":
    step_s = float(sys.argv.pop(1)) / 1e3
    pool_module.StreamPool.open = classmethod(lambda cls, path, slots, **kw: SleepPool(slots, step_s))
    from mirage.cli.serve import main

    main()
