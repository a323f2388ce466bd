"""The frame loop's element-wise work (mirage.core.loop.Ops) as torch ops.

Every op is CUDA-graph safe: slot indices and noise counters are device tensors, so a replayed
graph needs no host sync and no Python-side branch. The noise is the counter-based generator of
mirage.core.loop.normal, written in int64 arithmetic (torch has no uint64 shifts): products wrap
modulo 2^64 as the unsigned ones do, and right shifts are made logical with a mask.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mirage.core.loop import GOLDEN_GAMMA, MIX1, MIX2, int64_bits
from mirage.core.video_io import to_float


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = z + int64_bits(GOLDEN_GAMMA)
    z = (z ^ _shr(z, 30)) * int64_bits(MIX1)
    z = (z ^ _shr(z, 27)) * int64_bits(MIX2)
    return z ^ _shr(z, 31)


def normal_rows(rng: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 draws of each row's (seed, counter) in rng (B, 2) int64."""
    j = torch.arange(n, device=rng.device, dtype=torch.int64)
    r = _mix(rng[:, :1] ^ _mix(rng[:, 1:] * (1 << 32) + j))  # (B, n)
    u1 = (_shr(r, 40).float() + 1.0) * (1.0 / 16777217.0)
    u2 = ((r & 0xFFFFFF).float() + 0.5) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


def _row_index(rows: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """rows (B, n) as a gather/scatter index of `like`'s shape along `axis`."""
    shape = [1] * like.dim()
    shape[0], shape[axis] = rows.shape
    return rows.long().view(shape).expand_as(like)


class TorchOps:
    def __init__(self, device):
        self.device = torch.device(device)
        self._rows: dict[int, torch.Tensor] = {}  # batch -> arange(batch), made before any capture
        # ~25 integer ops: one fused kernel on a GPU (compiled on the first, eager, frame), so the
        # noise costs a frame outside a CUDA graph what torch.randn would
        self._normal = torch.compile(normal_rows, dynamic=False) if self.device.type == "cuda" else normal_rows
        # video_io.to_float of every byte: a lookup gives its values exactly (a division on the GPU need not)
        self._to_float = torch.from_numpy(to_float(np.arange(256, dtype=np.uint8))).to(self.device)

    def _arange(self, b: int) -> torch.Tensor:
        if b not in self._rows:
            self._rows[b] = torch.arange(b, device=self.device)
        return self._rows[b]

    def randn_(self, buf, rng, advance):
        buf.copy_(self._normal(rng, buf[0].numel()).view(buf.shape))
        rng[:, 1] += advance

    def lincomb_(self, dst, a, x, b, y):
        torch.add(x * a, y, alpha=b, out=dst) if dst.dtype == x.dtype else dst.copy_(x * a + y * b)

    def lincomb_rows_(self, dst, a, x, b, y):
        rows = (-1,) + (1,) * (x.dim() - 1)
        dst.copy_(a.view(rows) * x + b.view(rows) * y)

    def clamp_(self, dst, src):
        torch.clamp(src, -1.0, 1.0, out=dst)

    def ring_write_(self, memory, ages, slot, kv, advance):
        # held rows (advance 0) write back what they hold: no branch, so the op is graph safe
        rows, go = self._arange(memory.shape[0]), advance.bool()
        kept = memory[rows, slot]  # (B, 2, N, D)
        keep_shape = (-1,) + (1,) * (kv.dim() - 1)  # go per row, broadcast over (2, N, D)
        memory.index_put_((rows, slot), torch.where(go.view(keep_shape), kv.to(memory.dtype), kept))
        ages.add_(((ages > 0) & go[:, None]).to(ages.dtype))
        ages.scatter_(1, slot[:, None], torch.where(go[:, None], 1, ages.gather(1, slot[:, None])))
        slot.add_(advance).remainder_(memory.shape[1])

    def reset_row_(self, buf, row, seed):
        # fill_ of a Python number passes it to the kernel as an argument: on a GPU every write here is
        # enqueued on the current stream and nothing waits. (`t[i] = number` copies a CPU scalar tensor
        # into a CUDA one instead, which synchronizes the stream: pytorch/pytorch#186482.)
        buf.memory[row].zero_()
        buf.ages[row].zero_()
        buf.slot[row].fill_(0)
        self.seed_row_(buf.rng, row, seed)

    def seed_row_(self, rng, row, seed):
        rng[row, 0].fill_(int64_bits(seed))
        rng[row, 1].fill_(0)

    def scatter_rows_(self, dst, src, rows, advance, axis):
        # held rows (advance 0) write back what they hold: no branch, so the op is graph safe
        index = _row_index(rows, src, axis)
        go = advance.bool().view(-1, *(1,) * (src.dim() - 1))
        dst.scatter_(axis, index, torch.where(go, src.to(dst.dtype), dst.gather(axis, index)))

    def gather_rows_(self, dst, src, rows, axis):
        dst.copy_(src.gather(axis, _row_index(rows, dst, axis)))

    def preview_(self, dst, src):
        b, _, n, h, w = src.shape
        rgb = src[:, :3].float().clamp(-1.0, 1.0).transpose(1, 2).reshape(b * n, 3, h, w)
        dst.copy_(rgb.repeat_interleave(dst.shape[2] // h, 2).repeat_interleave(dst.shape[3] // w, 3))

    def to_uint8_(self, dst, finite, src):
        # mirage.core.video_io.to_uint8 on float32, one op per rounding as numpy does it (no fused multiply-add)
        x = src.float()
        finite.copy_(torch.isfinite(x).flatten(1).all(dim=1))
        y = ((x + 1.0) * 127.5 + 0.5).clamp_(0, 255)
        dst.copy_(y.permute(0, 2, 3, 1))  # (B, H, W, 3); float -> uint8 truncates, as numpy's astype

    def to_float_(self, dst, src):
        dst.copy_(self._to_float[src.long()].permute(0, 3, 1, 2))  # (B, H, W, 3) bytes -> (B, 3, H, W)

    def fill_(self, dst, value):
        dst.fill_(value)
