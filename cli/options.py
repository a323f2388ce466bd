"""Options the commands that run a model share (mirage-run, mirage-serve, mirage-quality): one definition each."""
from __future__ import annotations

import re

import click

from mirage.cli.errors import UserError
from mirage.core.device import cuda_available
from mirage.core.loop import MAX_SEED

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")  # mirage.runtime.pipeline.BACKENDS, without importing it

backend = click.option(
    "--backend", type=click.Choice(BACKENDS), default="auto",
    help="auto: TensorRT for an artifact with engines on a GPU, else ONNX Runtime for an artifact, PyTorch for a "
         "checkpoint.")
fast = click.option(
    "--fast", is_flag=True,
    help="The fastest PyTorch path on a GPU (docs/PERF.md): float16, Inductor kernels over channels-last weights "
         "with freezing, the timestep-only work once per step, all in the frame's CUDA graph. Compiling takes a "
         "minute or two before the first frame. Checkpoints on a GPU only: refused on the CPU and for artifacts.")

# a seed outside the generator's range would wrap to another seed's video (mirage.core.loop.MAX_SEED)
SEED = click.IntRange(0, MAX_SEED)

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device(ctx, param, value: str) -> str:
    """--device callback: auto, cpu, cuda or cuda:N, checked before a model loads (torch would
    raise its own error about any other name only once the weights are on their way)."""
    if not DEVICE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: give auto, cpu, cuda or cuda:N")
    return value


def check_fast(fast: bool, device: str) -> None:
    """--fast is a GPU configuration: on the CPU (named, or what auto means without a GPU) float16
    and a CUDA graph do not apply, so it is refused rather than run as something else."""
    if fast and (device == "cpu" or (device == "auto" and not cuda_available())):
        raise UserError("--fast is the GPU path (float16, Inductor kernels in the frame's CUDA graph); "
                        f"{'no CUDA GPU is visible' if device == 'auto' else 'with --device cpu'}, leave it out")
