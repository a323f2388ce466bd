"""Bring your own checkpoint: published Wan 2.1 generators from local paths into Mirage's WanDiT.

The layouts, told apart by their keys (facts from the projects' own save / load code):

    Self-Forcing   checkpoints/*.pt: torch.save({"generator", "critic", ["generator_ema"]}); each a state dict
                   of WanDiffusionWrapper, so every key is "model." + a WanModel key (trainer/distillation.py
                   save(); demo.py loads "generator_ema", inference.py "generator" or, with --use_ema, the EMA)
    CausVid        <folder>/model.pt: {"generator", "critic"} ({"generator"} after ODE pretraining), the same
                   "model." keys (causvid/train_distillation.py save(); minimal_inference/*.py load it)
    LongLive       longlive_base.pt: {"generator", ...} or {"model"} as above; its LoRA (lora.pt) is
                   {"generator_lora": peft state dict, "critic_lora", "step"}, keys
                   "base_model.model.blocks.N.<linear>.lora_{A,B}.weight", merged as W += (alpha / r) B A
                   (utils/lora_utils.py: every nn.Linear of each attention block; configs: rank = alpha = 256)
    Wan            a flat WanModel state dict (the Wan-AI/Wan2.1-T2V-1.3B folder's diffusion_pytorch_model.safetensors,
                   beside config.json, Wan2.1_VAE.pth and models_t5_umt5-xxl-enc-bf16.pth)
    diffusers      a WanTransformer3DModel folder: config.json + diffusion_pytorch_model.safetensors, or shards
                   listed by diffusion_pytorch_model.safetensors.index.json; names mapped by wan_keys
    Mirage         a DiT trained here (mirage.train.dit): model.safetensors (WanModel names) + config.json
                   {"dit": DiTConfig, ...}, whose config must be the one asked for (the autoencoder hash aside)

An EMA state dict may carry FSDP / activation-checkpoint / torch.compile wrapper names
(`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, `_orig_mod.`): removed, as Self-Forcing's and
LongLive's loaders remove them. Keys and shapes are compared with WanDiT's before the model is built;
then it is built once, in the wanted dtype and device, and filled tensor by tensor.
"""
from __future__ import annotations

import contextlib
import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mirage.core.config import ConfigError, DiTConfig, from_json
from mirage.core.files import sha256_file
from mirage.model.dit import WanDiT
from mirage.model.wan_keys import WanKeyError, diffusers_to_wan
from mirage.model.weights import CheckpointError, Entry, as_entries, check_shapes, copy_into, is_flat_state, \
    open_weights

GENERATOR_ENTRIES = ("generator_ema", "generator", "model")  # the dict entries that hold a generator
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
WRAPPER_PREFIX = "model."  # WanDiffusionWrapper.model
LORA_ENTRY, LORA_PREFIX = "generator_lora", "base_model.model."
# The transformer's file in both a Wan-AI folder (beside Wan2.1_VAE.pth and the T5 .pth) and a diffusers one
TRANSFORMER_FILE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = f"{TRANSFORMER_FILE}.index.json"
MIRAGE_FILE = "model.safetensors"  # a DiT trained here (mirage.train.dit), beside config.json and its prompt
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# the config.json field (WanModel's, diffusers') of what the weights' shapes do not reveal: the number of heads
HEAD_FIELDS = ("num_heads", "num_attention_heads")


@dataclass
class DiTWeights:
    """Where a WanDiT's weights came from: recorded beside every run that uses them."""

    path: str
    layout: str  # "self-forcing/causvid/longlive", "wan" or "diffusers"
    entry: str | None = None  # the dict entry read ("generator_ema", "generator", "model"), if any
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    lora: dict | None = None  # {"path", "sha256", "rank", "alpha", "layers"} when a LoRA was merged


def model_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """WanDiT's state-dict names and shapes for `cfg`, from a model on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}


def _weight_files(path: Path) -> list[Path]:
    """The weights files of a checkpoint path: the file itself, a folder's shards (index json) or its one file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint not found")
    if (path / "transformer").is_dir():  # a diffusers pipeline folder
        path = path / "transformer"
    index = path / DIFFUSERS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from e
        return [path / name for name in sorted(set(weight_map.values()))]
    for name in (TRANSFORMER_FILE, MIRAGE_FILE):
        if (path / name).is_file():
            return [path / name]
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise CheckpointError(f"{path}: expected one weights file or a {DIFFUSERS_INDEX}, found {found}")
    return files


def _generator_state(obj, path: Path, ema: bool) -> tuple[dict, str | None]:
    """The generator's flat state dict inside what a file holds, and the entry it came from."""
    if is_flat_state(obj):
        return obj, None
    if isinstance(obj, dict):
        if LORA_ENTRY in obj and not any(k in obj for k in GENERATOR_ENTRIES):
            raise CheckpointError(f"{path}: a LongLive LoRA adapter ({LORA_ENTRY}) without base weights; load the "
                                  f"base checkpoint and give this file as its LoRA")
        order = GENERATOR_ENTRIES if ema else GENERATOR_ENTRIES[1:] + GENERATOR_ENTRIES[:1]
        for name in order:
            if is_flat_state(obj.get(name)):
                return obj[name], name
    found = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: not a Wan generator checkpoint: expected a state dict or a dict with "
                          f"{' / '.join(GENERATOR_ENTRIES)} (Self-Forcing, CausVid, LongLive); found {found}")


def _strip_wrappers(name: str) -> str:
    for wrapper in WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def _to_wan_names(entries: dict[str, Entry], path: Path) -> tuple[dict[str, Entry], str]:
    """Entries renamed to WanModel keys, and the layout they were in; another model's keys -> one line."""
    names = {_strip_wrappers(k): e for k, e in entries.items()}
    wrapped = f"{WRAPPER_PREFIX}patch_embedding.weight" in names
    if wrapped:  # keys outside the wrapper's model (none in the published generators) stay, to be named
        names = {k.removeprefix(WRAPPER_PREFIX): e for k, e in names.items()}
    if "patch_embedding.weight" not in names:
        raise CheckpointError(f"{path}: not a Wan 2.1 transformer checkpoint (no patch_embedding.weight; "
                              f"keys such as {', '.join(list(entries)[:3])})")
    if any(k.startswith("condition_embedder.") for k in names):
        return {_diffusers_name(k): e for k, e in names.items()}, "diffusers"
    return names, "self-forcing/causvid/longlive" if wrapped else "wan"


def _diffusers_name(name: str) -> str:
    try:
        return diffusers_to_wan(name)
    except WanKeyError:
        return name  # not a transformer parameter: check_shapes names it as unexpected


def _read_config(files: list[Path], cfg: DiTConfig) -> None:
    """A config.json beside the weights must agree on what shapes cannot show (the number of heads)."""
    config_path = files[0].parent / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path}: not JSON ({e})") from e
    heads = next((config[f] for f in HEAD_FIELDS if f in config), cfg.num_heads)
    if heads != cfg.num_heads:
        raise CheckpointError(f"{config_path}: {heads} attention heads; config {cfg.name!r} has {cfg.num_heads}")
    check_saved_config(config_path.parent, cfg)


# fields a run may choose apart from the checkpoint: the video size (`--resolution`: the weights are the same at
# any token grid) and the autoencoder's recorded hash (checked against the autoencoder's own file)
RUN_FIELDS = ("width", "height", "autoencoder_sha256")


def check_saved_config(path: str | Path, cfg: DiTConfig) -> None:
    """A DiT trained here (its config.json records its DiTConfig): every field but RUN_FIELDS must agree with
    `cfg`, the mismatches named field by field. Nothing to check for a checkpoint made elsewhere."""
    saved = saved_dit_config(path)
    if saved is None:
        return
    diffs = [f"{f.name}: checkpoint has {getattr(saved, f.name)!r}, asked for {getattr(cfg, f.name)!r}"
             for f in dataclasses.fields(DiTConfig)
             if f.name not in RUN_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diffs:
        config_path = (Path(path) if Path(path).is_dir() else Path(path).parent) / "config.json"
        raise CheckpointError(f"{config_path}: DiT config mismatch; " + "; ".join(diffs))


def saved_dit_config(path: str | Path) -> DiTConfig | None:
    """The DiTConfig a checkpoint trained here records (config.json {"dit": ...}, mirage.train.dit), else None."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        return None
    try:
        saved = json.loads(config_path.read_text()).get("dit")
        return None if saved is None else from_json(DiTConfig, saved)
    except (ValueError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{config_path}: not a DiT config ({e})") from e


def read_dit_checkpoint(path: str | Path, cfg: DiTConfig, ema: bool = True) -> tuple[dict[str, Entry], DiTWeights]:
    """A checkpoint's tensors under WanModel names, checked against `cfg` by name and shape; nothing allocated."""
    path = Path(path)
    files = _weight_files(path)
    entries: dict[str, Entry] = {}
    entry_name = None
    for f in files:
        state, entry_name = _generator_state(open_weights(f), f, ema)
        entries.update(as_entries(state))
    entries, layout = _to_wan_names(entries, path)
    _read_config(files, cfg)
    check_shapes({k: e.shape for k, e in entries.items()}, model_shapes(cfg), f"{path} ({layout} layout)")
    return entries, DiTWeights(str(path), layout, entry_name, {f.name: sha256_file(f) for f in files})


def read_lora(path: str | Path, cfg: DiTConfig,
              alpha: float | None = None) -> tuple[dict[str, tuple[Entry, Entry]], dict]:
    """A LongLive LoRA file -> {WanModel weight name: (A, B)} and what to record; alpha defaults to the rank."""
    path = Path(path)
    obj = open_weights(path)
    state = obj.get(LORA_ENTRY, obj) if isinstance(obj, dict) else obj
    if not is_flat_state(state):
        raise CheckpointError(f"{path}: not a LoRA file (expected {LORA_ENTRY!r} or a flat peft state dict)")
    entries = as_entries(state)
    pairs: dict[str, dict[str, Entry]] = {}
    for name, entry in entries.items():
        base, _, part = _strip_wrappers(name).removeprefix(LORA_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{path}: {name!r} is not a LoRA weight (…lora_A.weight / …lora_B.weight)")
        pairs.setdefault(f"{base}.weight", {})[part[0]] = entry
    shapes = model_shapes(cfg)
    rank = min((ab["A"].shape[0] for ab in pairs.values() if "A" in ab), default=0)
    bad = sorted(w for w, ab in pairs.items() if w not in shapes or set(ab) != {"A", "B"}
                 or ab["A"].shape != (rank, shapes[w][1]) or ab["B"].shape != (shapes[w][0], rank))
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} LoRA weights do not fit the model (rank {rank}): "
                              f"{', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}")
    alpha = float(rank if alpha is None else alpha)
    return {w: (ab["A"], ab["B"]) for w, ab in pairs.items()}, \
        {"path": str(path), "sha256": sha256_file(path), "rank": rank, "alpha": alpha, "layers": len(pairs)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are built in `dtype` (no float32 copy of a large model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_dit(path: str | Path, cfg: DiTConfig, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", ema: bool = True, lora: str | Path | None = None,
             lora_alpha: float | None = None) -> tuple[WanDiT, DiTWeights]:
    """A WanDiT holding a published checkpoint (file or folder, any layout above), in `dtype` on `device`.

    Every check (layout, names, shapes, heads, the LoRA's fit) runs before the model is allocated; the
    model is then built once, directly in `dtype` on `device`, and filled one tensor at a time. `ema`
    picks a checkpoint's generator_ema entry when it has one (Self-Forcing's README runs --use_ema).
    """
    entries, info = read_dit_checkpoint(path, cfg, ema)
    lora_pairs, info.lora = read_lora(lora, cfg, lora_alpha) if lora is not None else ({}, None)
    with torch.device(device), default_dtype(dtype):
        model = WanDiT(cfg)
    copy_into(model, entries)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (a, b) in lora_pairs.items():  # merged in float32, then rounded once to the model's dtype
            w, scale = params[name], info.lora["alpha"] / info.lora["rank"]
            delta = b.load().to(w.device, torch.float32) @ a.load().to(w.device, torch.float32)
            w.copy_(w.float() + scale * delta)
    return model.eval().requires_grad_(False), info
