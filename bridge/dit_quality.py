"""Long-rollout quality of a video DiT trained here, video-to-video, on the U-Net's data and metrics.

    evaluate_dit("checkpoints/dit-tiny-taesd", frames=500, strength=0.5)

The DiT restyles its input (StreamDiffusionV2's use): each block of input frames is encoded, noised to
`strength` and denoised with the cache and its training prompt (DiTPipeline.restyle). Its input is the
ground-truth clip itself, or with `degraded` the U-Net's video-to-video input (luma + coarse chroma,
bridge/quality.v2v_inputs, as RGB); either way every window is scored against the ground truth by the same code
as `mirage-quality` (bridge/quality.score_windows), so PSNR drift reads the same for both families.

`compare_drift` rolls such a DiT beside a U-Net (bridge/quality.evaluate) over several truth clips, with the
DiT's autoencoder's own round trip of each clip as the bound (scripts/dit_drift.py, docs/QUALITY.md): one
clip's drift is mostly the clip (its content gets harder or easier to code), so it is read per clip against
that bound and over clips.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mirage.bridge.quality import QualityError, evaluate, open_rollout, reference_clip, score_windows, v2v_inputs
from mirage.core.config import DiTConfig
from mirage.core.flow_schedule import block_schedule, strength_schedule
from mirage.core.metrics import SSIM_DEFINITION, psnr
from mirage.core.video_io import v2v_input_rgb
from mirage.model.dit_pipeline import DiTPipeline, DiTSpec
from mirage.model.latent import load_frame_codec
from mirage.model.wan_checkpoint import saved_dit_config
from mirage.train.dit import PROMPT_FILE


def trained_config(checkpoint: Path) -> DiTConfig:
    """The config of a DiT trained here on a per-frame autoencoder, the only kind this module rolls out."""
    cfg = saved_dit_config(checkpoint)
    if cfg is None or not cfg.autoencoder:
        raise QualityError(f"{checkpoint}: not a DiT trained here on a per-frame autoencoder (no config.json 'dit')")
    return cfg


def whole_blocks(cfg: DiTConfig, frames: int) -> int:
    """`frames` rounded down to whole input blocks of the DiT (it restyles a block at a time)."""
    return frames - frames % cfg.video_frames(cfg.block_frames, first=False)


def evaluate_dit(checkpoint: str | Path, frames: int = 500, window: int = 50, strength: float = 0.5, seed: int = 0,
                 data: str = "detailed", degraded: bool = False, device: str = "cpu", fp8: str | None = None,
                 dtype: str | None = None, cache_from: str = "output") -> dict:
    """Roll the DiT at `checkpoint` over `frames` frames of `data` (truth seed 10000 + seed, as
    mirage-quality) and score every window; `ms_per_frame` is the rollout's wall time per frame. `fp8`: the
    block's matmuls in FP8 (static or dynamic activation scales, mirage.model.fp8; None: the model's dtype).
    `dtype`: "float32" or "bfloat16" (None: DiTPipeline's default for the device). `cache_from`: what each block
    leaves in the KV cache (core.config.CACHE_FROM)."""
    checkpoint = Path(checkpoint)
    cfg = trained_config(checkpoint)
    with open_dit(checkpoint, cfg, device, fp8, dtype) as pipe:
        return restyle_report(pipe, checkpoint, cfg, frames, window, strength, seed, data, degraded, device, fp8,
                              cache_from)


def open_dit(checkpoint: Path, cfg: DiTConfig, device: str, fp8: str | None = None,
             dtype: str | None = None) -> DiTPipeline:
    """The DiT at `checkpoint` as evaluate_dit rolls it out."""
    # restyle never replays a captured graph (DiTPipeline.restyle), so none is captured
    return DiTPipeline.open(DiTSpec(cfg.name, checkpoint=checkpoint), checkpoint / PROMPT_FILE, device, graph=False,
                            fp8=fp8, dtype=dtype)


def restyle_report(pipe: DiTPipeline, checkpoint: Path, cfg: DiTConfig, frames: int, window: int, strength: float,
                   seed: int, data: str, degraded: bool, device: str, fp8: str | None,
                   cache_from: str = "output") -> dict:
    """evaluate_dit's report with the DiT open in `pipe` (open_dit): reset to `seed`, a clip's report is the same
    whatever the pipe rolled out before, so a caller scoring several clips opens it once."""
    n = cfg.video_frames(cfg.block_frames, first=False)
    frames = whole_blocks(cfg, frames)
    truth = reference_clip(cfg.width, frames, 10_000 + seed, data)
    inputs = np.stack([v2v_input_rgb(x) for x in v2v_inputs(truth)]) if degraded else truth
    precision = str(next(pipe.model.parameters()).dtype).removeprefix("torch.")
    pipe.reset(seed)
    pipe.set_strength(strength)
    pipe.set_cache_from(cache_from)
    start = time.perf_counter()
    out = np.concatenate([pipe.restyle(inputs[i:i + n]) for i in range(0, frames, n)])
    seconds = time.perf_counter() - start
    windows, reference = score_windows(out[None], truth, window, data)
    return {"model": str(checkpoint), "config": cfg.name, "family": cfg.family, "params": cfg.param_count(),
            "task": "v2v-degraded" if degraded else "restyle", "strength": strength, "cache_from": cache_from,
            "steps": len(strength_schedule(block_schedule(cfg.denoising_steps, cfg.timestep_shift,
                                                          cfg.warp_denoising_step), strength)),
            "frames": frames, "window": window, "seed": seed, "source": data, "device": device, "fp8": fp8,
            "precision": precision,
            "ms_per_frame": seconds * 1e3 / frames, "data": reference["summary"], "windows": windows,
            "drift_db": windows[-1]["psnr"] - windows[0]["psnr"], "ssim_definition": SSIM_DEFINITION,
            "input_psnr_db": float(psnr(inputs, truth).mean()) if degraded else None}


def autoencoder_roundtrip(checkpoint: str | Path, frames: int = 500, window: int = 50, seed: int = 0,
                          data: str = "detailed", device: str = "cpu") -> dict:
    """The bound of the DiT at `checkpoint`: its per-frame autoencoder's round trip (encode, decode, float32)
    of the truth clip evaluate_dit scores (the same frames and seed), PSNR per window."""
    cfg = trained_config(Path(checkpoint))
    return roundtrip_report(load_frame_codec(cfg, device), cfg, frames, window, seed, data, device)


def roundtrip_report(codec, cfg: DiTConfig, frames: int, window: int, seed: int, data: str, device: str) -> dict:
    """autoencoder_roundtrip's report with the DiT's autoencoder loaded in `codec` (load_frame_codec)."""
    frames = whole_blocks(cfg, frames)
    truth = reference_clip(cfg.width, frames, 10_000 + seed, data)
    starts = range(0, frames - window + 1, window)
    windows = []
    for s in starts:  # a window at a time: all 500 frames at once would not fit a GPU's activations
        clip = torch.from_numpy(truth[s:s + window]).to(device).permute(0, 3, 1, 2)[None]
        out = codec.decode(codec.encode(clip))[0].permute(0, 2, 3, 1).float().cpu().numpy()
        windows.append({"start": s, "end": s + window, "psnr": float(psnr(out, truth[s:s + window]).mean())})
    return {"model": cfg.autoencoder, "task": "round trip", "frames": frames, "window": window, "seed": seed,
            "source": data, "device": device, "windows": windows,
            "drift_db": windows[-1]["psnr"] - windows[0]["psnr"]}


def compare_drift(unet: str | Path, dit: str | Path, clips: int = 1, seed: int = 0, frames: int = 500,
                  window: int = 50, strength: float = 0.5, data: str = "detailed", device: str = "cpu",
                  cache_from: str = "output") -> dict:
    """The U-Net at `unet` (mirage-quality's evaluate) and the DiT at `dit` (evaluate_dit, restyling the clean
    clip and the U-Net's degraded input) beside the autoencoder's round trip, on `clips` truth clips (seeds
    seed .. seed + clips - 1, each also the models' noise seed, as mirage-quality --seed), all in float32:
    every clip's reports, and their means and spreads (drift_summary). Each clip gives exactly what a run of
    that clip alone gives: each model is opened once, and every clip's rollout starts from its seed. `cache_from`:
    what the DiT's blocks leave in its KV cache (core.config.CACHE_FROM), in both of its rollouts."""
    if clips < 1:
        raise QualityError(f"--clips {clips}: need at least 1")
    dit = Path(dit)
    cfg = trained_config(dit)
    frames = whole_blocks(cfg, frames)  # the same frames for every model
    codec = load_frame_codec(cfg, device)
    runs = []
    with open_rollout(unet, device=device) as unet_pipe, open_dit(dit, cfg, device, dtype="float32") as dit_pipe:
        for s in range(seed, seed + clips):
            restyle, degraded = (restyle_report(dit_pipe, dit, cfg, frames, window, strength, s, data, d, device, None,
                                                cache_from) for d in (False, True))
            runs.append({"seed": s, "reports": {
                "ae": roundtrip_report(codec, cfg, frames, window, s, data, device),
                "unet": evaluate(unet, frames, window, seed=s, device=device, data=data, pipe=unet_pipe),
                "dit restyle": restyle, "dit degraded": degraded}})
    return {"cache_from": cache_from, "clips": runs, "summary": drift_summary(runs)}


def _spread(values: list[float]) -> dict:
    return {"per_clip": values, "mean": float(np.mean(values)), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


def drift_summary(runs: list[dict]) -> dict:
    """Per window, each model's PSNR (and SSIM where scored) as the mean over the clips, and its mean gap to
    the autoencoder ("- ae"); each model's drift (last window minus first) per clip, and that drift minus
    the autoencoder's on the same clip, with their mean, std, min and max over the clips."""
    names = list(runs[0]["reports"])
    windows = []
    for i, w in enumerate(runs[0]["reports"]["ae"]["windows"]):
        row = {"start": w["start"], "end": w["end"]}
        for name in names:
            scored = [run["reports"][name]["windows"][i] for run in runs]
            row[name] = float(np.mean([x["psnr"] for x in scored]))
            if name != "ae":
                row[f"{name} - ae"] = row[name] - row["ae"]
                row[f"{name} ssim"] = float(np.mean([x["ssim"] for x in scored]))
        windows.append(row)
    drift = {name: _spread([run["reports"][name]["drift_db"] for run in runs]) for name in names}
    drift.update({f"{name} - ae": _spread([run["reports"][name]["drift_db"] - run["reports"]["ae"]["drift_db"]
                                           for run in runs]) for name in names if name != "ae"})
    return {"seeds": [run["seed"] for run in runs], "windows": windows, "drift_db": drift}


def format_drift_table(summary: dict) -> str:
    """docs/QUALITY.md's table of compare_drift: every window, then the drift's mean over the clips, then
    each drift's per-clip values and spread."""
    w, k = summary["windows"], len(summary["seeds"])
    lines = ["| frames | ae | U-Net PSNR (- ae) | DiT restyle PSNR (- ae) | DiT degraded PSNR (- ae) | U-Net / DiT SSIM |",
             "|---|---|---|---|---|---|"]
    for r in w:
        lines.append(f"| {r['start']}-{r['end']} | {r['ae']:.2f} | {r['unet']:.2f} ({r['unet - ae']:+.2f}) | "
                     f"{r['dit restyle']:.2f} ({r['dit restyle - ae']:+.2f}) | {r['dit degraded']:.2f} "
                     f"({r['dit degraded - ae']:+.2f}) | {r['unet ssim']:.3f} / {r['dit restyle ssim']:.3f} |")
    d = {name: v["mean"] for name, v in summary["drift_db"].items()}
    lines.append(f"| drift {w[-1]['start']}-{w[-1]['end']} vs {w[0]['start']}-{w[0]['end']} (mean of {k}) | "
                 f"{d['ae']:+.2f} | {d['unet']:+.2f} ({d['unet - ae']:+.2f}) | {d['dit restyle']:+.2f} "
                 f"({d['dit restyle - ae']:+.2f}) | {d['dit degraded']:+.2f} ({d['dit degraded - ae']:+.2f}) | |")
    lines.append(f"\ndrift in dB per clip (seeds {', '.join(map(str, summary['seeds']))}): mean, std, [min, max]")
    for name, v in summary["drift_db"].items():
        lines.append(f"{name:>18}: {v['mean']:+.2f} +- {v['std']:.2f} [{v['min']:+.2f}, {v['max']:+.2f}]  "
                     + " ".join(f"{x:+.2f}" for x in v["per_clip"]))
    return "\n".join(lines)
