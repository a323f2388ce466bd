"""Conv tuning: time the weight-bound 3x3 convolutions of a model on this GPU, cuDNN against the
Triton split-K kernel (mirage::conv3x3) with native fp16 and FP8 E4M3 weights, and merge each
shape's fastest launch into the table mirage::conv3x3 and pack_convolutions read (conv.TUNED,
plugins_cpp/conv_tuned.json). Entry point: `python -m mirage.cli.conv_tune` (the model is built
there: this layer sees only an nn.Module and a call that runs it).

Per layer shape (pixels <= max_pixels, i.e. the 8x8 and 16x16 levels): device time per call
(CUDA-graph replays, mirage.plugins_cpp.bench) of cuDNN (fp16, channels-last, cudnn.benchmark),
of the Triton kernel with its default launch and with the best of a small sweep (tile, K block,
split), fp16 and FP8 weights; the bandwidth achieved on the weight bytes against the copy
bandwidth measured in the same run; FP8's error against the fp16 output. Calls cycle through
enough weight copies to overflow L2, so every call streams its weights from memory.
Correctness is tests/gpu/test_gpu_conv.py.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mirage.plugins_cpp.bench import copy_bandwidth, device_ms
from mirage.plugins_cpp.conv import TUNED, ConvConfig, conv3x3_triton, default_config, pack_weight, quantize_fp8, shape_key


def conv_shapes(model: nn.Module, run: Callable[[], object], max_pixels: int) -> dict[tuple[int, int, int, int], int]:
    """(H, W, CIN, COUT) -> calls per `run()`, of the model's 3x3 stride-1 convolutions of at most
    max_pixels pixels (run it on the meta device: shapes only)."""
    shapes: collections.Counter = collections.Counter()

    def hook(conv, args, _):
        h, w = args[0].shape[2:]
        if conv.kernel_size == (3, 3) and conv.stride == (1, 1) and h * w <= max_pixels:
            shapes[(h, w, conv.in_channels, conv.out_channels)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return dict(sorted(shapes.items()))


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


def bench_shape(h, w, cin, cout, l2_bytes, sms, peak) -> dict:
    from triton.runtime.errors import OutOfResources  # GPU machines only

    x = torch.randn(1, cin, h, w, device="cuda").half().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, device="cuda").mul_((9 * cin) ** -0.5).half()
    bias = torch.randn(cout, device="cuda").half()
    native = pack_weight(weight)
    fp8, scale = quantize_fp8(native)
    kinds = {"fp16": (native, None), "fp8": (fp8, scale)}
    wbytes = {k: wq.numel() * wq.element_size() for k, (wq, _) in kinds.items()}
    copies = {k: max(2, math.ceil(3 * l2_bytes / v)) for k, v in wbytes.items()}  # every call misses L2
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


def tune(shapes: dict[tuple[int, int, int, int], int], steps: int) -> dict:
    """Time every shape on GPU 0 (printing a table as it goes); the report, per layer and per frame
    (the layers x their calls x `steps` denoiser calls)."""
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    peak = copy_bandwidth()
    report = {"device": props.name, "torch": torch.__version__, "batch": 1, "copy_bytes_per_s": peak, "layers": []}
    print(f"{props.name}, torch {torch.__version__}; copy bandwidth {peak / 1e12:.2f} TB/s (read + write)")
    head = (f"{'layer':>22} {'n':>3} {'MB':>6} | {'cuDNN us':>9} {'%bw':>5} | {'fp16 us':>8} {'dflt':>8} {'%bw':>5}"
            f" | {'fp8 us':>8} {'%bw':>5} {'fp8 err':>8}")
    print(head + "\n" + "-" * len(head))
    totals = collections.Counter()
    for (h, w, cin, cout), count in shapes.items():
        row = {**bench_shape(h, w, cin, cout, props.L2_cache_size, props.multi_processor_count, peak),
               "calls_per_denoise": count}
        report["layers"].append(row)
        for key in ("cudnn_us", "triton_fp16_us", "triton_fp16_default_us", "triton_fp8_us"):
            totals[key] += count * steps * row[key]
        print(f"{row['shape']:>22} {count:>3} {row['weight_MB_fp16']:>6.1f} | {row['cudnn_us']:>9.1f} "
              f"{row['cudnn_pct_copy_bw']:>5.0f} | {row['triton_fp16_us']:>8.1f} {row['triton_fp16_default_us']:>8.1f} "
              f"{row['triton_fp16_pct_copy_bw']:>5.0f} | {row['triton_fp8_us']:>8.1f} {row['triton_fp8_pct_copy_bw']:>5.0f} "
              f"{row['triton_fp8_rel_err']:>8.1e}", flush=True)
    report["per_frame_ms"] = {k: v / 1e3 for k, v in totals.items()}
    print("per frame (these layers x calls x {} steps): ".format(steps)
          + ", ".join(f"{k.removesuffix('_us')} {v / 1e3:.2f} ms" for k, v in totals.items()))
    return report


def write_tuned(device: str, layers: list[dict], path: Path = TUNED) -> None:
    """Merge each layer's fastest launch (and cuDNN's time, so slower shapes can stay cuDNN) into the table."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    entries = table.setdefault(device, {})
    for row in layers:
        for kind in ("fp16", "fp8"):
            key = shape_key(row["pixels"], row["cin"], row["cout"], kind == "fp8")
            entries[key] = {"config": row[f"triton_{kind}_config"], "triton_us": round(row[f"triton_{kind}_us"], 2),
                            "cudnn_us": round(row["cudnn_us"], 2)}
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
