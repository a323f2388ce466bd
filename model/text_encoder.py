"""Prompt conditioning for the Wan 2.1 DiT: UMT5 text embeddings, computed once per prompt, or read from a file.

Wan 2.1 conditions on the last hidden state of the UMT5-XXL encoder (4096 wide). Its T5 wrapper
(Wan's `HuggingfaceTokenizer(seq_len=512, clean='whitespace')` + `umt5_xxl`, used unchanged by
Self-Forcing's `WanTextEncoder`, and diffusers' `WanPipeline._get_t5_prompt_embeds`) pads or
truncates every prompt to 512 tokens (the model's text_len), runs the encoder with the attention
mask, then sets the rows past the prompt's length to 0. The DiT always sees (1, text_len, text_dim):
a fixed shape, which a captured graph needs. Embeddings read from a file are zero-padded the same way.

The encoder comes from a local folder only (nothing is downloaded): a transformers
`UMT5EncoderModel` folder holding its tokenizer too, or a diffusers pipeline folder with
`text_encoder/` and `tokenizer/` beside each other (the Wan2.1-T2V-1.3B-Diffusers layout).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mirage.core.config import DiTConfig
from mirage.core.errors import MirageError

EMBEDS_SUFFIXES = (".safetensors", ".pt", ".pth")
WAN_OWN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"  # Wan-AI's folder: its own T5 layout, not transformers'


class ConditioningError(MirageError, ValueError):
    """A text encoder folder or prompt embeddings file that cannot be used; the message names the path."""


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning (wan/modules/tokenizers.py): ftfy.fix_text (mojibake, curly quotes,
    full-width letters, NFC), HTML entities unescaped twice, runs of whitespace made one space."""
    try:
        import ftfy
    except ImportError as e:
        raise ConditioningError("prompt cleaning needs ftfy, as Wan's: pip install -e '.[wan]'") from e
    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip()


class PromptEncoder:
    """A UMT5 encoder and its tokenizer from a local folder; `encode` runs once per distinct prompt."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        enc_dir, tok_dir = _encoder_folders(self.folder)
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as e:
            raise ConditioningError("the text encoder needs transformers: pip install -e '.[wan]'") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(enc_dir, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as e:  # transformers' errors for a folder without the files it needs
            raise ConditioningError(f"{folder}: not a UMT5 encoder folder ({str(e).splitlines()[0]})") from e
        self.model.to(device).eval().requires_grad_(False)
        self.width = self.model.config.d_model
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompt: str, text_len: int) -> torch.Tensor:
        """(1, text_len, d_model) embeddings of `prompt`, zero past its tokens; cached per cleaned prompt."""
        text = clean_prompt(prompt)
        if (text, text_len) not in self._cache:
            tokens = self.tokenizer([text], padding="max_length", max_length=text_len, truncation=True,
                                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            device = next(self.model.parameters()).device
            mask = tokens.attention_mask.to(device)
            hidden = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
            self._cache[text, text_len] = hidden * mask[..., None].to(hidden.dtype)  # pads -> 0, as Wan's wrapper
        return self._cache[text, text_len]


def _encoder_folders(folder: Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder): a diffusers pipeline folder's subfolders, or the folder itself."""
    if not folder.is_dir():
        raise ConditioningError(f"{folder}: text encoder folder not found")
    if (folder / WAN_OWN_T5).is_file():
        raise ConditioningError(f"{folder}: Wan's own T5 checkpoint ({WAN_OWN_T5}); give a transformers UMT5 folder "
                                f"(Wan2.1-T2V-1.3B-Diffusers, with text_encoder/ and tokenizer/)")
    if (folder / "text_encoder").is_dir():
        return folder / "text_encoder", folder / "tokenizer"
    return folder, folder


def read_prompt_embeds(path: str | Path, text_dim: int, text_len: int) -> torch.Tensor:
    """Precomputed embeddings, (L, text_dim) or (1, L, text_dim), L <= text_len -> (1, text_len, text_dim), zero-padded.

    A .safetensors file holds one tensor (any name) or a 'prompt_embeds' tensor; a .pt file a tensor or
    a dict with 'prompt_embeds' (what Self-Forcing's `WanTextEncoder` returns), read with weights_only.
    """
    path = Path(path)
    if path.suffix not in EMBEDS_SUFFIXES:
        raise ConditioningError(f"{path}: prompt embeddings must be one of {', '.join(EMBEDS_SUFFIXES)}")
    if not path.is_file():
        raise ConditioningError(f"{path}: prompt embeddings file not found")
    try:
        data = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                  weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ConditioningError(f"{path}: cannot read prompt embeddings ({str(e).splitlines()[0]})") from e
    embeds = _the_tensor(path, data)
    if embeds.dim() == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds.dim() != 2 or embeds.shape[1] != text_dim:
        raise ConditioningError(f"{path}: prompt embeddings have shape {tuple(embeds.shape)}; the model needs "
                                f"(L, {text_dim}) or (1, L, {text_dim})")
    if embeds.shape[0] > text_len:
        raise ConditioningError(f"{path}: {embeds.shape[0]} prompt tokens; the model takes at most {text_len}")
    if not torch.isfinite(embeds).all():  # NaN embeddings make a black video with no other sign
        raise ConditioningError(f"{path}: prompt embeddings hold NaN or infinite values")
    padded = embeds.new_zeros(text_len, text_dim)
    padded[: embeds.shape[0]] = embeds
    return padded[None].float()


def _the_tensor(path: Path, data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, dict) and "prompt_embeds" in data:
        return data["prompt_embeds"]
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return next(iter(data.values()))
    names = list(data)[:4] if isinstance(data, dict) else type(data).__name__
    raise ConditioningError(f"{path}: expected one tensor or a 'prompt_embeds' entry, found {names}")


def encode_prompt(text_or_file: str | Path, cfg: DiTConfig, encoder: PromptEncoder | None = None) -> torch.Tensor:
    """(1, cfg.text_len, cfg.text_dim) conditioning: a Path is a prompt embeddings file; a str is prompt text,
    encoded by `encoder` (a PromptEncoder of a local UMT5 folder)."""
    if isinstance(text_or_file, Path):
        return read_prompt_embeds(text_or_file, cfg.text_dim, cfg.text_len)
    if encoder is None:
        raise ConditioningError("a text prompt needs a text encoder folder (or give a prompt embeddings file)")
    check_width(encoder, cfg)
    return encoder.encode(text_or_file, cfg.text_len)


def check_width(encoder: PromptEncoder, cfg: DiTConfig) -> None:
    """The encoder's embeddings must be as wide as the model's text input (UMT5-XXL: 4096)."""
    if encoder.width != cfg.text_dim:
        raise ConditioningError(f"{encoder.folder}: text encoder is {encoder.width} wide; "
                                f"model {cfg.name!r} needs {cfg.text_dim}")
