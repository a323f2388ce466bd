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

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from mirage.core import graphs as G
from mirage.core.config import PipelineOptions
from mirage.core.errors import BackendError
from mirage.runtime.pipeline import Pipeline, PipelineError, model_steps


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
    from mirage.train.checkpoint import check_not_dit, load_checkpoint

    check_not_dit(path)
    model, meta = load_checkpoint(path)
    return from_model(model, device, model_steps(options, meta))


def from_model(model, device: str = "auto", options: PipelineOptions = PipelineOptions()) -> Pipeline:
    """A pipeline around an in-memory MirageUNet (the PyTorch backend); a latent model's frozen
    autoencoder is loaded from its config."""
    from mirage.model.torch_backend import TorchBackend
    from mirage.model.torch_device import TorchCpu, TorchGpu

    device = _torch_device(device)
    on_gpu = device.startswith("cuda")
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


def from_dit_model(model, device: str = "auto", options: PipelineOptions = PipelineOptions(),
                   prompt_encoder: Callable[[str], np.ndarray] | None = None, decoder=None) -> Pipeline:
    """A pipeline around an in-memory WanDiT (its pure graph modules on the PyTorch backend): the runtime's
    block loop, noise and buffers, as for a DiT artifact; bfloat16 on a GPU, float32 on the CPU. A config on a
    per-frame autoencoder decodes its blocks with it, and `decoder` (a TAEHV, mirage.model.taehv) with Wan's
    latents is the runtime's temporal codec (the config's codec "taehv"); either encodes input blocks too
    (options.strength; TAEHV with its encoder). options.compile: the graphs through torch.compile."""
    from mirage.model.dit_backend import DiTTorchBackend, block_codec
    from mirage.model.taehv import Taehv, TaehvDecoder
    from mirage.model.torch_device import TorchCpu, TorchGpu

    cfg = model.cfg
    if decoder is not None:
        if not isinstance(decoder, TaehvDecoder):
            raise PipelineError(f"{type(decoder).__name__} is not a runtime codec: the runtime's DiT decodes with "
                                "TAEHV (a taew2_1.pth --decoder); the Wan VAE runs in mirage-run --dit alone")
        if options.strength is not None and not isinstance(decoder, Taehv):
            raise PipelineError("video-to-video needs a TAEHV --decoder with its encoder (encoder.* weights, as "
                                "taew2_1.pth has them); this one only decodes")
        cfg = dataclasses.replace(cfg, codec="taehv")  # a ConfigError names a config TAEHV cannot code
    device = _torch_device(device)
    on_gpu = device.startswith("cuda")
    dtype = options.dtype or ("bfloat16" if on_gpu else "float32")
    specs = G.model_graphs(cfg, options.batch, precision="fp16" if dtype == "float16" else "fp32")
    impl = DiTTorchBackend(model, specs, device, dtype, block_codec(cfg, decoder), options.compile)
    return Pipeline(impl, cfg, specs, options, (TorchGpu if on_gpu else TorchCpu)(impl.device), prompt_encoder)


def open_dit_checkpoint(path: str | Path, cfg, device: str = "auto", options: PipelineOptions = PipelineOptions(),
                        lora: str | Path | None = None, prompt_encoder: Callable[[str], np.ndarray] | None = None,
                        decoder: str | Path | None = None) -> Pipeline:
    """A Wan 2.1 DiT checkpoint of any layout mirage.model.wan_checkpoint reads (Self-Forcing, CausVid, LongLive
    with its LoRA, Wan, diffusers), of config `cfg`, in the runtime on the PyTorch backend (checked before the
    model is built, as load_dit does), with `decoder` (a TAEHV file, mirage-run --dit's --decoder) its codec."""
    from mirage.model.wan_checkpoint import load_dit

    codec = None if decoder is None else load_runtime_codec(decoder)
    model, _ = load_dit(path, cfg, lora=lora)
    return from_dit_model(model, device, options, prompt_encoder, codec)


def load_runtime_codec(path: str | Path):
    """A --decoder file as the runtime DiT's codec: a TAEHV file (taew2_1.pth), checked on the CPU. A Wan VAE
    folder is refused before it loads: the runtime's codec graphs are TAEHV's."""
    from mirage.model.wan_decode import load_decoder

    if Path(path).is_dir():
        raise PipelineError(f"--decoder {path}: a folder (a Wan VAE's: the Wan VAE is not a runtime codec); give a "
                            "TAEHV file (taew2_1.pth), or decode with the Wan VAE in mirage-run --dit")
    return load_decoder(path)


def text_prompt_encoder(folder: str | Path, cfg) -> Callable[[str], np.ndarray]:
    """Prompt text -> embeddings (text_len, text_dim) by a local UMT5 encoder folder (on the CPU, once per
    distinct prompt), for Pipeline's `prompt_encoder`; the encoder's width is checked against `cfg` now."""
    from mirage.model.text_encoder import PromptEncoder, check_width

    encoder = PromptEncoder(folder)
    check_width(encoder, cfg)
    return lambda text: encoder.encode(text, cfg.text_len)[0].float().numpy()


def _torch_device(device: str) -> str:
    """auto -> cuda where PyTorch sees a GPU, else cpu; cuda refused where it sees none."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device
