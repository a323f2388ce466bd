"""`python -m mirage.cli.conv_tune`: tune the Triton 3x3 convolution for this GPU and a model config
(mirage.plugins_cpp.conv_tune), writing a report and, with --tuned, the table the kernel reads."""
from __future__ import annotations

import json
from pathlib import Path

import click

from mirage.cli.errors import UserError
from mirage.core.config import CONFIGS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="seed880m",
              help="The model whose convolutions are timed.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=256, help="Layers up to this many pixels (16x16).")
@click.option("--steps", type=click.IntRange(min=1), default=4, help="Denoiser calls per frame, for the per-frame sums.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="conv.json",
              help="The report (JSON): every layer's timings.")
@click.option("--tuned", is_flag=False, flag_value="package", default=None, metavar="[TABLE]",
              help="Merge this GPU's best launches into TABLE; --tuned alone: the package's "
                   "plugins_cpp/conv_tuned.json, the one mirage::conv3x3 and pack_convolutions read.")
def main(config_name: str, max_pixels: int, steps: int, out: Path, tuned: str | None) -> None:
    """Time cuDNN against the Triton split-K conv3x3 (fp16 and FP8 weights) per layer shape of a
    model on GPU 0, and keep the fastest launch of each shape."""
    import torch

    from mirage.core.config import get_config
    from mirage.model.unet import MirageUNet
    from mirage.plugins_cpp import conv_tune
    from mirage.plugins_cpp.conv import TUNED

    if not torch.cuda.is_available():
        raise UserError("conv tuning times kernels on a CUDA GPU; PyTorch sees none here")
    cfg = get_config(config_name)
    with torch.device("meta"):
        model = MirageUNet(cfg)
        s = cfg.image_size
        shapes = conv_tune.conv_shapes(model, lambda: model.denoise(
            torch.empty(1, cfg.channels, s, s), torch.empty(1), None,
            torch.empty(1, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim),
            torch.empty(1, cfg.context_frames, dtype=torch.long)), max_pixels)
    report = {"config": config_name, **conv_tune.tune(shapes, steps)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if tuned:
        conv_tune.write_tuned(report["device"], report["layers"], TUNED if tuned == "package" else Path(tuned))


if __name__ == "__main__":
    main()
