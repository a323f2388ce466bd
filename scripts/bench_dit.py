"""Time the chunk-causal video DiT's block step: eager, torch.compile, CUDA graphs (GPU).

    python scripts/bench_dit.py                              # wan-1.3b, 832x480, bf16, 7 blocks, every path
    python scripts/bench_dit.py --config wan-1.3b-longlive --blocks 500 --modes compile-graph
    python scripts/bench_dit.py --modes graph --attention cudnn   # SDPA pinned to one backend
    python scripts/bench_dit.py --modes compile-graph --decoders taehv,wan-vae --profile   # with decode, by kernel kind
    python scripts/bench_dit.py --modes compile-graph --fp8 static     # bf16, then FP8 matmuls, same clip
    python scripts/bench_dit.py --config dit-tiny --device cpu --blocks 2   # CPU smoke run

Random weights in the Wan 2.1 layout, batch 1, no decoder unless --decoders (the Wan VAE needs diffusers);
what is measured and how is in mirage.model.dit_bench. Prints a table and writes the JSON report (default docs/bench/).
"""
from __future__ import annotations

import argparse
import datetime
import sys

from mirage.core.config import get_dit_config
from mirage.core.errors import MirageError
from mirage.core.report import device_tag, write_json
from mirage.model import dit_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--blocks", type=int, default=7, help="blocks per clip (7 = Self-Forcing's 81-frame clip)")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(dit_bench.MODES)} "
                                                 "(default: all on CUDA, eager on the CPU)")
    p.add_argument("--attention", default="auto", help=f"SDPA backend, of {', '.join(dit_bench.ATTENTION)}")
    p.add_argument("--decoders", default="", help=f"comma-separated, of {', '.join(dit_bench.DECODERS)}: "
                                                  "each path's clip again with decode (serial and overlapped)")
    p.add_argument("--profile", action="store_true", help="one more block of each path by kernel kind")
    p.add_argument("--fp8", default="", help=f"also run every path with FP8 matmuls, activation scales of "
                                             f"{', '.join(dit_bench.FP8)} (comma-separated)")
    p.add_argument("--json", default=None, help="report path (default docs/bench/<date>_<device>_dit_<config>.json)")
    args = p.parse_args(argv)
    try:
        if args.blocks < 1:
            raise MirageError(f"--blocks {args.blocks}: at least 1")
        modes = args.modes.split(",") if args.modes else (list(dit_bench.MODES) if args.device.startswith("cuda")
                                                          else ["eager"])
        report = dit_bench.run(get_dit_config(args.config), modes, args.blocks, args.device,
                               attention=args.attention, decoders=tuple(filter(None, args.decoders.split(","))),
                               profile=args.profile, fp8=tuple(filter(None, args.fp8.split(","))))
    except MirageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dit_bench.table(report), flush=True)
    path = args.json or f"docs/bench/{datetime.date.today()}_{device_tag(report['device'])}_dit_{args.config}.json"
    write_json(path, report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
