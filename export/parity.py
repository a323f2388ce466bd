"""Parity of exported graphs against PyTorch: per tensor, and per frame over a rollout.

Tensors: each graph is run by ONNX Runtime on inputs recorded from a real fp32 rollout and
compared with PyTorch fp32 by ‖out − ref‖ / ‖ref‖ and max |out − ref|. Frames: a whole
rollout is driven by ONNX Runtime (the same `rollout` loop, the graphs plugged in as the
denoiser) and scored by PSNR against the PyTorch rollout, so fp16 and INT8 are judged on
what a viewer sees, not only on tensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mirage.core import graphs as G
from mirage.runtime.backends import OrtBackend
from mirage.core.report import psnr
from mirage.train.data import SyntheticVideo, v2v_input
from mirage.model.unet import MirageUNet
from mirage.train.rollout import rollout

# Bounds on ‖out − ref‖ / ‖ref‖ per precision (METHOD.md: fp32 far under 1e-3, half precision
# around 1e-3..1e-2; 8-bit Q/DQ of a small model is looser, FP8 less so than INT8).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.15, "fp8": 0.1}


class OrtGraphs:
    """Both graphs of an export, run by ONNX Runtime, behind the model's denoise/context_encode."""

    def __init__(self, cfg, files: dict[str, str | Path], providers: list[str] | None = None):
        self.cfg, self.backend = cfg, OrtBackend(files, providers)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {k: v.detach().cpu().numpy().astype(self.backend.dtypes[graph][k]) for k, v in inputs.items()}
        return torch.from_numpy(self.backend.sessions[graph].run(None, feed)[0].astype(np.float32))

    def denoise(self, x_t, t, cond, memory, ages):
        values = {G.X_T: x_t, G.T: t.float(), G.COND: cond, G.MEMORY: memory, G.AGES: ages.int()}
        return self.run(G.DENOISE, {k: values[k] for k in G.denoise_inputs(bool(self.cfg.cond_channels))})

    def context_encode(self, frame, t_ctx):
        return self.run(G.CONTEXT, {G.FRAME: frame, G.T_CTX: t_ctx.float()})


@torch.no_grad()
def tensor_parity(model: MirageUNet, graphs: OrtGraphs, calls: dict[str, list[dict[str, torch.Tensor]]]) -> dict:
    """Worst relative and absolute error per graph output over the recorded inputs."""
    from mirage.export.onnx_export import graph_module

    report = {}
    for graph, inputs in calls.items():
        module = graph_module(model.float(), graph)
        rel, absolute = 0.0, 0.0
        for x in inputs:
            ref = module(*x.values()).float()
            out = graphs.run(graph, x)
            if not torch.isfinite(out).all():
                rel = absolute = float("inf")
                break
            rel = max(rel, float((out - ref).norm() / ref.norm().clamp(min=1e-12)))
            absolute = max(absolute, float((out - ref).abs().max()))
        report[G.V if graph == G.DENOISE else G.KV] = {"rel": rel, "max_abs": absolute, "calls": len(inputs)}
    return report


@torch.no_grad()
def rollout_psnr(model: MirageUNet, graphs: OrtGraphs, frames: int = 50, steps: int = 4, seed: int = 0) -> dict:
    """PSNR (dB) of an ONNX Runtime rollout against the PyTorch rollout, same noise, same inputs."""
    cfg = model.cfg
    clip = torch.from_numpy(SyntheticVideo(cfg.image_size, seed=777).clip(0, frames)).permute(0, 3, 1, 2)
    cond = [v2v_input(f)[None] for f in clip] if cfg.cond_channels else None
    ref = torch.cat(list(rollout(model.float().cpu(), frames, steps=steps, seed=seed, cond=cond)))
    out = torch.cat(list(rollout(graphs, frames, steps=steps, seed=seed, cond=cond)))
    frame_psnr = psnr(out, ref)
    report = {"frames": frames, "steps": steps, "psnr_mean_db": float(frame_psnr.mean()),
              "psnr_min_db": float(frame_psnr.min()), "psnr_last10_db": float(frame_psnr[-10:].mean())}
    if cfg.cond_channels:  # against the ground truth too: what the precision costs in task quality
        report.update(task_psnr_torch_db=float(psnr(ref, clip).mean()), task_psnr_db=float(psnr(out, clip).mean()))
    return report
