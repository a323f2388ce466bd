"""Time Self-Forcing's own causal Wan model the way its inference pipeline drives it (the anchor).

The anchor for `scripts/bench_dit.py`: guandeh17/Self-Forcing's `CausalWanModel` (wan/modules/
causal_model.py) with random weights in the Wan2.1-T2V-1.3B layout, driven block by block exactly as
its `pipeline/causal_inference.py` does: per block of 3 latent frames, 4 denoising calls (its warped
1000/750/500/250 list, x0 from the flow prediction, re-noised with fresh noise between steps) and one
cache-write call at the context timestep, with its 30-layer KV cache (21 frames, 32760 tokens) and
cross-attention cache. No text encoder or VAE (random prompt embeddings; the decoder is timed
separately in bench_dit).

Nothing of Self-Forcing is in this repository: pass a checkout of it (`fetch` gives one; `git
archive HEAD wan utils | tar -x -C DIR`). Its imports that the GPU machine lacks are stood in for
here, and only these:
- `flash_attn` (not installable there): `flash_attn_varlen_func` on torch SDPA (cuDNN / flash
  backends), one sequence at a time;
- diffusers' `ConfigMixin` / `register_to_config` / `ModelMixin` (used only for from_pretrained):
  a plain nn.Module and a no-op decorator;
- `einops.repeat` (used only by the GAN branch): not called.

    python scripts/anchor_self_forcing.py --self-forcing /path/to/Self-Forcing --json out.json
"""
import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def _install_stand_ins(root: Path) -> None:
    """Module stand-ins for the imports the GPU machine lacks (see the module docstring)."""
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               deterministic=False, **_):
        # q: (total_q, H, D) packed sequences; SDPA wants (B, H, L, D), one sequence at a time
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)[None]
            ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
            vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = varlen
    sys.modules["flash_attn"] = flash_attn

    class ConfigMixin:  # noqa: D401 - stand-in
        pass

    diffusers = types.ModuleType("diffusers")
    cfg = types.ModuleType("diffusers.configuration_utils")
    cfg.ConfigMixin = ConfigMixin
    cfg.register_to_config = lambda f: f
    models = types.ModuleType("diffusers.models")
    mu = types.ModuleType("diffusers.models.modeling_utils")
    mu.ModelMixin = torch.nn.Module
    sys.modules.update({"diffusers": diffusers, "diffusers.configuration_utils": cfg,
                        "diffusers.models": models, "diffusers.models.modeling_utils": mu})
    if "einops" not in sys.modules:
        try:
            import einops  # noqa: F401
        except ImportError:
            einops = types.ModuleType("einops")
            einops.repeat = None
            sys.modules["einops"] = einops
    # the packages' __init__ files import the T5 / VAE / CLIP stacks; load only the modules needed
    for pkg in ("wan", "wan.modules", "utils"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = mod
    sys.path.insert(0, str(root))


def run(root: Path, blocks: int, steps_list, local_attn_size: int, sink_size: int, seed: int) -> dict:
    _install_stand_ins(root)
    from wan.modules.causal_model import CausalWanModel
    from utils.scheduler import FlowMatchScheduler

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    model = CausalWanModel(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256,
                           text_dim=4096, in_dim=16, out_dim=16, local_attn_size=local_attn_size,
                           sink_size=sink_size).to(dev, torch.bfloat16).eval().requires_grad_(False)
    model.num_frame_per_block = 3
    sched = FlowMatchScheduler(shift=5.0, sigma_min=0.0, extra_one_step=True)
    sched.set_timesteps(1000, training=True)
    # pipeline/causal_inference.py: warp_denoising_step
    warped = torch.cat((sched.timesteps.cpu(), torch.tensor([0.0])))[1000 - torch.tensor(steps_list)]

    b, f_blk, c, h, w = 1, 3, 16, 60, 104
    frame_seq, layers = 1560, 30
    cache_tokens = 32760 if local_attn_size == -1 else local_attn_size * frame_seq
    kv = [{"k": torch.zeros(b, cache_tokens, 12, 128, dtype=torch.bfloat16, device=dev),
           "v": torch.zeros(b, cache_tokens, 12, 128, dtype=torch.bfloat16, device=dev),
           "global_end_index": torch.tensor([0], dtype=torch.long, device=dev),
           "local_end_index": torch.tensor([0], dtype=torch.long, device=dev)} for _ in range(layers)]
    xattn = [{"k": torch.zeros(b, 512, 12, 128, dtype=torch.bfloat16, device=dev),
              "v": torch.zeros(b, 512, 12, 128, dtype=torch.bfloat16, device=dev),
              "is_init": False} for _ in range(layers)]
    prompt = [torch.randn(512, 4096, device=dev, dtype=torch.bfloat16)]
    sigmas, timesteps = sched.sigmas.to(dev).double(), sched.timesteps.to(dev).double()

    def generator(x, t, start):
        # utils/wan_wrapper.py WanDiffusionWrapper.forward with a kv cache: flow -> x0 in float64
        flow = model(x.permute(0, 2, 1, 3, 4), t=t, context=prompt, seq_len=32760, kv_cache=kv,
                     crossattn_cache=xattn, current_start=start, cache_start=None).permute(0, 2, 1, 3, 4)
        tid = torch.argmin((timesteps[None] - t.flatten()[:, None].double()).abs(), dim=1)
        x0 = x.flatten(0, 1).double() - sigmas[tid].reshape(-1, 1, 1, 1) * flow.flatten(0, 1).double()
        return x0.to(flow.dtype).unflatten(0, flow.shape[:2])

    def clip(noise):
        """One clip from an empty cache, as CausalInferencePipeline.inference runs it; block times in ms."""
        for layer in range(layers):
            xattn[layer]["is_init"] = False
            kv[layer]["global_end_index"].zero_()
            kv[layer]["local_end_index"].zero_()
        times, start_frame = [], 0
        for blk in range(blocks):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = noise[:, start_frame:start_frame + f_blk]
            for i, cur in enumerate(warped):
                t = torch.full((b, f_blk), float(cur), device=dev).long()
                x0 = generator(x, t, start_frame * frame_seq)
                if i < len(warped) - 1:
                    nxt = torch.full((b * f_blk,), float(warped[i + 1]), device=dev).long()
                    x = sched.add_noise(x0.flatten(0, 1), torch.randn_like(x0.flatten(0, 1)),
                                        nxt).unflatten(0, x0.shape[:2])
            generator(x0, torch.zeros((b, f_blk), device=dev).long(), start_frame * frame_seq)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            start_frame += f_blk
        return times

    noise = torch.randn(b, blocks * f_blk, c, h, w, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        cold = clip(noise)  # first use: cuDNN / cuBLAS heuristics and allocations, as bench_dit's untimed clip
        torch.cuda.reset_peak_memory_stats()
        times = clip(noise)
    for blk, ms in enumerate(times):
        print(f"block {blk}: {ms:.1f} ms (cold clip {cold[blk]:.1f} ms)", flush=True)
    latent_frames = blocks * f_blk
    video_frames = 1 + 4 * (latent_frames - 1)  # Wan VAE: 4x temporal, the first latent frame is one frame
    total_s = sum(times) / 1e3
    return {"anchor": "guandeh17/Self-Forcing CausalWanModel, pipeline/causal_inference.py driving",
            "attention": "torch SDPA standing in for flash_attn_varlen_func",
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "blocks": blocks, "steps": list(steps_list), "local_attn_size": local_attn_size,
            "sink_size": sink_size, "cold_block_ms": cold, "block_ms": times, "first_block_ms": times[0],
            "mean_block_ms": statistics.mean(times), "median_block_ms": statistics.median(times),
            "video_frames": video_frames, "video_fps_no_decoder": video_frames / total_s,
            "video_fps_12_per_block": 12 * blocks / total_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--self-forcing", type=Path, required=True, help="a checkout of guandeh17/Self-Forcing")
    p.add_argument("--blocks", type=int, default=7, help="blocks of 3 latent frames (7 = its 21-frame clip)")
    p.add_argument("--local-attn-size", type=int, default=-1, help="-1: its full 21-frame cache")
    p.add_argument("--sink-size", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    a = p.parse_args()
    if not (a.self_forcing / "wan" / "modules" / "causal_model.py").is_file():
        p.error(f"{a.self_forcing} is not a Self-Forcing checkout (no wan/modules/causal_model.py)")
    res = run(a.self_forcing, a.blocks, [1000, 750, 500, 250], a.local_attn_size, a.sink_size, a.seed)
    print(json.dumps({k: v for k, v in res.items() if k != "block_ms"}, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
