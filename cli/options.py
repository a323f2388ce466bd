"""Options the commands that run a model share (mirage-run, mirage-serve, mirage-quality): one definition each."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable

import click

from mirage.cli.errors import UserError
from mirage.core.config import CACHE_FROM, DEFAULT_STRENGTH, DIT_CONFIGS, PIPELINE_BACKENDS
from mirage.core.device import cuda_available
from mirage.core.loop import MAX_SEED


backend = click.option(
    "--backend", type=click.Choice(PIPELINE_BACKENDS), default="auto",
    help="auto: TensorRT for an artifact with engines on a GPU, else ONNX Runtime for an artifact, PyTorch for a "
         "checkpoint.")
fast = click.option(
    "--fast", is_flag=True,
    help="The fastest PyTorch path on a GPU (docs/PERF.md): float16, Inductor kernels over channels-last weights "
         "with freezing, the timestep-only work once per step, all in the frame's CUDA graph (a DiT: its graphs' "
         "Inductor kernels in bf16, in the block's CUDA graph). Compiling takes a minute or two before the first "
         "frame. Checkpoints on a GPU only: refused on the CPU and for artifacts.")

# a DiT and its prompt (mirage-run, mirage-serve)
dit = click.option(
    "--dit", "config", type=click.Choice(list(DIT_CONFIGS)), default=None,
    help="MODEL is a Wan 2.1 chunk-causal DiT checkpoint of this layout (Self-Forcing / CausVid / LongLive .pt, a "
         "Wan or diffusers transformer folder, or one trained here: checkpoints/dit-tiny-taesd).")
lora = click.option("--lora", type=click.Path(dir_okay=False, path_type=Path), default=None,
                    help="--dit: a LongLive LoRA file (lora.pt) merged into the checkpoint's weights.")
prompt = click.option("--prompt", default=None,
                      help="A DiT's prompt text, encoded once by --text-encoder (mirage-serve: the streams' starting "
                           "prompt; a --prompt-bank name as well).")
prompt_embeds = click.option(
    "--prompt-embeds", type=click.Path(path_type=Path), default=None,
    help="A DiT's precomputed prompt embeddings, (L, text_dim) in a .safetensors file (.pt: mirage-run --dit) "
         "(mirage-serve: the streams' starting prompt).")
text_encoder = click.option(
    "--text-encoder", type=click.Path(path_type=Path), default=None,
    help="A DiT's local UMT5 encoder folder (transformers; or a diffusers Wan pipeline folder) for --prompt "
         "(mirage-serve: and for the prompts of control messages, each encoded once).")

strength = click.option(
    "--strength", type=click.FloatRange(0, 1), default=None,
    help="A DiT's video-to-video: how far each input block is noised before the steps left denoise it; 0 keeps the "
         f"input, 1 ignores it (mirage-run: needs an --input; an --input without it runs at {DEFAULT_STRENGTH}, for "
         "a DiT checkpoint and a DiT artifact with an encoder graph alike; mirage-serve's DiT runs video-to-video "
         "when it is given, its streams starting at it). Needs a config on a per-frame autoencoder (dit-tiny-taesd) or a TAEHV --decoder with its encoder.")

cache_from = click.option(
    "--cache-from", type=click.Choice(CACHE_FROM), default=None,
    help="A DiT's video-to-video: what a block leaves in the KV cache for the blocks after it. output (the default): "
         "its restyle, as Self-Forcing and StreamDiffusionV2 do; input: the input block's latents, what teacher "
         "forcing trains on, so the model's own errors do not pile up over a long video (the bundled "
         "dit-tiny-taesd: docs/QUALITY.md), while what the restyle adds is not carried on to the next block.")

max_strength = click.option(
    "--max-strength", type=click.FloatRange(0, 1), default=None,
    help="A DiT's video-to-video: the highest strength a stream may be given (default 1). Every block runs as many "
         "flow passes as this strength needs, for every stream (Wan's shifted schedule: 4 at 1, one at 0.6), so a "
         "lower ceiling makes each block cheaper; a control message above it is refused.")

# a seed outside the generator's range would wrap to another seed's video (mirage.core.loop.MAX_SEED)
SEED = click.IntRange(0, MAX_SEED)

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device(ctx, param, value: str) -> str:
    """--device callback: auto, cpu, cuda or cuda:N, checked before a model loads (torch would
    raise its own error about any other name only once the weights are on their way)."""
    if not DEVICE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: give auto, cpu, cuda or cuda:N")
    return value


def on_cpu(device: str) -> bool:
    """Whether a --device runs on the CPU: named, or what auto means without a GPU."""
    return device == "cpu" or (device == "auto" and not cuda_available())


def check_fast(fast: bool, device: str) -> None:
    """--fast is a GPU configuration: on the CPU float16 and a CUDA graph do not apply, so it is refused
    rather than run as something else."""
    if fast and on_cpu(device):
        raise UserError("--fast is the GPU path (float16, Inductor kernels in the frame's CUDA graph); "
                        f"{'no CUDA GPU is visible' if device == 'auto' else 'with --device cpu'}, leave it out")


def group(name: str, *options: Callable) -> Callable:
    """Click options collected into one keyword argument: the command receives `name` = {option
    name: value} instead of one parameter per option, so a command with many options still has a
    short signature. `options` are click.option(...) decorators, listed in --help order."""
    names = [_param_name(option) for option in options]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def collected(*args, **kwargs):
            kwargs[name] = {n: kwargs.pop(n) for n in names}
            return command(*args, **kwargs)

        for option in reversed(options):
            collected = option(collected)
        return collected

    return decorate


def _param_name(option: Callable) -> str:
    """The parameter name a click.option decorator gives its value."""
    def probe():
        pass

    option(probe)
    return probe.__click_params__[-1].name
