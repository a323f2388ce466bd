"""Time the weight-bound 3x3 convolutions of a config (default seed880m, batch 1): cuDNN against the
Triton split-K kernel (mirage::conv3x3) with native fp16 and FP8 E4M3 weights (GPU).

    python scripts/bench_conv.py --out docs/bench/2026-11-25_h100_conv.json [--tuned conv_tuned.json]

A thin driver of `python -m mirage.cli.conv_tune` (the measurement is mirage.plugins_cpp.conv_tune),
with its options; --tuned merges the best launches into a table (alone: the package's
plugins_cpp/conv_tuned.json, which mirage::conv3x3 and pack_convolutions read).
"""
from mirage.cli.conv_tune import main

if __name__ == "__main__":
    main()
