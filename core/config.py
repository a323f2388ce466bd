"""Model and training configs: small frozen dataclasses saved inside every checkpoint.

Named model configs (``tiny``, ``small``, ``base``, ``seed880m``) live in ``CONFIGS``.
``seed880m`` matches the scale of the public roadmap's baseline (a 192-base-channel
U-Net at 64x64 with about 880M parameters) so that speed compares at equal size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from mirage.core import taehv_layout as taehv
from mirage.core.errors import MirageError
from mirage.core.graphs import dit_graphs, unet_graphs
from mirage.core.schedule import CONTEXT_NOISE, T


class ConfigError(MirageError, ValueError):
    """A config name or value a user asked for does not exist or does not fit."""


def _check_types(cfg) -> None:
    """Every field holds a value of its annotated type (a config.json edited by hand may not)."""
    for name, kind in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if typing.get_origin(kind) is tuple:
            ok = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            want = "a list of integers"
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        else:
            ok, want = isinstance(value, kind), f"a {kind.__name__}"
        if not ok:
            raise ConfigError(f"{type(cfg).__name__}.{name}={value!r} must be {want}")


def _check_ranges(cfg, rules: dict[str, tuple[typing.Callable[[typing.Any], bool], str]]) -> None:
    """`rules`: field -> (predicate, what it must be); the first failing field is the error."""
    for name, (ok, must) in rules.items():
        if not ok(getattr(cfg, name)):
            raise ConfigError(f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r} must be {must}")


def _positive(v) -> bool:
    return v > 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    image_size: int = 32  # the denoiser's square working size: pixels, or latents for a latent model
    channels: int = 3  # RGB, or the autoencoder's latent channels
    cond_channels: int = 0  # 0: generation; 3: video-to-video (conditioning frame concatenated to x_t)
    base_channels: int = 32  # width of the first U-Net level
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; each level after the first halves H, W
    num_res_blocks: int = 1  # ResBlocks per level on the way down (one more on the way up)
    attn_levels: tuple[int, ...] = (2,)  # levels with spatial self-attention (low resolutions only)
    temporal_levels: tuple[int, ...] = (1, 2)  # levels with temporal attention to the context memory
    head_dim: int = 32  # spatial self-attention head width
    temporal_dim: int = 64  # D: width of a memory key/value token (same for every temporal layer)
    temporal_heads: int = 4  # heads of temporal attention; temporal_dim / temporal_heads per head
    context_frames: int = 4  # K: slots in the context ring buffer
    norm_groups: int = 8  # GroupNorm groups
    prediction: str = "v"  # v-prediction: well-posed at every noise level, incl. zero terminal SNR
    # Latent models: the frozen autoencoder (a mirage-train --stage autoencoder folder; a relative
    # path is looked up from the working folder, then from the package) and the sha256 of its
    # model.safetensors, which every load checks. frame_size = image_size * its downscale.
    autoencoder: str = ""
    autoencoder_sha256: str = ""
    frame_size: int = 0  # output frames are frame_size x frame_size RGB; 0 = image_size (a pixel model)
    latent_scale: float = 1.0  # the denoiser sees encode(frame) * latent_scale (near unit variance)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_ranges(self, {
            "name": (bool, "a non-empty name"),
            "image_size": (_positive, "> 0"),
            "channels": (_positive, "> 0"),
            "base_channels": (_positive, "> 0"),
            "channel_mults": (lambda m: len(m) > 0 and min(m) > 0, "a non-empty list of positive multipliers"),
            "num_res_blocks": (_positive, ">= 1"),
            "head_dim": (_positive, "> 0"),
            "temporal_dim": (_positive, "> 0"),
            "temporal_heads": (_positive, ">= 1"),
            "context_frames": (_positive, ">= 1 (slots in the context memory)"),
            "norm_groups": (_positive, ">= 1"),
            "frame_size": (lambda v: v >= 0, ">= 0 (0: a pixel model)"),
        })
        levels = len(self.channel_mults)
        for attr in ("attn_levels", "temporal_levels"):
            bad = [lvl for lvl in getattr(self, attr) if not 0 <= lvl < levels]
            if bad:
                raise ConfigError(f"{attr}={getattr(self, attr)} names levels outside 0..{levels - 1}")
        if self.image_size % (2 ** (levels - 1)):
            raise ConfigError(f"image_size={self.image_size} must be divisible by {2 ** (levels - 1)} "
                              f"for {levels} levels")
        if self.temporal_dim % self.temporal_heads:
            raise ConfigError(f"temporal_dim={self.temporal_dim} not divisible by temporal_heads={self.temporal_heads}")
        if bool(self.autoencoder) != bool(self.frame_size):
            raise ConfigError("a latent model needs both autoencoder and frame_size; a pixel model neither")
        if not self.latent_scale > 0:
            raise ConfigError(f"latent_scale={self.latent_scale} must be positive")
        if self.frame_size and (self.frame_size % self.image_size or self.frame_size <= self.image_size):
            raise ConfigError(f"frame_size={self.frame_size} must be a multiple > 1 of image_size={self.image_size}")
        if self.cond_channels not in (0, self.channels):
            raise ConfigError(f"cond_channels must be 0 (generation) or {self.channels} (video-to-video)")
        if self.prediction != "v":
            raise ConfigError(f"prediction={self.prediction!r}: only 'v' is implemented")
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.norm_groups:
                raise ConfigError(f"channels {self.base_channels * mult} not divisible by norm_groups={self.norm_groups}")
        for lvl in set(self.attn_levels) | {levels - 1}:  # the middle block always has spatial attention
            ch = self.base_channels * self.channel_mults[lvl]
            if ch % self.head_dim:
                raise ConfigError(f"level {lvl} has {ch} channels, not divisible by head_dim={self.head_dim}")

    @property
    def latent(self) -> bool:
        return bool(self.autoencoder)

    @property
    def pixels(self) -> int:
        """Side of the RGB frames the model makes (and, video-to-video, takes)."""
        return self.frame_size or self.image_size

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return tuple(self.image_size >> i for i in range(len(self.channel_mults)))

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """Spatial size (H*W tokens) of each temporal layer, in the order the U-Net visits them:
        down path, middle, up path. Their concatenation is the token axis of the memory."""
        sizes = self.level_sizes
        down = [sizes[lvl] ** 2 for lvl in range(len(sizes)) if lvl in self.temporal_levels]
        mid = [sizes[-1] ** 2]
        return tuple(down + mid + down[::-1])

    @property
    def memory_tokens(self) -> int:
        return sum(self.memory_layers)

    family = "unet"  # not a field (no annotation): manifests record it, for the graphs such an artifact holds
    dynamic_batch = True  # its exports may take a dynamic batch (mirage-export --max-batch)

    def graphs(self, batch: int, max_batch: int | None, precision: str) -> dict:
        """Its exported graphs' specs (call mirage.core.graphs.model_graphs, which checks the arguments)."""
        return unet_graphs(self, batch, max_batch, precision)

    def unit(self, specs: dict, options: "PipelineOptions"):
        """Its unit of work in the runtime: one frame per row (mirage.core.loop.FrameUnit)."""
        from mirage.core.loop import FrameUnit  # the loop is below the configs' users, not the configs
        from mirage.core.schedule import DEFAULT_STEPS

        if options.strength is not None:
            raise ConfigError(f"strength={options.strength}: {self.name} takes no strength (a DiT's video-to-video "
                              "does; a U-Net's task is in its config)")
        return FrameUnit(self, specs, options.steps or DEFAULT_STEPS, options.context_noise)

    def with_task(self, task: str) -> "ModelConfig":
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        return dataclasses.replace(self, cond_channels=self.channels if task == "v2v" else 0)

    @property
    def task(self) -> str:
        return "v2v" if self.cond_channels else "generate"

    @property
    def restores(self) -> bool:
        """Video-to-video here is restoration: the model's input is a degraded frame (core.video_io.v2v_input:
        luma plus coarse chroma) that whoever feeds it (mirage-run, the server) makes from the source frame."""
        return bool(self.cond_channels)


TASKS = ("generate", "v2v")

CONFIGS: dict[str, ModelConfig] = {
    # Trains on a laptop CPU in minutes; used by the tests and the default demo.
    "tiny": ModelConfig(),
    "small": ModelConfig(name="small", image_size=64, base_channels=64, channel_mults=(1, 2, 2, 4),
                         num_res_blocks=2, attn_levels=(2, 3), temporal_levels=(2, 3), head_dim=64,
                         temporal_dim=128, temporal_heads=4, context_frames=8, norm_groups=32),
    "base": ModelConfig(name="base", image_size=64, base_channels=128, channel_mults=(1, 2, 3, 4),
                        num_res_blocks=2, attn_levels=(1, 2, 3), temporal_levels=(2, 3), head_dim=64,
                        temporal_dim=256, temporal_heads=8, context_frames=8, norm_groups=32),
    # The roadmap baseline's scale: 192 base channels at 64x64, ~880M parameters.
    "seed880m": ModelConfig(name="seed880m", image_size=64, base_channels=192, channel_mults=(1, 2, 5, 8),
                            num_res_blocks=3, attn_levels=(1, 2, 3), temporal_levels=(2, 3), head_dim=64,
                            temporal_dim=256, temporal_heads=8, context_frames=8, norm_groups=32),
}
# Latent configs: the same U-Nets on 8x-downscaled 4-channel latents. tiny-64 uses the narrow
# ae-tiny so that it trains and runs on a laptop CPU; the 256^2 and 512^2 configs use ae-taesd, the
# full-width TAESD layout trained on the GPU machine (docs/QUALITY.md: 39.5 dB on held-out synthetic
# 512^2 frames against ae-tiny's 19-20 dB). latent_scale brings each autoencoder's latents to about
# unit variance (measured on detailed frames: ae-tiny's std 0.4-0.6, ae-taesd's 0.8).
LATENT_AE, LATENT_SCALE = "checkpoints/ae-tiny", 2.0
TAESD_AE, TAESD_SCALE = "checkpoints/ae-taesd", 1.25
CONFIGS["tiny-64"] = dataclasses.replace(CONFIGS["tiny"], name="tiny-64", image_size=8, channels=4, channel_mults=(1, 2),
                                         attn_levels=(1,), temporal_levels=(0, 1), autoencoder=LATENT_AE, frame_size=64,
                                         latent_scale=LATENT_SCALE)
# CPU demos: tiny-64's U-Net on 16x16 latents of ae-taesd (128x128 frames), tiny's on 32x32 latents (256x256);
# ae-taesd's encoder and decoder are most of such a frame's time on a CPU.
CONFIGS["tiny-128"] = dataclasses.replace(CONFIGS["tiny-64"], name="tiny-128", image_size=16, autoencoder=TAESD_AE,
                                          frame_size=128, latent_scale=TAESD_SCALE)
CONFIGS["tiny-256"] = dataclasses.replace(CONFIGS["tiny"], name="tiny-256", channels=4, autoencoder=TAESD_AE,
                                          frame_size=256, latent_scale=TAESD_SCALE)
CONFIGS["small-256"] = dataclasses.replace(CONFIGS["small"], name="small-256", image_size=32, channels=4,
                                           autoencoder=TAESD_AE, frame_size=256, latent_scale=TAESD_SCALE)
CONFIGS["base-512"] = dataclasses.replace(CONFIGS["base"], name="base-512", channels=4, autoencoder=TAESD_AE,
                                          frame_size=512, latent_scale=TAESD_SCALE)
CONFIGS["seed880m-512"] = dataclasses.replace(CONFIGS["seed880m"], name="seed880m-512", channels=4,
                                              autoencoder=TAESD_AE, frame_size=512, latent_scale=TAESD_SCALE)


def get_config(name: str, task: str = "generate") -> ModelConfig:
    if name not in CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name].with_task(task)


DMD_EXITS = ("random", "last")  # TrainConfig.dmd_exit
# mirage-train's lr with --dmd-from and no --lr: a fine-tune's. The from-scratch 1e-3 turns a
# converged generator's frames to noise within 40 DMD steps (docs/QUALITY.md).
DMD_LR = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # clips per step (per process under DDP)
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay after warmup)
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # EMA of weights used for sampling and export
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    grad_checkpoint: bool = False  # recompute ResBlocks in backward to save memory
    context_noise_max: int = 300  # history augmentation: context frames noised at t_ctx ~ U[0, this]
    context_noise_prob: float = 0.9  # fraction of clips whose context is noise-augmented
    empty_context_prob: float = 0.1  # fraction of clips trained with an empty memory (first frame)
    data: str = "synthetic"  # 'synthetic' or a folder of videos / image sequences
    init_from: str = ""  # checkpoint whose (EMA) weights training starts from: fine-tuning
    self_forcing_prob: float = 0.0  # fraction of steps whose context holds the model's own frames (train/self_forcing.py)
    self_forcing_horizon: int = 2  # frames the model generates itself before the loss frame (1..context_frames)
    self_forcing_steps: int = 4  # DDIM steps per generated frame (self-forced context, DMD's sample): the runtime's
    self_forcing_context_noise: int = CONTEXT_NOISE  # t_ctx of the generated frames' context: the runtime's
    self_forcing_strength: float = 1.0  # 1: generate from pure noise; s < 1: from the real frame partly noised (SDEdit)
    distill_from: str = ""  # teacher checkpoint of progressive distillation (train/distill.py); the student starts from it
    student_steps: int = 0  # the student's DDIM steps N (the teacher takes 2N); 0 = no distillation
    dmd_from: str = ""  # teacher of distribution matching distillation (train/dmd.py): G, real and fake score start from it
    dmd_fake_updates: int = 5  # DMD: fake-score steps, each on a fresh sample of G, per generator step (DMD2: 5)
    # DMD: weight of the ordinary v-loss on real clips added to G's loss (an anchor). Without it (0) DMD
    # overshoots into moving noise; 4 held a 500-frame rollout within 10% (docs/QUALITY.md, eighth session)
    dmd_regression: float = 4.0
    dmd_exit: str = "random"  # DMD: G's DDIM step with gradient: "random" (Self-Forcing) or "last" (the runtime's output)
    seed: int = 0
    log_every: int = 50
    save_every: int = 500  # save a checkpoint every this many steps ...
    save_minutes: float = 10.0  # ... and at least this often in wall-clock time
    latent_cache: int = 0  # latent models: encode this many clips once and train on them (0: encode every batch)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision={self.precision!r}; choose fp32, bf16 or fp16")
        if self.dmd_exit not in DMD_EXITS:
            raise ConfigError(f"dmd_exit={self.dmd_exit!r}; choose {' or '.join(DMD_EXITS)}")
        probability = (lambda p: 0 <= p <= 1, "in [0, 1]")
        _check_ranges(self, {
            "steps": (_positive, ">= 1"),
            "batch_size": (_positive, ">= 1"),
            "lr": (_positive, "> 0"),
            "warmup": (lambda v: v >= 0, ">= 0"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "grad_clip": (_positive, "> 0"),
            "context_noise_max": (lambda v: 0 <= v < T, f"in [0, {T - 1}]"),
            "context_noise_prob": probability,
            "empty_context_prob": probability,
            "data": (bool, "'synthetic' or a folder"),
            "self_forcing_prob": probability,
            "self_forcing_strength": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "self_forcing_horizon": (_positive, ">= 1"),
            "self_forcing_steps": (_positive, ">= 1"),
            "self_forcing_context_noise": (lambda v: 0 <= v < T, f"in [0, {T - 1}]"),
            "student_steps": (lambda v: v >= 0, ">= 0"),
            "dmd_fake_updates": (_positive, ">= 1"),
            "dmd_regression": (lambda v: v >= 0, ">= 0"),
            "log_every": (_positive, ">= 1"),
            "save_every": (_positive, ">= 1"),
            "save_minutes": (_positive, "> 0"),
            "latent_cache": (lambda v: v >= 0, ">= 0"),
        })
        if bool(self.distill_from) != (self.student_steps > 0):
            raise ConfigError("distillation needs both a teacher (distill_from / --distill-from) and "
                              "student_steps >= 1 (--student-steps)")
        if self.distill_from and self.init_from:
            raise ConfigError("a distilled student starts from its teacher; drop init_from (--init-from)")
        if self.dmd_from and (self.init_from or self.distill_from):
            raise ConfigError(f"dmd_from={self.dmd_from!r} (--dmd-from): the generator starts from its teacher; drop "
                              + ("init_from (--init-from)" if self.init_from else "distill_from (--distill-from)"))


def to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_json(cls, data: dict):
    """Build a frozen config from JSON, turning lists back into tuples; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}; was this saved by a newer Mirage?")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def check_same(saved: ModelConfig, wanted: ModelConfig) -> None:
    """Refuse to mix a checkpoint with a different model config, naming both values."""
    diffs = [f"{f.name}: checkpoint has {getattr(saved, f.name)!r}, asked for {getattr(wanted, f.name)!r}"
             for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(wanted, f.name)]
    if diffs:
        raise ConfigError("model config mismatch; " + "; ".join(diffs))


def dumps(cfg) -> str:
    return json.dumps(to_json(cfg), indent=2)


FRAME_FORMATS = ("float32", "uint8")  # PipelineOptions.frames
# what mirage.runtime.Pipeline (mirage-run, mirage-serve --backend) runs a model with
PIPELINE_BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
# a DiT's video-to-video strength where an input comes without one (mirage-run --input, checkpoint and artifact)
DEFAULT_STRENGTH = 0.6
# what a DiT's video-to-video block leaves in its KV cache for the blocks after it: its output (the restyled
# block, as Self-Forcing's rollouts and StreamDiffusionV2 do), or its input (the input block's clean latents: the
# cache then holds what teacher forcing trained on, so no error of the model's own accumulates in it; the output's
# own details are not carried on to the next block)
CACHE_FROM = ("output", "input")


def check_cache_from(cache_from: str) -> str:
    if cache_from not in CACHE_FROM:
        raise ConfigError(f"cache_from={cache_from!r}: choose one of {', '.join(CACHE_FROM)}")
    return cache_from


@dataclass(frozen=True)
class PipelineOptions:
    """How a Pipeline runs a model (mirage.runtime.Pipeline, `mirage-run` flags)."""

    steps: int | None = None  # DDIM steps per frame; None: the model's recorded sampling_steps, else 4
    context_noise: int = CONTEXT_NOISE  # t_ctx: history augmentation at inference (core.schedule)
    batch: int = 1  # rows = independent streams advanced together (stream slots)
    cuda_graph: bool = True  # capture the whole frame in one CUDA graph (GPU)
    dtype: str | None = None  # PyTorch backend: float32 | float16 | bfloat16; None = float16 on CUDA, float32 on CPU
    compile: str | None = None  # PyTorch backend: a torch.compile mode ("default" = Inductor kernels in the frame graph)
    channels_last: bool = False  # PyTorch backend: channels-last weights and activations
    freeze: bool = False  # PyTorch backend: Inductor freezing (weights as constants), needs `compile`
    kernel_library: str | None = None  # PyTorch backend on CUDA: libmirage_kernels.so for temporal attention
    precompute_time: bool = False  # PyTorch backend: the time MLP and ResBlock time projections once per step
    # Host frames: "float32" (H, W, 3) in [-1, 1], or "uint8" (H, W, 3) 0..255 as mirage.core.video_io.to_uint8
    # maps them, converted inside the frame (the CUDA graph on a GPU) so only bytes cross PCIe, both ways
    frames: str = "float32"
    # A DiT with a per-frame autoencoder: video-to-video, each input block encoded and noised to this strength
    # (every row's at the start; Pipeline.control changes a row's); None: generation
    strength: float | None = None
    # Video-to-video: the highest strength a row may be given. The captured block runs as many flow passes as this
    # strength needs (1: the whole schedule; Wan's shifted schedule at 0.6: one) for every row, so a lower
    # ceiling makes every block cheaper; a control above it is refused
    max_strength: float = 1.0
    cache_from: str = "output"  # video-to-video: what a block leaves in the KV cache (CACHE_FROM)

    def __post_init__(self) -> None:
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise ConfigError(f"strength={self.strength}: choose a value in [0, 1]")
        if not 0 <= self.max_strength <= 1:
            raise ConfigError(f"max_strength={self.max_strength}: choose a value in [0, 1]")
        if self.strength is not None and self.strength > self.max_strength:
            raise ConfigError(f"strength={self.strength} is over max_strength={self.max_strength}: raise max_strength "
                              "(the strength a row may be given at most)")
        check_cache_from(self.cache_from)
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ConfigError(f"steps={self.steps}: choose between 1 and 1000")
        if not 0 <= self.context_noise < 1000:
            raise ConfigError(f"context_noise={self.context_noise}: choose between 0 and 999")
        if self.batch < 1:
            raise ConfigError(f"batch={self.batch}: must be at least 1")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: choose float32, float16 or bfloat16")
        if self.freeze and not self.compile:
            raise ConfigError("freeze needs compile (freezing is an Inductor option)")
        if self.frames not in FRAME_FORMATS:
            raise ConfigError(f"frames={self.frames!r}: choose {' or '.join(FRAME_FORMATS)}")

    @classmethod
    def fastest(cls, **changes) -> "PipelineOptions":
        """The fastest PyTorch configuration measured on an H100 (docs/PERF.md): Inductor kernels
        over channels-last weights, frozen, inside the frame's CUDA graph, in float16, with the
        timestep-only work computed once per step; frames cross PCIe as uint8."""
        return dataclasses.replace(cls(dtype="float16", compile="default", channels_last=True, freeze=True,
                                       precompute_time=True, frames="uint8"), **changes)


@dataclass(frozen=True)
class AutoencoderConfig:
    """A TAESD-layout autoencoder (diffusers' AutoencoderTiny): frames in [-1, 1] <-> latents.

    Every encoder level after the first halves H and W, so the latent grid is image_size / downscale
    with downscale = 2 ** (levels - 1). The diffusion model sees `(raw - shift) * scaling_factor`
    (diffusers' convention). TAESD's own latents need none (1.0 / 0.0) and a TAESD folder brings
    its own values; a model trained here is only pulled towards unit variance by its loss, so
    measure its latents before choosing a scaling for a latent config.
    """

    name: str = "taesd-tiny"
    image_size: int = 512  # the frame size exports and latent configs use; the network is fully convolutional
    channels: int = 3  # RGB
    latent_channels: int = 4
    encoder_block_out_channels: tuple[int, ...] = (16, 16, 16, 16)  # one width per level (all equal)
    decoder_block_out_channels: tuple[int, ...] = (16, 16, 16, 16)
    num_encoder_blocks: tuple[int, ...] = (1, 2, 2, 2)  # AutoencoderTinyBlocks per level (3 convs each)
    num_decoder_blocks: tuple[int, ...] = (2, 2, 2, 1)
    scaling_factor: float = 1.0
    shift: float = 0.0
    weights: str = ""  # a local TAESD folder in diffusers layout (config.json + diffusion_pytorch_model.safetensors)
    sha256: str = ""  # of that folder's safetensors file; empty: not checked

    def __post_init__(self) -> None:
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(blocks) or len(widths) < 2:
                raise ConfigError(f"{side}: {len(widths)} widths and {len(blocks)} block counts; "
                                  "give the same number (at least 2) of each")
            if min(widths) < 1 or min(blocks) < 0:
                raise ConfigError(f"{side}: widths {widths} must be positive and block counts {blocks} not negative")
            if len(set(widths)) != 1:  # AutoencoderTiny's level convs map width[i] -> width[i]: no width changes
                raise ConfigError(f"{side}: widths {widths} differ; AutoencoderTiny needs one width for all levels")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ConfigError(f"encoder has {len(self.encoder_block_out_channels)} levels, decoder "
                              f"{len(self.decoder_block_out_channels)}: they must match to invert the downscaling")
        if self.channels < 1 or self.latent_channels < 1:
            raise ConfigError(f"channels={self.channels} and latent_channels={self.latent_channels} must be positive")
        if self.image_size < self.downscale or self.image_size % self.downscale:
            raise ConfigError(f"image_size={self.image_size} must be a positive multiple of downscale={self.downscale}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"scaling_factor={self.scaling_factor} must be positive")
        if self.sha256 and (len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef")):
            raise ConfigError(f"sha256={self.sha256!r} is not 64 lowercase hex digits")
        if self.sha256 and not self.weights:
            raise ConfigError("sha256 is set but weights is empty: name the TAESD folder it belongs to")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downscale

    def with_weights(self, folder: str, sha256: str = "") -> "AutoencoderConfig":
        return dataclasses.replace(self, weights=folder, sha256=sha256)


AE_CONFIGS: dict[str, AutoencoderConfig] = {
    # TAESD's published layout (madebyollin/taesd, ~1.2M parameters per side): 64 channels, 4 latents, 8x down.
    "taesd": AutoencoderConfig(name="taesd", encoder_block_out_channels=(64, 64, 64, 64),
                               decoder_block_out_channels=(64, 64, 64, 64), num_encoder_blocks=(1, 3, 3, 3),
                               num_decoder_blocks=(3, 3, 3, 1)),
    # Narrow and shallow: trains on a 2-core CPU in minutes; the bundled checkpoints/ae-tiny.
    "taesd-tiny": AutoencoderConfig(),
}


def get_ae_config(name: str) -> AutoencoderConfig:
    if name not in AE_CONFIGS:
        raise ConfigError(f"unknown autoencoder config {name!r}; choose one of {', '.join(AE_CONFIGS)}")
    return AE_CONFIGS[name]


# ---------------------------------------------------------------------------------------------------
# The second model family: the chunk-causal video DiT on the Wan 2.1 layout (mirage.model.dit).

DIT_CODECS = ("", "taehv")  # DiTConfig.codec


@dataclass(frozen=True)
class DiTConfig:
    """A Wan 2.1 text-to-video transformer run chunk-causally: blocks of `block_frames` latent frames,
    each denoised in len(denoising_steps) flow-matching steps against a rolling KV cache.

    Layout fields carry the names of Wan's `WanModel` config (dim, ffn_dim, num_heads, num_layers,
    patch_size, in_dim/out_dim, text_dim, text_len, freq_dim, eps, qk_norm, cross_attn_norm), so a
    published checkpoint's config maps onto them one to one.

    The cache, as Self-Forcing and LongLive define it (their `local_attn_size`, `sink_size`): a block's
    queries see `window_frames` latent frames of keys/values, the block itself and the `sink_frames`
    first frames of the video included. Between blocks the cache therefore holds
    `window_frames - block_frames` past frames a block can see: the sink (kept) and the most recent
    others (rolling).
    """

    name: str = "dit-tiny"
    dim: int = 192  # transformer width
    ffn_dim: int = 512  # FFN hidden width (tanh-GELU)
    num_heads: int = 4  # dim / num_heads = head_dim, split 3 ways for 3-D RoPE (frame, height, width)
    num_layers: int = 4
    patch_size: tuple[int, ...] = (1, 2, 2)  # (frames, height, width) of one token, in latent pixels
    in_dim: int = 16  # latent channels in (Wan VAE: 16)
    out_dim: int = 16  # latent channels out (the velocity)
    text_dim: int = 64  # width of the text encoder's embeddings (UMT5-XXL: 4096)
    text_len: int = 16  # text tokens the model attends to; shorter prompts are zero-padded (Wan: 512)
    freq_dim: int = 64  # width of the sinusoidal timestep embedding
    eps: float = 1e-6  # LayerNorm / RMSNorm epsilon
    qk_norm: bool = True  # RMSNorm over q and k (across heads) in both attentions
    cross_attn_norm: bool = True  # an affine LayerNorm (norm3) before cross-attention
    rope_theta: float = 10000.0
    width: int = 128  # video pixels
    height: int = 128
    vae_stride: tuple[int, ...] = (4, 8, 8)  # (frames, height, width) per latent pixel of the video autoencoder
    block_frames: int = 2  # latent frames denoised together (Self-Forcing: num_frame_per_block)
    window_frames: int = 6  # frames a block's queries attend to, itself and the sink included (local_attn_size)
    sink_frames: int = 0  # first frames kept in the cache for good (LongLive's attention sink)
    # Sampling (Self-Forcing's configs/self_forcing_dmd.yaml): the step list, warped onto the shifted
    # timesteps, and the timestep the clean block is labelled with in the cache-write pass.
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_timestep: int = 0
    # A per-frame latent autoencoder (a Mirage autoencoder folder such as checkpoints/ae-taesd, with
    # vae_stride (1, s, s)) instead of Wan's temporal VAE: "" means the Wan VAE / TAEHV given by --decoder.
    autoencoder: str = ""
    autoencoder_sha256: str = ""  # of its weights, recorded by the trainer; a mismatch is refused
    latent_scale: float = 1.0  # latents the DiT sees = the autoencoder's latents x latent_scale
    # The runtime's temporal codec for Wan's latents: "taehv" adds TAEHV's encode / decode graphs (mirage-serve
    # --decoder taew2_1.pth sets it); "" none (the runtime then shows a latent preview). Not a training choice.
    codec: str = ""

    def __post_init__(self) -> None:
        _check_types(self)
        _check_ranges(self, {
            "name": (bool, "a non-empty name"),
            "dim": (_positive, "> 0"), "ffn_dim": (_positive, "> 0"), "num_heads": (_positive, ">= 1"),
            "num_layers": (_positive, ">= 1"), "in_dim": (_positive, "> 0"), "out_dim": (_positive, "> 0"),
            "text_dim": (_positive, "> 0"), "text_len": (_positive, ">= 1"),
            "freq_dim": (lambda v: v > 0 and v % 2 == 0, "a positive even number"),
            "eps": (_positive, "> 0"), "rope_theta": (_positive, "> 0"),
            "width": (_positive, "> 0"), "height": (_positive, "> 0"),
            "block_frames": (_positive, ">= 1"), "sink_frames": (lambda v: v >= 0, ">= 0"),
            "denoising_steps": (lambda s: len(s) > 0 and all(0 < v <= 1000 for v in s)
                                and list(s) == sorted(s, reverse=True), "a falling list of steps in (0, 1000]"),
            "timestep_shift": (_positive, "> 0"),
            "context_timestep": (lambda v: 0 <= v < 1000, "in [0, 999]"),
            "latent_scale": (_positive, "> 0"),
        })
        if self.autoencoder and self.vae_stride[0] != 1:
            raise ConfigError(f"autoencoder={self.autoencoder!r} codes frame by frame: vae_stride must be (1, h, w), "
                              f"not {self.vae_stride}")
        if self.codec not in DIT_CODECS:
            raise ConfigError(f"codec={self.codec!r}: choose one of {', '.join(map(repr, DIT_CODECS))}")
        if self.codec == "taehv" and (self.autoencoder or tuple(self.vae_stride) != taehv.STRIDE
                                      or self.in_dim != taehv.LATENT_CHANNELS):
            raise ConfigError(f"codec='taehv' codes Wan's latents: it needs vae_stride={taehv.STRIDE}, "
                              f"in_dim={taehv.LATENT_CHANNELS} and no autoencoder, not {self.vae_stride}, "
                              f"{self.in_dim}, {self.autoencoder!r}")
        for field in ("patch_size", "vae_stride"):
            if len(getattr(self, field)) != 3 or min(getattr(self, field)) < 1:
                raise ConfigError(f"{field}={getattr(self, field)} must be 3 positive integers (frames, height, width)")
        if self.patch_size[0] != 1:
            raise ConfigError(f"patch_size={self.patch_size}: the frame cache needs one latent frame per token (1, h, w)")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2 or self.dim // self.num_heads < 6:
            raise ConfigError(f"dim={self.dim} / num_heads={self.num_heads} must be an even head width >= 6 (3-D RoPE)")
        for side, pixels, axis in (("width", self.width, 2), ("height", self.height, 1)):
            step = self.vae_stride[axis] * self.patch_size[axis]
            if pixels % step:
                raise ConfigError(f"{side}={pixels} is not divisible by {step} (VAE stride {self.vae_stride[axis]} "
                                  f"x patch {self.patch_size[axis]}); choose a multiple of {step}")
        if self.window_frames < self.sink_frames + self.block_frames:
            raise ConfigError(f"window_frames={self.window_frames} is smaller than the sink ({self.sink_frames}) plus a "
                              f"block ({self.block_frames}) it must hold: choose >= {self.sink_frames + self.block_frames}")

    family = "dit"
    dynamic_batch = False  # its graphs have one static batch (mirage-export --batch)

    def graphs(self, batch: int, max_batch: int | None, precision: str) -> dict:
        """Its exported graphs' specs: text, block step, cache write (see mirage.core.graphs.dit_graphs)."""
        return dit_graphs(self, batch, max_batch, precision)

    def unit(self, specs: dict, options: "PipelineOptions"):
        """Its unit of work in the runtime: one block per row (mirage.core.dit_step.BlockUnit); its steps are
        the config's own (`denoising_steps`), so options.steps does not apply."""
        from mirage.core.dit_step import BlockUnit

        return BlockUnit(self, specs, options.strength, options.max_strength, options.cache_from)

    # --- shapes ----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim channels rotated by (frame, height, width) position, as Wan splits them:
        height and width get 2·(head_dim // 6) each, the frame the rest (128 -> 44, 42, 42)."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of a latent frame: 832x480 video -> 60x104 latents."""
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    @property
    def token_grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // self.patch_size[1], w // self.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        """Tokens of one latent frame (wan-1.3b at 832x480: 30 x 52 = 1560)."""
        gh, gw = self.token_grid
        return gh * gw

    @property
    def cache_frames(self) -> int:
        """Past frames the cache holds between blocks: the sink plus the rolling part."""
        return self.window_frames - self.block_frames

    @property
    def restores(self) -> bool:
        """Its video-to-video restyles the frames as they come (ModelConfig.restores: the U-Net's takes degraded
        ones)."""
        return False

    @property
    def steps(self) -> int:
        return len(self.denoising_steps)

    def video_frames(self, latent_frames: int, first: bool) -> int:
        """Video frames decoded from `latent_frames`: vae_stride[0] per latent frame, except the video's
        first latent frame, which is a single video frame (Wan VAE: 21 latent frames are an 81-frame clip;
        a per-frame autoencoder: one each)."""
        per_latent = self.vae_stride[0]
        return per_latent * latent_frames - (per_latent - 1 if first else 0)

    # --- accounting (nanoGPT style: parameters, FLOPs from the layer shapes) ---------------------
    def param_count(self) -> int:
        """Parameters of mirage.model.dit.WanDiT (= Wan's WanModel for a t2v layout)."""
        d, linear = self.dim, (lambda i, o: i * o + o)
        patch = self.in_dim * d * self.patch_size[0] * self.patch_size[1] * self.patch_size[2] + d
        embed = linear(self.text_dim, d) + linear(d, d) + linear(self.freq_dim, d) + linear(d, d) + linear(d, 6 * d)
        attn = 4 * linear(d, d) + (2 * d if self.qk_norm else 0)
        layer = 2 * attn + (2 * d if self.cross_attn_norm else 0) + linear(d, self.ffn_dim) + linear(self.ffn_dim, d) + 6 * d
        head = linear(d, self.out_dim * self.patch_size[1] * self.patch_size[2]) + 2 * d
        return patch + embed + self.num_layers * layer + head

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        return self.param_count() * bytes_per_param

    def pass_flops(self, query_frames: int, past_frames: int, text_kv: bool = False) -> int:
        """FLOPs of one forward over `query_frames` latent frames whose self-attention also sees
        `past_frames` cached frames: every matmul (2 FLOPs per multiply-add) plus attention counted as
        4·Lq·Lk·dim per layer for QKᵀ and PV over all keys it reads (no causal discount, softmax,
        norms and elementwise work not counted). The cross-attention keys/values of the text are
        computed once per prompt, so they count only with `text_kv`."""
        d, layers = self.dim, self.num_layers
        lq = query_frames * self.tokens_per_frame
        per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * self.ffn_dim)  # self q,k,v,o; cross q,o; FFN
        body = layers * lq * per_token + self.attention_flops(query_frames, past_frames)
        patch_io = 2 * lq * (self.in_dim + self.out_dim) * d * self.patch_size[1] * self.patch_size[2]
        time_mlp = 2 * query_frames * (self.freq_dim * d + d * d + 6 * d * d)
        text = (2 * self.text_len * (self.text_dim * d + d * d) + layers * 2 * 2 * self.text_len * d * d) if text_kv else 0
        return body + patch_io + time_mlp + text

    def attention_flops(self, query_frames: int, past_frames: int) -> int:
        """The attention part of `pass_flops`: QKᵀ and PV of self-attention over the block and the
        cached frames, and of cross-attention over the text, in every layer."""
        lq = query_frames * self.tokens_per_frame
        lk = (query_frames + past_frames) * self.tokens_per_frame
        return self.num_layers * 4 * lq * self.dim * (lk + self.text_len)

    def block_flops(self, past_frames: int) -> int:
        """FLOPs of one block: `steps` denoising passes plus the cache-write pass, each over
        block_frames queries seeing `past_frames` cached frames."""
        return (self.steps + 1) * self.pass_flops(self.block_frames, past_frames)

    def past_frames(self, block_index: int) -> int:
        """Cached frames block `block_index` (0-based) sees: all before it until the cache is full."""
        return min(block_index * self.block_frames, self.cache_frames)


DIT_CONFIGS: dict[str, DiTConfig] = {
    # Tests and CPU training: ~2.5M parameters, 16x16 latent frames (128x128 video), 64 tokens per frame.
    "dit-tiny": DiTConfig(),
    # Wan2.1-T2V-1.3B (its config.json / Self-Forcing's wan/configs/wan_t2v_1_3B.py) at 832x480, run as
    # Self-Forcing runs it (configs/self_forcing_dmd.yaml): blocks of 3 latent frames, 4 warped steps at
    # shift 5, clean context (context_noise 0), a 21-frame window without sink (its 81-frame clip).
    "wan-1.3b": DiTConfig(name="wan-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096,
                          text_len=512, freq_dim=256, width=832, height=480, block_frames=3, window_frames=21,
                          sink_frames=0),
}
# Trained here (mirage.train.dit, checkpoints/dit-tiny-taesd): ~1M parameters like the U-Net tiny-128, on
# 16x16x4 latents of the per-frame checkpoints/ae-taesd (128x128 video, one latent frame per video frame),
# 4x4 patches (16 tokens a frame: what trains in minutes on a shared 2-core CPU), blocks of 2 frames in an
# 8-frame window. Plain flow matching (not distilled): 4 unwarped, unshifted steps at sigma 1, 0.75, 0.5,
# 0.25 (the Self-Forcing steps are a distilled model's).
DIT_CONFIGS["dit-tiny-taesd"] = DiTConfig(name="dit-tiny-taesd", dim=128, ffn_dim=384, patch_size=(1, 4, 4), in_dim=4,
                                          out_dim=4, vae_stride=(1, 8, 8), window_frames=8, warp_denoising_step=False,
                                          timestep_shift=1.0, autoencoder="checkpoints/ae-taesd", latent_scale=1.25)
# LongLive (NVlabs/LongLive configs/longlive_inference.yaml: local_attn_size 12, sink_size 3): the same
# model with an attention sink of 3 frames and a 12-frame window, for long videos and prompt switches.
DIT_CONFIGS["wan-1.3b-longlive"] = dataclasses.replace(DIT_CONFIGS["wan-1.3b"], name="wan-1.3b-longlive",
                                                       window_frames=12, sink_frames=3)


# config class per model family (manifests record the family; older ones are all U-Nets)
CONFIG_FAMILIES = {ModelConfig.family: ModelConfig, DiTConfig.family: DiTConfig}


def get_dit_config(name: str) -> DiTConfig:
    if name not in DIT_CONFIGS:
        raise ConfigError(f"unknown DiT config {name!r}; choose one of {', '.join(DIT_CONFIGS)}")
    return DIT_CONFIGS[name]
