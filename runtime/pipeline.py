"""The embeddable runtime: a Mirage model as a frame source with a plain lifecycle.

    load -> allocate -> warm up + capture -> replay ... -> close

    from mirage.runtime import Pipeline
    with Pipeline.load("artifacts/tiny") as pipe:      # an artifact folder (mirage-export)
        pipe.reset(seed=0)
        frames = [pipe.step() for _ in range(48)]      # (H, W, 3) float32 in [-1, 1]

Frames are (H, W, 3) float32 in [-1, 1], or uint8 0..255 with PipelineOptions(frames="uint8")
(mirage.core.video_io.to_uint8's mapping, made inside the frame's CUDA graph so only bytes cross
PCIe); input frames may be either in both modes.

One step is the model family's unit of work (`cfg.unit`: the U-Net's frame, core.loop.FrameUnit; the
video DiT's block of N latent frames, core.dit_step.BlockUnit), which makes `frames_per_step` frames
per row: a step of a block model returns (n, H, W, 3) per row where a frame model returns (H, W, 3).
A model that takes a prompt (the DiT) gets its embeddings with `set_prompt`, or text through `control`
with the `prompt_encoder` it was opened with (mirage.bridge passes a local UMT5 encoder).

A pipeline of batch B advances B independent rows (streams) per frame; `step_batch` takes and
returns (B, H, W, 3), and `reset_row` restarts one row without touching the others (what
runtime.pool.StreamPool builds on). Buffers are allocated once from the graphs' specs
(mirage.core.graphs); frames run through runtime.execution (eager on the CPU, CUDA graphs on a GPU).

The runtime imports no torch layer: a checkpoint or an in-memory model runs on the PyTorch backend
through mirage.bridge.pipeline (load_pipeline, from_model), which hands its backend and array
plumbing to this class.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from mirage.core import graphs as G
from mirage.core.config import PIPELINE_BACKENDS as BACKENDS, ModelConfig, PipelineOptions
from mirage.core.device import require_memory
from mirage.core.errors import MirageError
from mirage.core.schedule import default_steps
from mirage.runtime.execution import CpuExecution, GpuExecution

class PipelineError(MirageError):
    """Misuse of the pipeline (wrong state, wrong input); the message says what to do."""


class Pipeline:
    def __init__(self, backend, cfg: ModelConfig, specs: dict[str, G.GraphSpec], options: PipelineOptions,
                 plumbing=None, prompt_encoder: Callable[[str], np.ndarray] | None = None):
        """`plumbing`: the arrays, ops (and on a GPU streams, events, graphs) of the backend's device;
        None for ONNX Runtime (numpy) and TensorRT (raw device pointers, cuda-python), which the runtime
        brings itself; the PyTorch backend's come from the torch side (model/torch_device.py).
        `prompt_encoder`: prompt text -> embeddings (L, text_dim), for `control(row, prompt=...)`."""
        self.backend, self.cfg, self.specs, self.options = backend, cfg, specs, options
        self.unit = cfg.unit(specs, options)  # the family's unit of work: all that differs between families
        self.schedule = self.unit.schedule
        self.prompt_encoder = prompt_encoder
        h, w, _ = self.unit.frame_shape
        # before anything is allocated; the weights are loaded by now, so what is free excludes them
        require_memory(self.unit.buffer_bytes(), str(backend.device),
                       f"{cfg.name} ({w}x{h} frames) at batch {options.batch}")
        on_gpu = str(backend.device).startswith("cuda")
        self.execution = GpuExecution(backend, self.unit, options.cuda_graph, options.frames, plumbing) if on_gpu \
            else CpuExecution(backend, self.unit, options.frames, plumbing)
        self.buf = None
        # a prompt model's rows' embeddings (B, text_len, text_dim), zero (the empty prompt) until set_prompt,
        # and the one a reset row starts with (what set_prompt last gave every row); None: no prompt
        takes_prompt = "prompt" in self.unit.controls
        self._text = np.zeros((options.batch, *self.unit.text_shape), np.float32) if takes_prompt else None
        self._default_text = self._text[0].copy() if takes_prompt else None
        self.state = "loaded"

    # -- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "auto",
             options: PipelineOptions = PipelineOptions(),
             checkpoint: Callable[[Path, str, str, PipelineOptions], "Pipeline"] | None = None,
             prompt_encoder: Callable[[str], np.ndarray] | None = None) -> "Pipeline":
        """Open an artifact directory (ONNX / engines + manifest). A checkpoint folder is opened by
        `checkpoint(path, backend, device, options)`, the torch side's opener that
        mirage.bridge.pipeline.load_pipeline passes; without it a checkpoint is refused."""
        path = Path(path)
        if backend not in BACKENDS:
            raise PipelineError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if (path / G.MANIFEST).is_file():
            from mirage.runtime.artifact import open_artifact

            impl, cfg, specs, manifest = open_artifact(path, backend, device, options)
            return cls(impl, cfg, specs, model_steps(options, manifest), prompt_encoder=prompt_encoder)
        if (path / "config.json").is_file():
            if backend not in ("auto", "torch"):
                raise PipelineError(f"{path} is a checkpoint: only the torch backend runs it; "
                                    f"export it with `mirage-export --checkpoint {path}` for {backend}")
            if checkpoint is None:
                raise PipelineError(f"{path} is a checkpoint: the torch-free runtime runs artifacts; open it with "
                                    f"mirage.bridge.pipeline.load_pipeline (PyTorch), or export it with "
                                    f"`mirage-export --checkpoint {path}`")
            return checkpoint(path, backend, device, options)
        if any(path.glob("*.onnx")):
            raise PipelineError(f"{path}: ONNX graphs without a manifest.json (an incomplete artifact); rebuild it "
                                f"with `mirage-export --checkpoint CHECKPOINT --out {path}`")
        raise PipelineError(f"{path}: neither an artifact (manifest.json) nor a checkpoint (config.json)")

    # -- properties ----------------------------------------------------------------------------
    @property
    def video_to_video(self) -> bool:
        return self.frames_in > 0

    @property
    def frames_in(self) -> int:
        """Input frames one step takes per row: 0 for generation, 1 for the U-Net's video-to-video, the block's
        frames for the DiT's (PipelineOptions.strength)."""
        return self.unit.frames_in

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row's input of a step: a frame (H, W, 3), or the (n, H, W, 3) frames of a block model's step."""
        return self.frame_shape if self.frames_in <= 1 else (self.frames_in, *self.frame_shape)

    @property
    def frames_per_step(self) -> int:
        """Frames one step makes per row: 1 for the U-Net, the block's latent frames for the DiT."""
        return self.unit.frames

    @property
    def video_rate(self) -> float:
        """Frames per second the output is meant to play at (a server paces a block's frames out by it)."""
        return self.unit.video_rate

    @property
    def steps(self) -> int:
        """Denoising steps per unit."""
        return self.unit.steps

    @property
    def controls(self) -> dict:
        """What `control` accepts now: {"prompt": True} for a prompt model opened with a prompt encoder, and
        "strength": (low, high) for a video-to-video DiT; {} for the U-Net."""
        return {k: v for k, v in self.unit.controls.items() if k != "prompt" or self.prompt_encoder is not None}

    @property
    def batch(self) -> int:
        return self.options.batch

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.unit.frame_shape

    @property
    def depth(self) -> int:
        """Frames that may be in flight (submitted, not collected): two on a GPU, where frame n+1's
        input uploads while frame n computes and downloads; one on the CPU, where submit computes."""
        return 2 if isinstance(self.execution, GpuExecution) else 1

    @property
    def graphs(self) -> list:
        """The captured CUDA graphs ([] when frames run eagerly)."""
        return self.execution.graphs if self.state == "ready" else []

    # -- allocate, warm up, capture -------------------------------------------------------------
    def allocate(self) -> None:
        self._require("loaded", "allocate")
        ex = self.execution
        self.buf = self.unit.make_buffers(ex.alloc, ex.ops.fill_, self.backend.buffer_dtype)
        self.state = "allocated"

    def warm_up_and_capture(self) -> None:
        self._require("allocated", "warm up")
        self.execution.prepare(self.buf)
        self.state = "ready"
        if self._text is not None:
            self._apply_text()

    # -- replay -------------------------------------------------------------------------------
    def reset(self, seed: int = 0) -> None:
        """Empty the context memory of every row and reseed its noise (row b gets seed + b): the
        next frame starts a new video. Allocates, warms up and captures on first use. On a GPU this
        returns once the reset is enqueued on the compute stream, before it has run there: the
        next frame is queued behind it, and every host read here (collect, close) waits for the GPU
        first; code that reads the device buffers itself must synchronize before it does."""
        if self.state == "closed":
            raise PipelineError("pipeline is closed; load a new one")
        if self.state == "loaded":
            self.allocate()
        if self.state == "allocated":
            self.warm_up_and_capture()
        self._drain()
        self.execution.reset_rows(range(self.batch), [seed + b for b in range(self.batch)])
        self._default_prompt(range(self.batch))
        self.execution.timeline.clear()

    def reset_row(self, row: int, seed: int) -> None:
        """Restart row `row` alone (a new stream in that slot); the other rows carry on. Frames already
        submitted finish with the old row, the next submitted starts the new one (on a GPU the reset is
        enqueued between them, without waiting for the frames in flight, and has not run when this
        returns: see reset)."""
        self._require("ready", "reset a row")
        self._check_row(row)
        self.execution.reset_rows([row], [seed])
        self._default_prompt([row])

    def _default_prompt(self, rows) -> None:
        """A new video in `rows` starts with the default prompt (set_prompt's for every row), not the last
        one control gave the row."""
        changed = [r for r in rows if self._text is not None and not np.array_equal(self._text[r], self._default_text)]
        if changed:
            self._text[changed] = self._default_text
            self._apply_text()

    # -- conditioning ---------------------------------------------------------------------------
    def set_prompt(self, embeds: np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Prompt embeddings (L, text_dim), L <= the model's text_len (zero-padded as the model pads), for
        `rows` (default: every row, and the prompt a reset row starts with) from their next step on. A row
        that holds frames has them re-cached under the new prompt (LongLive's switch: their keys/values
        recomputed from their latents, block by block), so its stream goes on without a restart."""
        if "prompt" not in self.unit.controls:
            raise PipelineError(f"{self.cfg.name} takes no prompt")
        length, width = self.unit.text_shape
        embeds = np.asarray(embeds, np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != width or not 1 <= embeds.shape[0] <= length:
            raise PipelineError(f"prompt embeddings of shape {embeds.shape}; {self.cfg.name} takes (L, {width}) "
                                f"with 1 <= L <= {length}")
        if not np.isfinite(embeds).all():
            raise PipelineError("prompt embeddings hold NaN or infinite values")
        padded = np.zeros((length, width), np.float32)
        padded[:len(embeds)] = embeds
        for row in range(self.batch) if rows is None else rows:
            self._check_row(row)
            self._text[row] = padded
        if rows is None:
            self._default_text = padded
        if self.state == "ready":
            self._apply_text()
            for row in range(self.batch) if rows is None else rows:
                if self.unit.held(row):
                    self._recache(row)

    def control(self, row: int, prompt: str | None = None, strength: float | None = None) -> None:
        """Change row `row`'s conditioning between steps, the stream going on: its prompt (encoded by the
        pipeline's prompt encoder), or how far its input is noised (video-to-video DiT). Refused, with the
        other rows untouched, for what the model does not take (`controls`)."""
        self._check_row(row)
        if strength is not None and "strength" not in self.controls:
            raise PipelineError(f"{self.cfg.name} takes no strength (only a video-to-video DiT does)")
        if strength is not None:  # the row's next block on: its strength is staged with the block
            self.unit.set_strength(row, strength)
        if prompt is not None:
            if "prompt" not in self.unit.controls:
                raise PipelineError(f"{self.cfg.name} takes no prompt")
            if self.prompt_encoder is None:
                raise PipelineError("no text encoder was given, so a prompt cannot be encoded (give a text encoder "
                                    "folder, or prompt embeddings)")
            self.set_prompt(self.prompt_encoder(prompt), [row])

    def conditioning(self, row: int) -> dict:
        """Row `row`'s current values of what `control` sets, as it takes them: {"strength": s} for a
        video-to-video DiT (a new row starts at PipelineOptions.strength), {} otherwise (a prompt is kept only
        as its embeddings)."""
        self._check_row(row)
        return {"strength": float(self.unit.strengths[row])} if "strength" in self.controls else {}

    def _recache(self, row: int) -> None:
        buf, ex = self.buf, self.execution
        for feeds, advance in self.unit.recache_inputs(row):
            ex.between_units(lambda: self.unit.recache(self.backend, ex.ops, buf),
                             [(buf.host[k], v) for k, v in feeds.items()] + [(buf.advance, advance)])

    def _apply_text(self) -> None:
        """Every row's embeddings onto the device and through the text graph, between steps."""
        self.execution.between_units(lambda: self.unit.encode_text(self.backend, self.buf),
                                     [(self.buf.text, self._text)])

    def submit_batch(self, cond: np.ndarray | None = None, advance: np.ndarray | None = None) -> None:
        """Start a frame for every row (GPU: asynchronously). `cond`: (B, H, W, 3) input frames for
        video-to-video models ((B, n, H, W, 3): a block model's; float in [-1, 1] or uint8 0..255; with uint8
        frames a float input is rounded to bytes first, video_io.to_uint8), None for generation. `advance` (B,) of 0/1, default all
        1: a row with 0 is computed but commits nothing (its memory, ages and noise stay), so its
        stream is held this frame."""
        self._require("ready", "step")
        if self.execution.pending >= 2:
            raise PipelineError("two frames are in flight: collect() one before submitting another")
        if self.video_to_video != (cond is not None):
            raise PipelineError("this video-to-video model needs an input frame" if self.video_to_video
                                else "this generation model takes no input frame")
        expected = (self.batch, *self.input_shape)
        if cond is not None and tuple(cond.shape) != expected:
            raise PipelineError(f"input frames have shape {tuple(cond.shape)}, the model takes {expected[1:]} "
                                f"per row; resize them (mirage.core.video_io.fit_frame)")
        rows = np.ones(self.batch, np.int64) if advance is None else np.asarray(advance, np.int64)
        if rows.shape != (self.batch,) or not np.isin(rows, (0, 1)).all():
            raise PipelineError(f"advance must be {self.batch} flags of 0 or 1")
        self.execution.submit(None if cond is None else np.asarray(cond).reshape(-1, *self.frame_shape), rows)

    def collect_batch(self) -> np.ndarray:
        """Wait for the oldest submitted step: (B, H, W, 3) float32, or uint8 (PipelineOptions.frames); a
        model that makes n > 1 frames per step (frames_per_step): (B, n, H, W, 3)."""
        if self.execution.pending == 0:
            raise PipelineError("collect() without a submitted frame")
        frames = self.execution.collect()  # (B·n, H, W, 3)
        n = self.frames_per_step
        return frames if n == 1 else frames.reshape(self.batch, n, *frames.shape[1:])

    def step_batch(self, cond: np.ndarray | None = None, advance: np.ndarray | None = None) -> np.ndarray:
        self.submit_batch(cond, advance)
        return self.collect_batch()

    def submit(self, cond: np.ndarray | None = None) -> None:
        """Batch-1 form of submit_batch: `cond` is one (H, W, 3) frame (a block model's: (n, H, W, 3))."""
        self.submit_batch(self._one(cond))

    def collect(self) -> np.ndarray:
        return self.collect_batch()[0]

    @property
    def frames_are(self) -> str:
        """What the output frames show (a DiT artifact without a decoder graph: its latents)."""
        return self.unit.frames_are

    def step(self, cond: np.ndarray | None = None) -> np.ndarray:
        """One step, synchronously: (H, W, 3) float32 in [-1, 1], or uint8 (PipelineOptions.frames); (n, H, W, 3)
        for a model that makes n > 1 frames per step."""
        self.submit_batch(self._one(cond))
        return self.collect_batch()[0]

    def stream(self, inputs: Iterable[np.ndarray | None] | int) -> Iterator[np.ndarray]:
        """Frames for an input stream (or a frame count for generation), one frame in flight
        ahead on a GPU: frame n+1's input uploads while frame n computes and downloads."""
        items = iter([None] * inputs) if isinstance(inputs, int) else iter(inputs)
        for cond in items:
            self.submit(cond)
            if self.execution.pending == self.depth:
                yield self.collect()
        while self.execution.pending:
            yield self.collect()

    @property
    def timeline(self) -> list[dict]:
        return self.execution.timeline

    def describe(self) -> tuple[str, float | None, str]:
        """(device name, peak memory MiB or None on the CPU, what that memory number means)."""
        return self.execution.describe()

    # -- close --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.state == "closed":
            return
        self.execution.close()
        self.backend.close()
        self.buf = None
        self.state = "closed"

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------
    def _require(self, state: str, what: str) -> None:
        if self.state == state:
            return
        if self.state == "closed":
            raise PipelineError("pipeline is closed; load a new one")
        if state == "ready":
            raise PipelineError(f"call reset(seed) before you {what}")
        raise PipelineError(f"cannot {what} in state {self.state!r}")

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch:
            raise PipelineError(f"row {row} outside the pipeline's batch of {self.batch}")

    def _one(self, cond: np.ndarray | None) -> np.ndarray | None:
        """One input frame (H, W, 3) as the batch forms take it, (1, H, W, 3), on a batch-1 pipeline."""
        if self.batch != 1:
            raise PipelineError(f"this pipeline has {self.batch} rows: use submit_batch / step_batch")
        if cond is not None and tuple(np.shape(cond)) != self.input_shape:
            raise PipelineError(f"input frame has shape {tuple(np.shape(cond))}, the model takes {self.input_shape}; "
                                "resize it (mirage.core.video_io.fit_frame)")
        return None if cond is None else np.asarray(cond)[None]

    def _drain(self) -> None:
        while self.execution.pending:
            self.execution.collect()


def model_steps(options: PipelineOptions, meta: dict) -> PipelineOptions:
    """Options whose unset step count is the model's own (a distilled student records it)."""
    return options if options.steps is not None else dataclasses.replace(options, steps=default_steps(meta))


__all__ = ["Pipeline", "PipelineError", "BACKENDS"]
