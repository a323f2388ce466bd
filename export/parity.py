"""Parity of exported graphs against PyTorch: per tensor, and per frame over a rollout.

Tensors: each graph is run by ONNX Runtime on inputs recorded from a real fp32 rollout and
compared with PyTorch fp32 by ‖out − ref‖ / ‖ref‖ and max |out − ref|. Frames: a whole
rollout is driven by the runtime's frame loop on ONNX Runtime (numpy) and scored by PSNR
against the same loop on PyTorch, with the same noise, so fp16 and 8-bit are judged on what a
viewer sees, not only on tensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mirage.core import graphs as G
from mirage.core.loop import NumpyOps, Schedule, make_buffers, run_frame
from mirage.core.ort import OrtBackend
from mirage.core.report import psnr
from mirage.core.schedule import CONTEXT_NOISE
from mirage.model.unet import MirageUNet
from mirage.train.data import SyntheticVideo, v2v_input
from mirage.train.rollout import rollout


@torch.no_grad()
def tensor_parity(model: MirageUNet, files: dict[str, Path], calls: dict[str, list[dict[str, torch.Tensor]]],
                  codec: torch.nn.Module | None = None) -> dict:
    """Worst relative and absolute error per graph output over the recorded inputs."""
    from .onnx_export import graph_module

    ort = OrtBackend(files)
    report = {}
    for graph, inputs in calls.items():
        module = graph_module(model.float(), graph, codec)
        rel, absolute = 0.0, 0.0
        for x in inputs:
            ref = module(*x.values()).float()
            feed = {k: v.numpy().astype(ort.buffer_dtype(graph, k)) for k, v in x.items()}
            out = torch.from_numpy(ort.sessions[graph].run(None, feed)[0].astype(np.float32))
            if not torch.isfinite(out).all():
                rel = absolute = float("inf")
                break
            rel = max(rel, float((out - ref).norm() / ref.norm().clamp(min=1e-12)))
            absolute = max(absolute, float((out - ref).abs().max()))
        report[G.model_graphs(model.cfg)[graph].output.name] = {"rel": rel, "max_abs": absolute, "calls": len(inputs)}
    ort.close()
    return report


def ort_rollout(files: dict[str, Path], cfg, frames: int, steps: int, seed: int, cond: list[np.ndarray] | None,
                context_noise: int = CONTEXT_NOISE) -> np.ndarray:
    """The runtime's loop on ONNX Runtime (numpy): (frames, C, H, W) float32."""
    ort, ops, sched = OrtBackend(files), NumpyOps(), Schedule.ddim(steps, context_noise)
    buf = make_buffers(G.model_graphs(cfg, 1), sched, lambda shape, dt: np.zeros(shape, dt),
                       ops.fill_, ort.buffer_dtype)
    ops.reset_row_(buf, 0, seed)
    out = []
    for n in range(frames):
        if cond is not None:
            buf.input[...] = cond[n]
        run_frame(ort, ops, buf, sched)
        out.append(buf.frame[0].astype(np.float32))
    ort.close()
    return np.stack(out)


@torch.no_grad()
def rollout_psnr(model: MirageUNet, files: dict[str, Path], frames: int = 50, steps: int = 4, seed: int = 0) -> dict:
    """PSNR (dB) of an ONNX Runtime rollout against the PyTorch rollout: the same loop, noise and inputs."""
    cfg = model.cfg
    clip = torch.from_numpy(SyntheticVideo(cfg.pixels, seed=777).clip(0, frames)).permute(0, 3, 1, 2)
    cond = [v2v_input(f)[None] for f in clip] if cfg.cond_channels else None
    ref = torch.cat(list(rollout(model.float().cpu(), frames, steps=steps, seed=seed, cond=cond))).numpy()
    out = ort_rollout(files, cfg, frames, steps, seed, [c.numpy() for c in cond] if cond else None)
    frame_psnr = psnr(out, ref)
    report = {"frames": frames, "steps": steps, "psnr_mean_db": float(frame_psnr.mean()),
              "psnr_min_db": float(frame_psnr.min()), "psnr_last10_db": float(frame_psnr[-10:].mean()),
              "finite": bool(np.isfinite(out).all())}
    if cfg.cond_channels:  # against the ground truth too: what the precision costs in task quality
        truth = clip.numpy()
        report.update(task_psnr_torch_db=float(psnr(ref, truth).mean()), task_psnr_db=float(psnr(out, truth).mean()))
    return report
