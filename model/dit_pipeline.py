"""Text-to-video with the Wan DiT, block by block, decoded as it goes: what `mirage-run --dit` drives.

    pipe = DiTPipeline.open(DiTSpec("wan-1.3b", checkpoint=path, decoder=taehv), prompt, device="cuda")
    with pipe:
        pipe.reset(seed)                 # warms up (compiles, captures) untimed, then starts the video
        for frames in pipe.blocks(7):    # each block's video frames (T', H, W, 3) in [-1, 1], as it finishes
            ...

`open` does every check a user's input can fail before anything is put on the device: the config and
its overrides (resolution, window, sink), the prompt (an embeddings file's width; a text encoder folder
loaded on the CPU and its width checked), the decoder (loaded on the CPU), the checkpoint's layout,
names and shapes (`load_dit` checks them before it allocates). Only then do the DiT, its cache, the
decoder and the encoder go to the device; the encoder runs once for the prompt and is dropped.

Video frames per block follow the Wan VAE (and TAEHV): 4 per latent frame, except the video's first
latent frame, which gives one (`DiTConfig.video_frames`); a config on a per-frame autoencoder
(`DiTConfig.autoencoder`, dit-tiny-taesd) decodes one video frame per latent frame with it instead.

Video-to-video (StreamDiffusionV2 / MirageLSD's use; needs a codec that also encodes: the per-frame
autoencoder, or TAEHV with its encoder):

    pipe.reset(seed)
    pipe.set_strength(0.5)                  # from the next block on; 0 keeps the input, 1 ignores it
    pipe.set_cache_from("input")            # the cache holds the input's latents, not the restyle (CACHE_FROM)
    for chunk in camera_blocks:             # (pipe.frames_in, H, W, 3) in [-1, 1]
        out = pipe.restyle(chunk)           # encoded, noised to σ = strength, denoised through the steps left
        pipe.set_prompt(other)              # any time: the held frames are re-cached under the new prompt
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mirage.core.config import DiTConfig, check_cache_from, get_dit_config
from mirage.core.errors import BackendError, MirageError
from mirage.model.dit import WanDiT
from mirage.model.dit_cache import BlockStepper, CapturedBlockStep
from mirage.model.fp8 import calibrate, to_fp8
from mirage.model.taehv import Taehv
from mirage.model.text_encoder import PromptEncoder, check_width, encode_prompt
from mirage.model.latent import load_frame_codec
from mirage.model.wan_checkpoint import DiTWeights, check_saved_config, load_dit, saved_dit_config
from mirage.model.wan_decode import load_decoder


class DiTRunError(MirageError, ValueError):
    """A DiT run asked for something its inputs cannot give (a prompt without an encoder, a graph on the CPU)."""


@dataclass(frozen=True)
class DiTSpec:
    """What to run: a config (DIT_CONFIGS) with optional overrides, its weights and its decoder.
    `checkpoint` None means random weights, and then a random TAEHV (encoder and decoder) stands in
    when `decoder` is None too (a smoke run of the whole path, video-to-video included)."""

    config: str
    checkpoint: Path | None = None
    lora: Path | None = None
    decoder: Path | None = None
    text_encoder: Path | None = None
    resolution: tuple[int, int] | None = None  # (width, height) in video pixels
    window: int | None = None  # frames a block attends to, itself and the sink included (the cache's size)
    sink: int | None = None

    def dit_config(self) -> DiTConfig:
        """The config with the overrides applied; DiTConfig's own checks name a resolution the patch does
        not divide, or a sink plus a block that do not fit in the window."""
        changes = {k: v for k, v in (("window_frames", self.window), ("sink_frames", self.sink)) if v is not None}
        if self.resolution is not None:
            changes.update(width=self.resolution[0], height=self.resolution[1])
        return dataclasses.replace(get_dit_config(self.config), **changes)


def blocks_for(cfg: DiTConfig, frames: int) -> int:
    """The fewest blocks that make at least `frames` video frames (a run makes whole blocks)."""
    blocks = 1
    while cfg.video_frames(blocks * cfg.block_frames, first=True) < frames:
        blocks += 1
    return blocks


def _check_encodes(decoder, cfg: DiTConfig) -> None:
    if not hasattr(decoder, "encode"):
        raise DiTRunError(f"{cfg.name}'s decoder only decodes: video-to-video needs one that also encodes, a TAEHV "
                          "file with its encoder.* weights (taew2_1.pth) or a config on a per-frame autoencoder "
                          "(dit-tiny-taesd)")


def torch_device(device: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> a torch device, refused when CUDA is asked for and absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


class DiTPipeline:
    """A WanDiT's BlockStepper (eager, Inductor, CUDA-graph replays), one prompt, a streaming decoder."""

    def __init__(self, cfg: DiTConfig, model: WanDiT, weights: DiTWeights | None, decoder, text: torch.Tensor,
                 device: torch.device, compile: bool = False, graph: bool = False, fp8: str | None = None):
        self.cfg, self.model, self.weights, self.decoder, self.device = cfg, model, weights, decoder, device
        self.compiled, self.graphed = compile, graph
        # FP8 matmuls (mirage.model.fp8): static scales are calibrated on a clip with the run's own prompt
        self.fp8 = to_fp8(model, fp8, calibrate(model, text) if fp8 == "static" else None) if fp8 else None
        self.stepper = BlockStepper(model, batch=1, device=device, dtype=next(model.parameters()).dtype)
        if compile:
            self.stepper.compile()
        self._step = CapturedBlockStep(self.stepper).step if graph else self.stepper.step
        self.set_prompt(text)
        self.noise_shape = (cfg.steps, 1, cfg.in_dim, cfg.block_frames, *cfg.latent_size)
        self.generator = torch.Generator(device=device)
        self.setup_done = False
        self.strength, self.cache_from = 1.0, "output"

    @classmethod
    def open(cls, spec: DiTSpec, prompt: str | Path, device: str = "auto", compile: bool = False,
             graph: bool | None = None, fp8: str | None = None, video_to_video: bool = False,
             dtype: str | None = None) -> "DiTPipeline":
        """Checks everything on the CPU (see the module's docstring), then builds the pipeline on `device`:
        in `dtype` ("float32", "bfloat16"; None: bfloat16 on a GPU, float32 on the CPU). `prompt`: text (needs
        spec.text_encoder) or an embeddings file. `graph`: replay each block as a CUDA graph (None: on a GPU, as
        the U-Net's frame). `fp8`: static or dynamic FP8 matmuls (None: the model's dtype). `video_to_video`:
        `restyle` will be used, so a decoder that cannot encode is refused here too."""
        cfg = spec.dit_config()
        dev = torch_device(device)
        if graph and dev.type != "cuda":
            raise DiTRunError("CUDA graphs need a GPU; on the CPU the block runs eagerly (leave out --fast)")
        graph = dev.type == "cuda" if graph is None else graph
        if spec.lora is not None and spec.checkpoint is None:
            raise DiTRunError(f"{spec.lora}: a LoRA is merged into a checkpoint's weights; give the base checkpoint")
        if isinstance(prompt, str) and spec.text_encoder is None:
            raise DiTRunError("a text --prompt needs --text-encoder FOLDER (a local UMT5 encoder), or give "
                              "--prompt-embeds FILE")
        if spec.checkpoint is not None:  # a checkpoint trained here names its config: a wrong --dit is said first
            check_saved_config(spec.checkpoint, cfg)
        if cfg.autoencoder and spec.decoder is not None:
            raise DiTRunError(f"{cfg.name} decodes with its own per-frame autoencoder ({cfg.autoencoder}); "
                              "leave out --decoder")
        if spec.decoder is None and spec.checkpoint is not None and not cfg.autoencoder:
            raise DiTRunError("no --decoder: give a TAEHV file (taew2_1.pth) or a Wan VAE folder to write video")
        dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if dev.type == "cuda" else torch.float32
        encoder = PromptEncoder(spec.text_encoder, "cpu", dtype) if isinstance(prompt, str) else None
        if encoder is not None:
            check_width(encoder, cfg)
        text = encode_prompt(prompt, cfg) if encoder is None else None
        if cfg.autoencoder:  # the per-frame autoencoder the checkpoint was trained with, its hash checked
            saved = saved_dit_config(spec.checkpoint) if spec.checkpoint is not None else None
            decoder = load_frame_codec(saved or cfg)
        elif spec.decoder is not None:
            decoder = load_decoder(spec.decoder)
        else:
            decoder = Taehv().eval().requires_grad_(False)  # random weights: a random TAEHV (smoke run)
        if video_to_video:
            _check_encodes(decoder, cfg)
        # the first allocation on the device: load_dit checks the checkpoint before it builds the model
        if spec.checkpoint is None:
            with torch.device(dev):
                model = WanDiT(cfg).to(dtype).eval().requires_grad_(False)
            weights = None
        else:
            model, weights = load_dit(spec.checkpoint, cfg, dtype=dtype, device=dev, lora=spec.lora)
        decoder.to(dev, dtype)
        if encoder is not None:  # encoded once on the device, then dropped: the prompt stays for the run
            encoder.model.to(dev)
            text = encode_prompt(prompt, cfg, encoder)
            del encoder
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return cls(cfg, model, weights, decoder, text.to(dev), dev, compile, graph, fp8)

    def set_prompt(self, text: torch.Tensor) -> None:
        """Embeddings (1, text_len, text_dim) for the blocks that follow; mid-video, the held frames are
        re-cached under the new prompt (LongLive's switch)."""
        text = text.to(self.device, next(self.model.parameters()).dtype)
        if self.stepper.cache.frames_written:
            self.stepper.recache(text)
        else:
            self.stepper.set_prompt(text)

    def set_strength(self, strength: float) -> None:
        """Video-to-video: the noise level σ an input block is put at before the remaining steps denoise it
        (0: the input's own latents, 1: generation from noise); from the next block on, no restart."""
        if not 0 <= strength <= 1:
            raise DiTRunError(f"strength {strength}: choose a value in [0, 1]")
        self.stepper.set_strength(strength)
        self.strength = strength

    @property
    def frames_in(self) -> int:
        """Video frames the next block of video-to-video takes (and gives back): as many as a block decodes to,
        so the video's first block takes fewer with a temporal codec (TAEHV: 4N - 3, then 4N)."""
        return self.cfg.video_frames(self.cfg.block_frames, first=self.stepper.cache.frames_written == 0)

    def set_cache_from(self, cache_from: str) -> None:
        """Video-to-video: what a block leaves in the KV cache for the blocks after it, from the next block on:
        "output" (its restyle) or "input" (the input block's latents; core.config.CACHE_FROM)."""
        self.stepper.cache_input = check_cache_from(cache_from) == "input"
        self.cache_from = cache_from

    def restyle(self, frames: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Video-to-video: the next block's input frames (frames_in, H, W, 3) float32 in [-1, 1] are
        encoded, noised to the strength and denoised with the cache and the prompt (StreamDiffusionV2's
        use); returns its output frames, the same shape, each the restyle of the input frame in its place.
        Needs a codec that encodes (a per-frame autoencoder, or a TAEHV file with its encoder), and runs the
        block step eagerly (or compiled), never as a captured graph. `noise` (steps, 1, in_dim, N, h, w): the
        block's noise instead of the generator's (another runner's, to compare)."""
        _check_encodes(self.decoder, self.cfg)
        expect = (self.frames_in, self.cfg.height, self.cfg.width, 3)
        if frames.shape != expect:
            raise DiTRunError(f"input block of shape {frames.shape}; {self.cfg.name} takes {expect} "
                              "(frames, height, width, RGB)")
        video = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).to(self.device)
        source = self.decoder.encode(video.permute(0, 3, 1, 2)[None]).float()  # (1, in_dim, N, h, w)
        noise = torch.randn(self.noise_shape, device=self.device, generator=self.generator) if noise is None else \
            torch.from_numpy(np.asarray(noise, np.float32)).to(self.device)
        out = self.decoder.decode(self.stepper.step(noise, source))[0]  # (N, 3, H, W)
        return out.permute(0, 2, 3, 1).float().cpu().numpy()

    def reset(self, seed: int) -> None:
        """Start a video from an empty cache with noise from `seed`. The first call with Inductor or CUDA
        graphs also runs the blocks of every cache fill level once (compilation, capture), untimed."""
        if not self.setup_done and (self.compiled or self.graphed):
            self.stepper.reset()
            spans = set()
            while self.stepper.cache.span not in spans:
                spans.add(self.stepper.cache.span)
                self._step(torch.zeros(self.noise_shape, device=self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.setup_done = True
        self.stepper.reset()
        self.decoder.reset()
        self.generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def blocks(self, count: int) -> Iterator[np.ndarray]:
        """Generate `count` blocks lazily: each item is one block's video frames (T', H, W, 3) float32 in
        [-1, 1] on the host, made only when asked for, so a consumer writes a block before the next exists."""
        for _ in range(count):
            noise = torch.randn(self.noise_shape, device=self.device, generator=self.generator)
            frames = self.decoder.decode(self._step(noise))[0]  # (T', 3, H, W)
            yield frames.permute(0, 2, 3, 1).float().cpu().numpy()

    def describe(self) -> tuple[str, float | None, str]:
        """(device name, peak memory MiB or None on the CPU, what that number means), as Pipeline.describe."""
        if self.device.type != "cuda":
            return "cpu", None, ""
        return (torch.cuda.get_device_name(self.device), torch.cuda.max_memory_allocated(self.device) / 2**20,
                "peak allocated by PyTorch")

    def close(self) -> None:
        self.model = self.stepper = self._step = self.decoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "DiTPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
