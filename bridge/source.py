"""A model as mirage-serve opens it, its prompt included: what to open (an artifact, a U-Net checkpoint, or a DiT
checkpoint of a named config) and, for a prompt model (the video DiT), the prompt its streams start with and where
a control message's prompt gets its embeddings (a prompt bank's names, a local text encoder, or both).

    source = ModelSource(Path("checkpoints/dit-tiny-taesd"), dit="dit-tiny-taesd",
                         prompt_embeds=Path("checkpoints/dit-tiny-taesd/prompt.safetensors"),
                         prompt_bank=Path("checkpoints/dit-tiny-taesd/prompts.safetensors"))
    source.read()                                    # the files checked before any model loads
    pool = StreamPool.open(source.path, 4, load=source.load)

It is a frozen dataclass of paths and names, so a Ray Serve replica (bridge/ray_app.py) receives it pickled and
opens the same model the same way; `condition` is also mirage-run's, for a DiT artifact.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.bridge.pipeline import load_pipeline, open_dit_checkpoint, text_prompt_encoder
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.prompts import PromptBank, PromptError, check_embeddings, read_bank, read_embeddings
from mirage.runtime.pipeline import Pipeline, PipelineError

# the options of a prompt, as the CLIs spell them (what a model without a prompt refuses by name)
PROMPT_FLAGS = {"prompt": "--prompt", "prompt_embeds": "--prompt-embeds", "text_encoder": "--text-encoder",
                "prompt_bank": "--prompt-bank"}


def condition(pipe: Pipeline, model, prompt: str | None = None, embeds: np.ndarray | None = None,
              text_encoder: Path | None = None, bank: dict[str, np.ndarray] | None = None) -> None:
    """Give a prompt model (`model` names it in messages) its starting prompt, `embeds` or the text `prompt` (a
    bank name, or text for the text encoder), and the prompt encoder a control's prompt goes through (the bank,
    then the text encoder); before the pipeline allocates. A model without a prompt refuses them all, by name."""
    given = {"prompt": prompt, "prompt_embeds": embeds, "text_encoder": text_encoder, "prompt_bank": bank}
    if "prompt" not in pipe.unit.controls:
        named = [PROMPT_FLAGS[k] for k, v in given.items() if v is not None]
        if named:
            raise PromptError(f"{', '.join(named)}: {model} takes no prompt")
        return
    if (prompt is None) == (embeds is None):
        raise PromptError(f"{model} needs one of --prompt TEXT (with --text-encoder FOLDER) or --prompt-embeds FILE")
    for name, entry in (bank or {}).items():  # every entry now: a wrong one would otherwise fail a client later
        check_embeddings(entry, pipe.unit.text_shape, f"prompt bank entry {name!r}")
    encode = None if text_encoder is None else text_prompt_encoder(text_encoder, pipe.cfg)
    if bank or encode is not None:
        pipe.prompt_encoder = PromptBank(bank or {}, encode)
    if prompt is not None:
        if pipe.prompt_encoder is None:
            raise PromptError("--prompt needs --text-encoder FOLDER (a local UMT5 encoder), or give --prompt-embeds FILE")
        embeds = pipe.prompt_encoder(prompt)
    pipe.set_prompt(embeds)


@dataclass(frozen=True)
class ModelSource:
    path: Path
    dit: str | None = None  # a DiT config (mirage.core.config.DIT_CONFIGS): `path` is a DiT checkpoint of it
    lora: Path | None = None  # with `dit`: a LongLive LoRA merged into its weights
    prompt: str | None = None  # the streams' starting prompt: a bank name, or text for the text encoder
    prompt_embeds: Path | None = None  # or its embeddings' file
    text_encoder: Path | None = None  # a local UMT5 folder: a control's prompt text, encoded once per prompt
    prompt_bank: Path | None = None  # named embeddings (.safetensors): a control's prompt names one
    strength: float | None = None  # a DiT with an encoder: video-to-video, every stream starting at it
    decoder: Path | None = None  # with `dit`: a TAEHV file, the runtime's codec for Wan's latents (taew2_1.pth)
    max_strength: float | None = None  # video-to-video: the highest strength a stream may take (None: 1)
    cache_from: str | None = None  # video-to-video: what a block leaves in the KV cache (CACHE_FROM; None: output)

    def read(self) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None]:
        """The starting prompt's embeddings and the bank, read from their files (PromptError: one unreadable)."""
        for given, flag, what in ((self.lora, "--lora", "a DiT checkpoint's LoRA"),
                                  (self.decoder, "--decoder", "a DiT checkpoint's TAEHV codec")):
            if given is not None and self.dit is None:
                raise PipelineError(f"{flag}: {what}; add --dit CONFIG")
        if self.cache_from is not None and self.strength is None:
            raise PipelineError("--cache-from: what a DiT's video-to-video block leaves in its cache; the streams "
                                "run video-to-video with --strength")
        return (None if self.prompt_embeds is None else read_embeddings(self.prompt_embeds),
                None if self.prompt_bank is None else read_bank(self.prompt_bank))

    @property
    def prompt_names(self) -> list[str]:
        """The bank's names, which a server offers its clients ([] without a bank)."""
        return sorted(self.read()[1] or {})

    def serving_options(self, fast: bool) -> PipelineOptions:
        """A server's pipeline options: uint8 frames both ways (they cross to the device as they are), and with
        `fast` (mirage-serve --fast) the fastest PyTorch configuration: the U-Net's (PipelineOptions.fastest), or
        for a DiT checkpoint its graphs compiled by Inductor in bf16 (the DiT's other options do not apply)."""
        if not fast:
            return PipelineOptions(frames="uint8")
        return PipelineOptions(frames="uint8", compile="default") if self.dit else PipelineOptions.fastest()

    def load(self, path: str | Path, backend: str = "auto", device: str = "auto",
             options: PipelineOptions = PipelineOptions()) -> Pipeline:
        """The pipeline at `path`, conditioned (StreamPool.open's `load`): a DiT checkpoint on the PyTorch
        backend, or whatever mirage.bridge.pipeline.load_pipeline opens."""
        embeds, bank = self.read()
        if self.strength is not None:
            options = dataclasses.replace(options, strength=self.strength)
        if self.max_strength is not None:
            options = dataclasses.replace(options, max_strength=self.max_strength)
        if self.cache_from is not None:
            options = dataclasses.replace(options, cache_from=self.cache_from)
        if self.dit is None:  # load_pipeline names the --dit a DiT checkpoint trained here needs
            pipe = load_pipeline(path, backend, device, options)
        else:
            if backend not in ("auto", "torch"):
                raise PipelineError(f"--backend {backend}: a DiT checkpoint (--dit) runs on the torch backend; "
                                    "export it (mirage-export --dit) for another")
            pipe = open_dit_checkpoint(path, get_dit_config(self.dit), device, options, self.lora,
                                       decoder=self.decoder)
        try:
            if self.strength is not None and "strength" not in pipe.controls:
                raise PipelineError(f"--strength: {path} takes no strength (video-to-video needs a DiT on a "
                                    "per-frame autoencoder, such as dit-tiny-taesd, or a TAEHV --decoder)")
            condition(pipe, path, self.prompt, embeds, self.text_encoder, bank)
        except BaseException:
            pipe.close()
            raise
        return pipe
