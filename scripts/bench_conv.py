"""Time the weight-bound 3x3 convolutions of a config (default seed880m, batch 1): cuDNN against the
Triton split-K kernel (mirage::conv3x3) with native fp16 and FP8 E4M3 weights (GPU).

    python scripts/bench_conv.py --out docs/bench/2026-11-25_h100_conv.json

Per layer shape (pixels <= --max-pixels, i.e. the 8x8 and 16x16 levels): device time per call
(CUDA-graph replays, mirage.plugins_cpp.bench) of cuDNN (fp16, channels-last, cudnn.benchmark),
of the Triton kernel with its default launch and with the best of a small sweep (tile, K block,
split), fp16 and FP8 weights; the bandwidth achieved on the weight bytes against the copy
bandwidth measured in the same run; FP8's error against the fp16 output. Calls cycle through
enough weight copies to overflow L2, so every call streams its weights from memory.

Then, per shape, GroupNorm (the config's group count) + SiLU + the convolution, as the ResBlocks
run it: torch eager (F.group_norm, F.silu, cuDNN), Inductor's compiled GroupNorm + SiLU then cuDNN
(skip with --no-inductor), and the fused Triton kernel with its GroupNorm + SiLU prologue at the
best launch found above (the statistics reduction included, the kernel alone in parentheses).
Per-frame sums of these count only the convolutions that follow a GroupNorm + SiLU (`gn` column).

Prints two tables, writes JSON. Correctness is tests/gpu/test_gpu_conv.py.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mirage.core.config import get_config
from mirage.model.unet import MirageUNet, ResBlock
from mirage.plugins_cpp.bench import copy_bandwidth, device_ms
from mirage.plugins_cpp.conv import (ConvConfig, conv3x3_triton, default_config, group_norm_stats, pack_weight,
                                     quantize_fp8, shape_key)


def conv_shapes(name: str, max_pixels: int) -> dict[tuple[int, int, int, int], tuple[int, int]]:
    """(H, W, CIN, COUT) -> (calls per denoiser call, of them after a GroupNorm + SiLU: a ResBlock's
    conv1 / conv2), of the 3x3 stride-1 convolutions of the config."""
    cfg = get_config(name)
    with torch.device("meta"):
        model = MirageUNet(cfg)
    after_norm = {id(conv) for block in model.modules() if isinstance(block, ResBlock)
                  for conv in (block.conv1, block.conv2)}
    shapes: collections.Counter = collections.Counter()
    normed: collections.Counter = collections.Counter()

    def hook(conv, args, _):
        h, w = args[0].shape[2:]
        if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and h * w <= max_pixels:
            shapes[(h, w, conv.in_channels, conv.out_channels)] += 1
            normed[(h, w, conv.in_channels, conv.out_channels)] += id(conv) in after_norm

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        s = cfg.image_size
        model.denoise(torch.empty(1, cfg.channels, s, s), torch.empty(1), None,
                      torch.empty(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim),
                      torch.empty(1, cfg.context_frames, dtype=torch.long))
    return {key: (shapes[key], normed[key]) for key in sorted(shapes)}


def sweep(pixels: int, cin: int, cout: int, sms: int) -> list[ConvConfig]:
    """The default launch and the tile / K block / split alternatives around it."""
    configs = [default_config(pixels, cin, cout, sms)]
    for block_m, block_n, block_k in itertools.product((64, 128) if pixels > 64 else (64,), (64, 128), (64, 128)):
        tiles = math.ceil(pixels / block_m) * math.ceil(cout / block_n)
        base = max(1, min(math.ceil(2 * sms / tiles), 9 * math.ceil(cin / block_k) // 4))
        stage_bytes = 2 * (block_m + block_n) * block_k  # one 16-bit A and W tile in shared memory
        stages = max(2, min(4, (160 << 10) // stage_bytes))
        configs += [ConvConfig(block_m, block_n, block_k, split, num_stages=stages) for split in (base, 2 * base)]
    return list(dict.fromkeys(configs))


def cycled(calls: list):
    """One zero-argument call that runs the next of `calls` each time (each on its own weight copy)."""
    ring = itertools.cycle(calls)
    return lambda: next(ring)()


def weight_kinds(weight: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(COUT, CIN, 3, 3) fp16 -> {"fp16": (packed, None), "fp8": (packed E4M3, scale)}."""
    native = pack_weight(weight)
    return {"fp16": (native, None), "fp8": quantize_fp8(native)}


def weight_copies(weight: torch.Tensor, l2_bytes: int) -> int:
    """Enough copies of a weight that cycling through them misses L2 on every call."""
    return max(2, math.ceil(3 * l2_bytes / (weight.numel() * weight.element_size())))


def bench_shape(h, w, cin, cout, l2_bytes, sms, peak) -> dict:
    from triton.runtime.errors import OutOfResources  # here: --help and the no-GPU message need no triton

    x = torch.randn(1, cin, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, device="cuda").mul_((9 * cin) ** -0.5).half()
    bias = torch.randn(cout, device="cuda").half()
    kinds = weight_kinds(weight)
    wbytes = {k: wq.numel() * wq.element_size() for k, (wq, _) in kinds.items()}
    copies = {k: weight_copies(wq, l2_bytes) for k, (wq, _) in kinds.items()}
    row = {"shape": f"{h}x{w} {cin}->{cout}", "pixels": h * w, "cin": cin, "cout": cout,
           "weight_MB_fp16": wbytes["fp16"] / 1e6}

    cudnn = [weight.clone().contiguous(memory_format=torch.channels_last) for _ in range(copies["fp16"])]
    fn = cycled([functools.partial(F.conv2d, x, wc, bias, padding=1) for wc in cudnn])
    row["cudnn_us"] = 1e3 * device_ms(fn, calls=4 * len(cudnn))
    row["cudnn_weight_TBps"] = wbytes["fp16"] / row["cudnn_us"] / 1e6
    row["cudnn_pct_copy_bw"] = 100 * wbytes["fp16"] / (row["cudnn_us"] * 1e-6) / peak
    del cudnn

    ref = F.conv2d(x.float(), weight.float(), bias.float(), padding=1)
    default = default_config(h * w, cin, cout, sms)
    for kind, (wq, sc) in kinds.items():
        weights = [wq.clone() for _ in range(copies[kind])]
        timed = {}
        for config in sweep(h * w, cin, cout, sms):
            fn = cycled([functools.partial(conv3x3_triton, x, wc, sc, bias, None, config) for wc in weights])
            try:
                timed[config] = 1e3 * device_ms(fn, calls=4 * len(weights))
            except OutOfResources as e:  # a tile config this GPU cannot hold: not a candidate
                print(f"  skipped {config}: {e}", flush=True)
        config = min(timed, key=timed.get)
        us = timed[config]
        out = conv3x3_triton(x, wq, sc, bias, None, config).float()
        row |= {f"triton_{kind}_us": us, f"triton_{kind}_default_us": timed[default],
                f"triton_{kind}_config": dataclasses.asdict(config),
                f"triton_{kind}_weight_TBps": wbytes[kind] / us / 1e6,
                f"triton_{kind}_pct_copy_bw": 100 * wbytes[kind] / (us * 1e-6) / peak,
                f"triton_{kind}_rel_err": ((out - ref).norm() / ref.norm()).item()}
    return row


def bench_prologue(h, w, cin, cout, groups, configs: dict[str, ConvConfig], l2_bytes, inductor: bool) -> dict:
    """GroupNorm + SiLU + conv, per call: eager torch, Inductor's GroupNorm + SiLU then cuDNN, and the
    Triton kernel with the prologue (statistics reduction + kernel, and the kernel alone) at `configs`."""
    from triton.runtime.errors import OutOfResources

    x = (2 * torch.randn(1, cin, h, w, device="cuda") + 0.5).half().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, device="cuda").mul_((9 * cin) ** -0.5).half()
    bias = torch.randn(cout, device="cuda").half()
    gamma, beta = (1 + 0.3 * torch.randn(cin, device="cuda")).half(), (0.3 * torch.randn(cin, device="cuda")).half()
    ref = F.conv2d(F.silu(F.group_norm(x.float(), groups, gamma.float(), beta.float())), weight.float(), bias.float(),
                   padding=1)
    row = {"groups": groups}

    def gn_silu(t):
        return F.silu(F.group_norm(t, groups, gamma, beta))

    variants = {"gn_silu_cudnn": gn_silu}
    if inductor:
        torch._dynamo.reset()  # one compile per layer shape, not recompiles counted against one function
        variants["gn_silu_inductor_cudnn"] = torch.compile(gn_silu)
    cudnn = [weight.clone().contiguous(memory_format=torch.channels_last)
             for _ in range(weight_copies(weight, l2_bytes))]

    def unfused(wc, act):
        return F.conv2d(act(x), wc, bias, padding=1)

    for name, act in variants.items():
        fn = cycled([functools.partial(unfused, wc, act) for wc in cudnn])
        row[f"{name}_us"] = 1e3 * device_ms(fn, calls=4 * len(cudnn))
    del cudnn

    def fused(wc, scale, config):
        mean, rstd = group_norm_stats(x, groups)
        return conv3x3_triton(x, wc, scale, bias, None, config, mean=mean, rstd=rstd, gamma=gamma, beta=beta)

    mean, rstd = group_norm_stats(x, groups)
    for kind, (wq, scale) in weight_kinds(weight).items():
        weights = [wq.clone() for _ in range(weight_copies(wq, l2_bytes))]
        config = configs[kind]
        try:
            fused(wq, scale, config)
        except OutOfResources as e:  # the prologue's registers / shared memory on top of the best plain launch
            print(f"  fused {kind}: {config} does not fit ({e}), timing the default launch", flush=True)
            config = default_config(h * w, cin, cout, torch.cuda.get_device_properties(0).multi_processor_count)
        row[f"fused_{kind}_us"] = 1e3 * device_ms(cycled([functools.partial(fused, wc, scale, config)
                                                           for wc in weights]), calls=4 * len(weights))
        alone = [functools.partial(conv3x3_triton, x, wc, scale, bias, None, config, mean=mean, rstd=rstd, gamma=gamma,
                                   beta=beta) for wc in weights]
        row[f"fused_{kind}_kernel_us"] = 1e3 * device_ms(cycled(alone), calls=4 * len(weights))
        out = fused(wq, scale, config).float()
        row |= {f"fused_{kind}_config": dataclasses.asdict(config),
                f"fused_{kind}_rel_err": ((out - ref).norm() / ref.norm()).item()}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="seed880m")
    p.add_argument("--max-pixels", type=int, default=256, help="layers up to this many pixels (16x16)")
    p.add_argument("--steps", type=int, default=4, help="denoiser calls per frame, for the per-frame sums")
    p.add_argument("--out", default="conv.json")
    p.add_argument("--tuned", help="merge this GPU's best launches into this table (plugins_cpp/conv_tuned.json "
                                   "is the one mirage::conv3x3 and pack_convolutions read)")
    p.add_argument("--groups", type=int, help="GroupNorm groups of the GN + SiLU + conv timings (default: the "
                                              "config's norm_groups)")
    p.add_argument("--no-inductor", action="store_true", help="skip the Inductor GroupNorm + SiLU variant "
                                                              "(one compile per layer shape)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False here)")
    groups = args.groups or get_config(args.config).norm_groups
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    peak = copy_bandwidth()
    report = {"device": props.name, "torch": torch.__version__, "config": args.config, "batch": 1,
              "copy_bytes_per_s": peak, "groups": groups, "layers": []}
    print(f"{props.name}, torch {torch.__version__}; copy bandwidth {peak / 1e12:.2f} TB/s (read + write)")
    head = (f"{'layer':>22} {'n':>3} {'MB':>6} | {'cuDNN us':>9} {'%bw':>5} | {'fp16 us':>8} {'dflt':>8} {'%bw':>5}"
            f" | {'fp8 us':>8} {'%bw':>5} {'fp8 err':>8}")
    print(head + "\n" + "-" * len(head))
    totals = collections.Counter()
    for (h, w, cin, cout), (count, normed) in conv_shapes(args.config, args.max_pixels).items():
        row = {**bench_shape(h, w, cin, cout, props.L2_cache_size, props.multi_processor_count, peak),
               "calls_per_denoise": count, "calls_after_norm": normed}
        configs = {kind: ConvConfig(**row[f"triton_{kind}_config"]) for kind in ("fp16", "fp8")}
        row |= bench_prologue(h, w, cin, cout, groups, configs, props.L2_cache_size, not args.no_inductor)
        report["layers"].append(row)
        for key in ("cudnn_us", "triton_fp16_us", "triton_fp16_default_us", "triton_fp8_us"):
            totals[key] += count * args.steps * row[key]
        for key in PROLOGUE_KEYS:
            if key in row:
                totals[key] += normed * args.steps * row[key]
        print(f"{row['shape']:>22} {count:>3} {row['weight_MB_fp16']:>6.1f} | {row['cudnn_us']:>9.1f} "
              f"{row['cudnn_pct_copy_bw']:>5.0f} | {row['triton_fp16_us']:>8.1f} {row['triton_fp16_default_us']:>8.1f} "
              f"{row['triton_fp16_pct_copy_bw']:>5.0f} | {row['triton_fp8_us']:>8.1f} {row['triton_fp8_pct_copy_bw']:>5.0f} "
              f"{row['triton_fp8_rel_err']:>8.1e}", flush=True)
    report["per_frame_ms"] = {k: v / 1e3 for k, v in totals.items()}
    print("per frame (these layers x calls x {} steps): ".format(args.steps)
          + ", ".join(f"{k.removesuffix('_us')} {v / 1e3:.2f} ms" for k, v in totals.items()
                      if k not in PROLOGUE_KEYS))
    print_prologue_table(report["layers"], groups)
    print("per frame (the gn calls x {} steps): ".format(args.steps)
          + ", ".join(f"{k.removesuffix('_us')} {v / 1e3:.2f} ms" for k, v in totals.items() if k in PROLOGUE_KEYS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.tuned:
        write_tuned(Path(args.tuned), props.name, report["layers"])


PROLOGUE_KEYS = ("gn_silu_cudnn_us", "gn_silu_inductor_cudnn_us", "fused_fp16_us", "fused_fp8_us")


def print_prologue_table(layers: list[dict], groups: int) -> None:
    """GroupNorm + SiLU + conv per layer shape: eager and Inductor (then cuDNN) against the fused kernel."""
    print(f"\nGroupNorm ({groups} groups) + SiLU + conv, us per call; fused = statistics + kernel, "
          "(kernel) = the kernel alone")
    head = (f"{'layer':>22} {'gn':>3} | {'eager':>8} {'Inductor':>9} | {'fp16':>8} {'(kernel)':>9} {'err':>8}"
            f" | {'fp8':>8} {'(kernel)':>9} {'err':>8}")
    print(head + "\n" + "-" * len(head))
    for row in layers:
        inductor = row.get("gn_silu_inductor_cudnn_us")
        inductor = f"{inductor:>9.1f}" if inductor is not None else f"{'-':>9}"
        print(f"{row['shape']:>22} {row['calls_after_norm']:>3} | {row['gn_silu_cudnn_us']:>8.1f} {inductor} | "
              + " | ".join(f"{row[f'fused_{k}_us']:>8.1f} {'(%.1f)' % row[f'fused_{k}_kernel_us']:>9} "
                           f"{row[f'fused_{k}_rel_err']:>8.1e}" for k in ("fp16", "fp8")))


def write_tuned(path: Path, device: str, layers: list[dict]) -> None:
    """Merge each layer's fastest launch (and cuDNN's time, so slower shapes can stay cuDNN) into the table."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    entries = table.setdefault(device, {})
    for row in layers:
        for kind in ("fp16", "fp8"):
            key = shape_key(row["pixels"], row["cin"], row["cout"], kind == "fp8")
            entries[key] = {"config": row[f"triton_{kind}_config"], "triton_us": round(row[f"triton_{kind}_us"], 2),
                            "cudnn_us": round(row["cudnn_us"], 2)}
    path.write_text(json.dumps(table, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
