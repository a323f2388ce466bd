"""One spec per exported graph: names, shapes, dtypes, the dynamic batch axis and TensorRT's
profile, derived from the model config. The exporter, the engine builder, the manifest checks
and the runtime's buffers all read these specs; nothing else writes a shape table.

Two graphs make a frame: `denoise` runs once per DDIM step, `context_encode` once per frame.
A latent model adds the autoencoder's two halves: `decode` once per frame, and for
video-to-video `encode` of the input frame.

    denoise(x_t, t, [cond], memory, ages) -> v          (B, C, H, W) ... -> (B, C, H, W)
    context_encode(frame, t_ctx) -> kv                  (B, C, H, W), (B,) -> (B, 2, N, D)
    encode(image) -> z                                  (B, 3, S, S) -> (B, C, H, W), S = H * downscale
    decode(z) -> image                                  (B, C, H, W) -> (B, 3, S, S)
"""
from __future__ import annotations

from dataclasses import dataclass

from mirage.core import taehv_layout as taehv

DENOISE = "denoise"
CONTEXT = "context_encode"
ENCODE = "encode"
DECODE = "decode"
GRAPHS = (DENOISE, CONTEXT)  # every U-Net's; unet_graphs adds the autoencoder's

X_T, T, COND, MEMORY, AGES, V = "x_t", "t", "cond", "memory", "ages", "v"
FRAME, T_CTX, KV = "frame", "t_ctx", "kv"
IMAGE, Z = "image", "z"
RGB = 3

# Files of an artifact folder (mirage-export).
MANIFEST = "manifest.json"
TIMING_CACHE = "timing.cache"


def onnx_file(graph: str) -> str:
    return f"{graph}.onnx"


def engine_file(graph: str) -> str:
    return f"{graph}.engine"


def layers_file(graph: str) -> str:
    return f"{graph}.layers.json"


def runtime_cache_file(graph: str) -> str:
    """TensorRT-RTX's JIT kernel cache for one engine, kept beside it and reused on the next load."""
    return f"{graph}.runtime.cache"


# The temporal-attention TensorRT plugin (plugins_cpp/): the custom ONNX node's op_type, and
# the plugin_version / plugin_namespace attributes the TensorRT ONNX parser matches it by.
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "MirageTemporalAttention", "1", "mirage"

# Graph precisions. Float tensors of an fp16 graph are float16; the 8-bit Q/DQ graphs and the bf16 graphs
# (the DiT's; numpy has no bfloat16, see export/bf16.py) keep fp32 I/O.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# ONNX's element-type names (TensorProto) <-> the numpy names the specs use
ONNX_DTYPES = {"float": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # batch first, at the spec's batch
    dtype: str  # numpy name: float32 | float16 | int32


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int | None = None  # None: static batch; else dim 0 of every tensor is dynamic in [1, max_batch]

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.inputs)

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    def tensor(self, name: str) -> TensorSpec:
        for x in self.tensors:
            if x.name == name:
                return x
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def io(self) -> tuple[list[dict], list[dict]]:
        """(inputs, outputs) as the manifest records them: a dynamic batch dim is -1."""
        def desc(xs):
            return [{"name": x.name, "dtype": x.dtype,
                     "shape": [-1 if (i == 0 and self.max_batch) else d for i, d in enumerate(x.shape)]} for x in xs]
        return desc(self.inputs), desc(self.outputs)

    def profile(self) -> dict[str, tuple[tuple[int, ...], ...]] | None:
        """TensorRT optimization profile (min, opt, max) per input, or None for static shapes."""
        if not self.max_batch:
            return None
        return {x.name: tuple((b,) + x.shape[1:] for b in (1, x.shape[0], self.max_batch)) for x in self.inputs}


def model_graphs(cfg, batch: int = 1, max_batch: int | None = None, precision: str = "fp32") -> dict[str, GraphSpec]:
    """The specs of a model's graphs, whatever its family: `cfg.graphs` (ModelConfig -> `unet_graphs`,
    DiTConfig -> `dit_graphs`). `batch` is the batch the buffers are allocated at (TensorRT's optimum
    when the batch is dynamic)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_batch is not None and not 1 <= batch <= max_batch:
        raise ValueError(f"batch {batch} must lie in [1, max_batch={max_batch}]")
    return cfg.graphs(batch, max_batch, precision)


def _float(precision: str) -> str:
    return "float16" if precision == "fp16" else "float32"


def unet_graphs(cfg, batch: int, max_batch: int | None, precision: str) -> dict[str, GraphSpec]:
    """The U-Net's graphs (`cfg` a mirage.core.config.ModelConfig): denoise, context_encode, the autoencoder's."""
    f = _float(precision)
    img = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    memory = TensorSpec(MEMORY, (batch, cfg.context_frames, 2, cfg.memory_tokens, cfg.temporal_dim), f)
    denoise_in = [TensorSpec(X_T, img, f), TensorSpec(T, (batch,), "float32")]
    if cfg.cond_channels:
        denoise_in.append(TensorSpec(COND, (batch, cfg.cond_channels, cfg.image_size, cfg.image_size), f))
    denoise_in += [memory, TensorSpec(AGES, (batch, cfg.context_frames), "int32")]
    dyn = max_batch if max_batch and max_batch > 1 else None
    specs = {
        DENOISE: GraphSpec(DENOISE, tuple(denoise_in), (TensorSpec(V, img, f),), dyn),
        CONTEXT: GraphSpec(CONTEXT, (TensorSpec(FRAME, img, f), TensorSpec(T_CTX, (batch,), "float32")),
                           (TensorSpec(KV, (batch, 2, cfg.memory_tokens, cfg.temporal_dim), f),), dyn),
    }
    if cfg.frame_size:
        specs.update(codec_graphs((batch, RGB, cfg.frame_size, cfg.frame_size), img, f, dyn, bool(cfg.cond_channels)))
    return specs


def codec_graphs(image: tuple[int, ...], z: tuple[int, ...], f: str, dyn: int | None,
                 encode: bool) -> dict[str, GraphSpec]:
    """A latent model's autoencoder halves: `decode` (z -> image) and, for video-to-video, `encode` (image -> z),
    at the family's shapes (the U-Net's frame; the DiT's block: frames (B·N, 3, H, W), latents (B, C, N, h, w))."""
    rgb, latents = TensorSpec(IMAGE, image, f), TensorSpec(Z, z, f)
    specs = {ENCODE: GraphSpec(ENCODE, (rgb,), (latents,), dyn)} if encode else {}
    specs[DECODE] = GraphSpec(DECODE, (latents,), (rgb,), dyn)
    return specs


# --- the chunk-causal video DiT (mirage.core.config.DiTConfig) ---------------------------------
#
# Three graphs, all pure (the rolling KV cache comes in as inputs and the new keys/values go out as
# outputs; the runtime writes them into its cache, so nothing in a graph has state):
#
#   dit_text(text) -> text_k, text_v                            once per prompt
#   dit_step(x_t, t_emb, text_k, text_v, cache_k, cache_v,     S times per block: the velocity
#            rope_cos, rope_sin, slots, valid) -> v, new_k, new_v
#   dit_cache_write(<the same inputs, x_t = the clean block>) -> new_k, new_v
#                                                               once per block: the keys/values kept
#   encode(image) -> z, decode(z) -> image                      a config with a per-frame autoencoder
#                                                               (DiTConfig.autoencoder): the U-Net's codec
#                                                               graphs at a block's shapes (codec_graphs)
#   decode(z, fresh, mem_*) -> image, mem_*_next                a config with TAEHV (DiTConfig.codec "taehv"):
#   encode(image, fresh, carry, mem_*) -> z, carry_next, mem_*_next   a temporal codec with explicit state
#                                                               (taehv_graphs below)
#
# One fixed-shape spec per graph serves every cache fill level: the cache inputs always hold the whole
# window (window_frames · tokens_per_frame rows per layer), `valid` says which rows hold a frame the
# block may see (1) and which are empty (0), and inside the graph the block's own keys/values replace
# rows `slots` before its queries attend over the valid rows. While the cache fills, the rows past the
# held frames are masked instead of cut off (BlockStepper cuts them, one graph per span): the same
# softmax, one engine. Everything is batch-first, so each row of a batch can be its own stream at its
# own frame position (its own slots, validity, RoPE angles). The timestep embedding and the RoPE
# angles come in precomputed (float64 math, done by mirage.core.dit_step), because TensorRT has no
# float64; both stay float32 in an fp16 graph, as the model computes them.
#
# Shapes (B batch, L layers, H heads, D head_dim, N block frames, T tokens per frame, W window frames,
# S text tokens): x_t, v (B, in_dim, N, h, w); t_emb (B, N, freq_dim); text (B, S, text_dim);
# text_k/v (B, L, H, S, D); cache_k/v (B, L, H, W·T, D); new_k/v (B, L, H, N·T, D);
# rope_cos/sin (B, N·T, D / 2); slots (B, N·T) int32 cache rows; valid (B, W·T) float32 0/1;
# image (B·N, 3, H, W) the block's video frames, row-major; z (B, in_dim, N, h, w) as x_t.

DIT_TEXT, DIT_STEP, DIT_CACHE_WRITE = "dit_text", "dit_step", "dit_cache_write"
DIT_GRAPHS = (DIT_TEXT, DIT_STEP, DIT_CACHE_WRITE)
TEXT, TEXT_K, TEXT_V, T_EMB = "text", "text_k", "text_v", "t_emb"
CACHE_K, CACHE_V, NEW_K, NEW_V = "cache_k", "cache_v", "new_k", "new_v"
ROPE_COS, ROPE_SIN, SLOTS, VALID = "rope_cos", "rope_sin", "slots", "valid"
# the graphs a manifest of each family must hold (engine.manifest checks them)
FAMILY_GRAPHS = {"unet": GRAPHS, "dit": DIT_GRAPHS}


def dit_graphs(cfg, batch: int, max_batch: int | None, precision: str) -> dict[str, GraphSpec]:
    """The DiT's graphs (`cfg` a mirage.core.config.DiTConfig), at fixed shapes (see above)."""
    f = _float(precision)
    b, heads, d, block = batch, cfg.num_heads, cfg.head_dim, cfg.block_frames * cfg.tokens_per_frame
    per_layer = (b, cfg.num_layers, heads)
    text_kv = (TensorSpec(TEXT_K, per_layer + (cfg.text_len, d), f),
               TensorSpec(TEXT_V, per_layer + (cfg.text_len, d), f))
    new_kv = (TensorSpec(NEW_K, per_layer + (block, d), f), TensorSpec(NEW_V, per_layer + (block, d), f))
    window = cfg.window_frames * cfg.tokens_per_frame
    latents = TensorSpec(X_T, (b, cfg.in_dim, cfg.block_frames) + cfg.latent_size, f)
    step_in = (latents, TensorSpec(T_EMB, (b, cfg.block_frames, cfg.freq_dim), "float32"), *text_kv,
               TensorSpec(CACHE_K, per_layer + (window, d), f), TensorSpec(CACHE_V, per_layer + (window, d), f),
               TensorSpec(ROPE_COS, (b, block, d // 2), "float32"), TensorSpec(ROPE_SIN, (b, block, d // 2), "float32"),
               TensorSpec(SLOTS, (b, block), "int32"), TensorSpec(VALID, (b, window), "float32"))
    dyn = max_batch if max_batch and max_batch > 1 else None
    specs = {
        DIT_TEXT: GraphSpec(DIT_TEXT, (TensorSpec(TEXT, (b, cfg.text_len, cfg.text_dim), f),), text_kv, dyn),
        DIT_STEP: GraphSpec(DIT_STEP, step_in, (TensorSpec(V, latents.shape, f),) + new_kv, dyn),
        DIT_CACHE_WRITE: GraphSpec(DIT_CACHE_WRITE, step_in, new_kv, dyn),
    }
    if cfg.autoencoder:  # a per-frame autoencoder: the block's frames decoded, input blocks encoded (video-to-video)
        frames = (b * cfg.block_frames, RGB, cfg.height, cfg.width)
        specs.update(codec_graphs(frames, latents.shape, f, dyn, encode=True))
    if cfg.codec == "taehv":
        specs.update(taehv_graphs(cfg, b, f, dyn))
    return specs


# --- TAEHV as the DiT's temporal codec (DiTConfig.codec "taehv"; layout: mirage.core.taehv_layout) -------------
#
# Both halves are pure: each MemBlock's memory (the last frame of its input, (B, C_l, h_l, w_l)) comes in as
# `mem_<i>` and its new value goes out as `mem_<i>_next`; the runtime keeps it per row and copies the new value in
# only for the rows that advance. `fresh` (B,) float32 is 1 for a row at its video's first block: its memory is
# taken as zeros (Taehv.reset). Every block is 4N video frames <-> N latent frames, one row per stream:
#
#   decode(z (B, 16, N, h, w), fresh, mem_*) -> image (B·4N, 3, H, W), mem_*_next
#       untrimmed: a row's first block starts with TAEHV's 3 warm-up frames (the torch path drops them)
#   encode(image (B·4N, 3, H, W), fresh, carry (B, 3, 3, H, W), mem_*) -> z (B, 16, N, h, w), carry_next, mem_*_next
#       the codec sees the video with its first frame repeated 3 times in front (Taehv.encode): a block's codec
#       input is the 3 frames carried from the block before, then its first 4N - 3 new ones; its last 3 are the
#       next carry (a fresh row's carry: its first frame x3). So the runtime's stream is the torch path's
#       (DiTPipeline.restyle) with the 3 warm-up frames in front: 3 frames of latency.

FRESH, CARRY = "fresh", "carry"


def next_state(name: str) -> str:
    """The output that carries state input `name`'s new value (mem_0 -> mem_0_next)."""
    return f"{name}_next"


def state_inputs(spec: GraphSpec) -> tuple[str, ...]:
    """The state a codec graph keeps between blocks: its inputs that come back as outputs (none for a per-frame
    codec)."""
    outputs = {x.name for x in spec.outputs}
    return tuple(x.name for x in spec.inputs if next_state(x.name) in outputs)


def taehv_graphs(cfg, batch: int, f: str, dyn: int | None) -> dict[str, GraphSpec]:
    """TAEHV's encode / decode at a DiT block's shapes, their state explicit (see above)."""
    frames, n = cfg.vae_stride[0] * cfg.block_frames, cfg.block_frames
    image = TensorSpec(IMAGE, (batch * frames, RGB, cfg.height, cfg.width), f)
    z = TensorSpec(Z, (batch, cfg.in_dim, n) + cfg.latent_size, f)
    fresh = TensorSpec(FRESH, (batch,), "float32")

    def state(names_shapes):
        ins = tuple(TensorSpec(name, (batch, *shape), f) for name, shape in names_shapes)
        return ins, tuple(TensorSpec(next_state(x.name), x.shape, f) for x in ins)

    dec_in, dec_out = state((f"mem_{i}", s) for i, s in enumerate(taehv.decoder_memory(*cfg.latent_size)))
    carry = [(CARRY, (taehv.WARM_UP_FRAMES, RGB, cfg.height, cfg.width))]
    enc_in, enc_out = state(carry + [(f"mem_{i}", s) for i, s in enumerate(taehv.encoder_memory(cfg.height,
                                                                                                 cfg.width))])
    return {ENCODE: GraphSpec(ENCODE, (image, fresh, *enc_in), (z, *enc_out), dyn),
            DECODE: GraphSpec(DECODE, (z, fresh, *dec_in), (image, *dec_out), dyn)}
