"""Long-rollout quality of a video DiT trained here, video-to-video, on the U-Net's data and metrics.

    evaluate_dit("checkpoints/dit-tiny-taesd", frames=500, strength=0.5)

The DiT restyles its input (StreamDiffusionV2's use): each block of input frames is encoded, noised to
`strength` and denoised with the cache and its training prompt (DiTPipeline.restyle). Its input is the
ground-truth clip itself, or with `degraded` the U-Net's video-to-video input (luma + coarse chroma,
bridge/quality.v2v_inputs, as RGB); either way every window is scored against the ground truth by the same code
as `mirage-quality` (bridge/quality.score_windows), so PSNR drift reads the same for both families.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mirage.bridge.quality import QualityError, reference_clip, score_windows, v2v_inputs
from mirage.core.flow_schedule import block_schedule, strength_schedule
from mirage.core.metrics import SSIM_DEFINITION, psnr
from mirage.core.video_io import v2v_input_rgb
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec
from mirage.model.wan_checkpoint import saved_dit_config
from mirage.train.dit import PROMPT_FILE


def evaluate_dit(checkpoint: str | Path, frames: int = 500, window: int = 50, strength: float = 0.5, seed: int = 0,
                 data: str = "detailed", degraded: bool = False, device: str = "cpu", fp8: str | None = None) -> dict:
    """Roll the DiT at `checkpoint` over `frames` frames of `data` (truth seed 10000 + seed, as
    mirage-quality) and score every window; `ms_per_frame` is the rollout's wall time per frame. `fp8`: the
    block's matmuls in FP8 (static or dynamic activation scales, mirage.model.fp8; None: the model's dtype)."""
    checkpoint = Path(checkpoint)
    cfg = saved_dit_config(checkpoint)
    if cfg is None or not cfg.autoencoder:
        raise QualityError(f"{checkpoint}: not a DiT trained here on a per-frame autoencoder (no config.json 'dit')")
    n = cfg.video_frames(cfg.block_frames, first=False)
    frames -= frames % n  # whole blocks
    truth = reference_clip(cfg.width, frames, 10_000 + seed, data)
    inputs = np.stack([v2v_input_rgb(x) for x in v2v_inputs(truth)]) if degraded else truth
    with DiTPipeline.open(DiTSpec(cfg.name, checkpoint=checkpoint), checkpoint / PROMPT_FILE, device, fp8=fp8) as pipe:
        pipe.reset(seed)
        pipe.set_strength(strength)
        start = time.perf_counter()
        out = np.concatenate([pipe.restyle(inputs[i:i + n]) for i in range(0, frames, n)])
        seconds = time.perf_counter() - start
    windows, reference = score_windows(out[None], truth, window, data)
    return {"model": str(checkpoint), "config": cfg.name, "family": cfg.family, "params": cfg.param_count(),
            "task": "v2v-degraded" if degraded else "restyle", "strength": strength,
            "steps": len(strength_schedule(block_schedule(cfg.denoising_steps, cfg.timestep_shift,
                                                          cfg.warp_denoising_step), strength)),
            "frames": frames, "window": window, "seed": seed, "source": data, "device": device, "fp8": fp8,
            "ms_per_frame": seconds * 1e3 / frames, "data": reference["summary"], "windows": windows,
            "drift_db": windows[-1]["psnr"] - windows[0]["psnr"], "ssim_definition": SSIM_DEFINITION,
            "input_psnr_db": float(psnr(inputs, truth).mean()) if degraded else None}
