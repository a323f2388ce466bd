"""The frame loop's element-wise work (mirage.core.loop.Ops) as torch ops."""
from __future__ import annotations

import torch


class TorchOps:
    """Element-wise work as torch ops on the buffers' device; every op is CUDA-graph safe
    (the slot index is a device tensor, so no host sync and no Python-side branch)."""

    def __init__(self, device, seed: int = 0):
        self.torch, self.device = torch, torch.device(device)
        # On CUDA the default generator is the graph-safe one (a captured graph draws fresh
        # noise at every replay); a private generator would need registering with each graph.
        self.gen = None if self.device.type == "cuda" else torch.Generator()
        self.seed(seed)

    def seed(self, seed: int) -> None:
        if self.gen is None:
            self.torch.cuda.manual_seed(seed)
        else:
            self.gen.manual_seed(seed)

    def randn_(self, buf):
        buf.normal_(generator=self.gen)

    def lincomb_(self, dst, a, x, b, y):
        self.torch.add(x * a, y, alpha=b, out=dst) if dst.dtype == x.dtype else dst.copy_(x * a + y * b)

    def clamp_(self, dst, src):
        self.torch.clamp(src, -1.0, 1.0, out=dst)

    def ring_write_(self, memory, ages, slot, kv):
        memory.index_copy_(1, slot, kv.unsqueeze(1))
        ages.add_((ages > 0).to(ages.dtype))
        ages.index_fill_(1, slot, 1)
        slot.add_(1).remainder_(memory.shape[1])

    def zero_(self, buf):
        buf.zero_()
