"""A checkpoint, or a model in memory, as a runtime Pipeline on the PyTorch backend.

    from mirage.bridge.pipeline import load_pipeline
    with load_pipeline("checkpoints/tiny") as pipe:    # a checkpoint folder or an artifact
        ...

The runtime (mirage.runtime) imports no torch layer and opens artifacts itself; what only the
torch side has (checkpoint loading, the PyTorch backend, its CPU / GPU array plumbing) it gets from
here. This module imports torch only when a checkpoint or a model is opened, so the CLIs that
import it still run an artifact on a machine without PyTorch.
"""
from __future__ import annotations

from pathlib import Path

from mirage.core import graphs as G
from mirage.core.config import PipelineOptions
from mirage.core.errors import BackendError
from mirage.runtime.pipeline import Pipeline, model_steps


def load_pipeline(path: str | Path, backend: str = "auto", device: str = "auto",
                  options: PipelineOptions = PipelineOptions()) -> Pipeline:
    """Pipeline.load for artifacts and checkpoints alike (a checkpoint runs on the PyTorch backend)."""
    return Pipeline.load(path, backend, device, options, checkpoint=open_checkpoint)


def open_checkpoint(path: Path, backend: str, device: str, options: PipelineOptions) -> Pipeline:
    """A checkpoint folder on the PyTorch backend (Pipeline.load has checked the folder and `backend`)."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise BackendError("running a checkpoint needs PyTorch; or export it to an artifact") from e
    from mirage.train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    return from_model(model, device, model_steps(options, meta))


def from_model(model, device: str = "auto", options: PipelineOptions = PipelineOptions()) -> Pipeline:
    """A pipeline around an in-memory MirageUNet (the PyTorch backend); a latent model's frozen
    autoencoder is loaded from its config."""
    import torch

    from mirage.model.torch_backend import TorchBackend
    from mirage.model.torch_device import TorchCpu, TorchGpu

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    on_gpu = str(device).startswith("cuda")
    dtype = options.dtype or ("float16" if on_gpu else "float32")
    codec = None
    if model.cfg.latent:
        from mirage.train.codec import load_codec

        codec = load_codec(model.cfg)
    impl = TorchBackend(model, device, dtype, options.compile, options.channels_last, options.freeze,
                        options.kernel_library, options.precompute_time, codec)
    precision = "fp16" if dtype == "float16" else "fp32"
    plumbing = (TorchGpu if on_gpu else TorchCpu)(impl.device)
    return Pipeline(impl, model.cfg, G.model_graphs(model.cfg, options.batch, precision=precision), options, plumbing)
