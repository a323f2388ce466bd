"""The context memory: a fixed-size ring buffer of the last K frames' keys/values.

State is two tensors that never change shape or move, so one captured CUDA graph can
serve every frame:

    memory  (B, K, 2, N, D)  kv of K frames (see model.context_encode)
    ages    (B, K) int64     frames since each slot was written: 1 = newest, 0 = empty

Slot order is irrelevant to the model (ages carry the order), so writing frame n into
slot n mod K is all the bookkeeping there is.
"""
from __future__ import annotations

import torch

from mirage.core.config import ModelConfig


def empty_memory(cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    memory = torch.zeros(batch, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim, device=device, dtype=dtype)
    ages = torch.zeros(batch, cfg.context_frames, dtype=torch.long, device=device)
    return memory, ages


def ring_write(memory: torch.Tensor, ages: torch.Tensor, kv: torch.Tensor, frame_index: int) -> None:
    """Write one frame's kv (B, 2, N, D) into slot frame_index mod K, in place, and age the rest."""
    if kv.shape != memory[:, 0].shape:
        raise ValueError(f"kv shape {tuple(kv.shape)} does not fit memory slots {tuple(memory[:, 0].shape)}")
    slot = frame_index % memory.shape[1]
    memory[:, slot] = kv.to(memory.dtype)
    ages.add_((ages > 0).long())  # occupied slots get one frame older; empty ones stay 0
    ages[:, slot] = 1
