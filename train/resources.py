"""Will a training run fit? Memory needed, estimated before anything is allocated, against
memory available.

Needed: weights, EMA weights, gradients and AdamW's two moments (5 fp32 copies of the
parameters), plus the activations autograd keeps for backward. Those are counted by running
one training step's forward on the meta device (shapes only, no memory, a fraction of a
second even at 880M parameters) and summing every tensor saved for backward, so gradient
checkpointing, attention and the context encoder are all accounted for as they really run.
The count is of fp32 tensors; autocast (bf16/fp16) stores most of them at half the size,
which the estimate assumes. Allocator overhead, temporaries of the backward pass, the data
pipeline and CUDA's own context are not counted, so it errs low: the check refuses runs that
cannot fit, not every run that will not.
"""
from __future__ import annotations

import os

import torch

from mirage.core.config import ConfigError, ModelConfig, TrainConfig
from mirage.core.device import host_available_bytes
from mirage.model.unet import MirageUNet, parameter_count
from mirage.train.step import TrainStep

PARAMETER_COPIES = 5  # weights, EMA, gradients, AdamW exp_avg and exp_avg_sq (all fp32)


def activation_bytes(cfg: ModelConfig, tcfg: TrainConfig) -> int:
    """Bytes autograd saves for backward in one training step (see the module docstring)."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t  # keyed by object: one tensor saved by several ops counts once
        return t

    with torch.device("meta"):
        model = MirageUNet(cfg)
        model.grad_checkpoint = tcfg.grad_checkpoint
        clips = torch.zeros(tcfg.batch_size, cfg.context_frames + 1, cfg.channels, cfg.image_size, cfg.image_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            TrainStep(model, tcfg)(clips)
    total = sum(t.numel() * t.element_size() for t in saved.values())
    return total // 2 if tcfg.precision in ("bf16", "fp16") else total


def needed_bytes(cfg: ModelConfig, tcfg: TrainConfig) -> tuple[int, int]:
    """(parameter + optimizer bytes, activation bytes) of one process."""
    with torch.device("meta"):
        params = parameter_count(MirageUNet(cfg))
    return PARAMETER_COPIES * 4 * params, activation_bytes(cfg, tcfg)


def available_bytes(device: torch.device) -> int:
    """Free memory of `device`: the GPU's free memory, or for the CPU what the kernel (and the
    container's limit) would still hand this process, shared by the local DDP processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_fits(cfg: ModelConfig, tcfg: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line, a run whose estimated memory exceeds what `device` has free."""
    weights, activations = needed_bytes(cfg, tcfg)
    free = available_bytes(device)
    if weights + activations > free:
        gib = 2 ** 30
        raise ConfigError(f"model {cfg.name} at batch {tcfg.batch_size} needs about {(weights + activations) / gib:.1f} GiB "
                          f"({weights / gib:.1f} GiB weights + optimizer, {activations / gib:.1f} GiB activations), "
                          f"but {device.type} has {free / gib:.1f} GiB free; lower --batch-size, add "
                          "--grad-checkpoint or --precision bf16, or pick a smaller --config")


def check_weights_fit(cfg: ModelConfig) -> None:
    """Refuse, in one line, a model whose fp32 weights alone exceed the host memory left (before
    they are allocated, so the OS does not kill the process without a word)."""
    with torch.device("meta"):
        weights = 4 * parameter_count(MirageUNet(cfg))
    free = available_bytes(torch.device("cpu"))
    if weights > free:
        gib = 2 ** 30
        raise ConfigError(f"model {cfg.name} has {weights / gib:.1f} GiB of fp32 weights, but this machine has "
                          f"{free / gib:.1f} GiB of memory free")
