"""Checkpoints: a folder with safetensors weights and the configs as JSON, saved as one unit.

    config.json              {"model": ModelConfig, "train": TrainConfig, "step": ...,
                              "files": {name: {"sha256", "bytes"}}, ...}
    model.safetensors        EMA weights: what sampling and export use
    train_state.safetensors  raw weights + AdamW moments (and those of a model trained beside it,
                             DMD's fake score), only needed to resume training

A save is all-or-nothing, through a redo journal inside the folder:

    1. every file is written to NAME.tmp and fsynced; config.json records each weights file's
       sha256 and size
    2. .save-journal.json (the names to commit and the step) is written, fsynced, and the folder
       fsynced: from here on the new checkpoint is complete on disk
    3. each NAME.tmp is renamed onto NAME, the folder fsynced, the journal removed

Whoever opens the folder next (`recover`, called by every load and save) finishes an
interrupted save deterministically: a journal means "roll forward" (rename the .tmp files it
lists that are still there, an idempotent step), no journal means "the save never committed"
(delete the .tmp files; the previous checkpoint was never touched). So a kill at any point
leaves either the old or the new step, never a mix. The alternative, writing a sibling folder
and swapping it in by renaming folders, was not taken: it cannot replace a folder that is a
mount point (a container volume, the usual place for checkpoints) or keep files a user put
beside the checkpoint, and it leaves a moment where the folder does not exist at all.

Safetensors has no checksum, so garbage written into a weights file can still parse; the
recorded sha256 catches it, and non-finite tensors are refused as well (the only check left
for checkpoints saved before hashes were recorded).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mirage import __version__

from mirage.core.errors import CheckpointError  # noqa: F401 (re-exported: the one class for every weights file)
from mirage.core.files import as_created, sha256_file
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, from_json, to_json
from mirage.model.unet import MirageUNet
from mirage.train.resources import check_weights_fit

CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "train_state.safetensors"
JOURNAL = ".save-journal.json"
TMP = ".tmp"
PROBE = ".write-probe-"


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(out: str | Path) -> Path:
    """Create `out` and prove a file can be written there, before any training work."""
    out = Path(out)
    probe = out / f"{PROBE}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{out}: checkpoint folder is not writable ({e.strerror}); "
                              "choose another --out or fix its permissions") from e
    return out


def _leftovers(folder: Path) -> list[Path]:
    """Files an interrupted save or writability probe can leave; only ours, never a user's."""
    tmps = [folder / (name + TMP) for name in (CONFIG, WEIGHTS, STATE, JOURNAL) if (folder / (name + TMP)).exists()]
    return tmps + (sorted(folder.glob(f"{PROBE}*")) if folder.is_dir() else [])


def recover(folder: str | Path) -> None:
    """Finish or discard an interrupted save in `folder` (see the module docstring)."""
    folder = Path(folder)
    journal = folder / JOURNAL
    if not journal.exists() and not _leftovers(folder):
        return
    try:
        if journal.exists():
            try:
                plan = json.loads(journal.read_text())
                commit, delete = list(plan["files"]), list(plan["delete"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                # renamed into place only once complete and flushed: unreadable means the disk is corrupt
                raise CheckpointError(f"{journal}: unreadable save journal ({e}); the checkpoint cannot be "
                                      "trusted, restore it from a copy or retrain") from e
            for name in commit:
                if (folder / (name + TMP)).exists():
                    os.replace(folder / (name + TMP), folder / name)
            for name in delete:
                (folder / name).unlink(missing_ok=True)
            _fsync(folder)
            journal.unlink()
        for tmp in _leftovers(folder):
            tmp.unlink()
        _fsync(folder)
    except OSError as e:
        raise CheckpointError(f"{folder}: an interrupted save left files that cannot be cleaned up ({e.strerror}); "
                              "make the folder writable and retry") from e


def save_unit(out: str | Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
              delete: tuple[str, ...] = ()) -> Path:
    """Save safetensors files {file name: tensors} and config.json (`meta`, plus each file's sha256
    and size under "files") into `out` as one unit, deleting the files in `delete` in the same
    commit (see the module docstring). Non-finite values are refused before anything is written:
    a checkpoint never holds weights a load would reject."""
    for name, values in tensors.items():
        bad = next((k for k, v in values.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise CheckpointError(f"{out}: not saving step {meta.get('step')}: {name} tensor {bad} holds NaN or "
                                  "infinite values; the checkpoint there is left as it was")
    out = check_writable(out)
    recover(out)
    step = meta.get("step")
    try:
        meta = {**meta, "files": {}}
        for name, values in tensors.items():
            tmp = out / (name + TMP)
            save_file(values, str(tmp))
            as_created(tmp)  # safetensors writes through a temporary file: 0600, unreadable to anyone else
            _fsync(tmp)
            meta["files"][name] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        (out / (CONFIG + TMP)).write_text(json.dumps(meta, indent=2))
        _fsync(out / (CONFIG + TMP))
        plan = {"step": step, "files": [*tensors, CONFIG], "delete": list(delete)}
        (out / (JOURNAL + TMP)).write_text(json.dumps(plan))
        _fsync(out / (JOURNAL + TMP))
        os.replace(out / (JOURNAL + TMP), out / JOURNAL)  # the commit point
        _fsync(out)
    except OSError as e:
        raise CheckpointError(f"{out}: saving step {step} failed ({e.strerror}); the previous checkpoint "
                              "there is intact") from e
    recover(out)  # roll forward: the same code that finishes a save interrupted after the commit
    return out


Trainable = tuple[torch.nn.Module, torch.optim.Optimizer]


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{idx}.{name}": torch.as_tensor(value).contiguous()
            for idx, slots in optimizer.state_dict()["state"].items() for name, value in slots.items()}


def save_checkpoint(out: str | Path, model: MirageUNet, ema: MirageUNet, train_cfg: TrainConfig, step: int,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    aux: dict[str, Trainable] | None = None) -> Path:
    """`aux`: other trained models a resume needs, by name, with their optimizers (DMD's fake
    score): saved into the train state beside the model's, as NAME.model.* and NAME.opt.*."""
    meta = {"model": to_json(model.cfg), "train": to_json(train_cfg), "step": step,
            "mirage_version": __version__, **(extra or {})}
    tensors = {WEIGHTS: {k: v.detach().contiguous() for k, v in ema.state_dict().items()}}
    if optimizer is not None:
        state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        state.update(_optimizer_tensors(optimizer, "opt."))
        meta["param_groups"] = optimizer.state_dict()["param_groups"]
        for name, (module, opt) in (aux or {}).items():
            state.update({f"{name}.model.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
            state.update(_optimizer_tensors(opt, f"{name}.opt."))
            meta.setdefault("aux_param_groups", {})[name] = opt.state_dict()["param_groups"]
        tensors[STATE] = state
    elif aux:
        raise ValueError("aux models are train state: save them with the optimizer")
    # a weights-only save must not leave an older step's train state beside it
    return save_unit(out, tensors, meta, delete=() if optimizer is not None else (STATE,))


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    return folder.parent if folder.suffix == ".safetensors" else folder


def read_meta(path: str | Path) -> dict:
    folder = _folder(path)
    recover(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: not a Mirage checkpoint (no {CONFIG}); "
                              "train one with `mirage-train` or pass the bundled checkpoints/tiny")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{folder / CONFIG}: no \"model\" section; not a Mirage checkpoint config")
    if not isinstance(meta.get("step", 0), int) or meta.get("step", 0) < 0:
        raise CheckpointError(f"{folder / CONFIG}: step={meta['step']!r} must be a non-negative integer")
    files = meta.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(r, dict) and isinstance(r.get("sha256"), str)
                                            and isinstance(r.get("bytes"), int) for r in files.values())):
        raise CheckpointError(f"{folder / CONFIG}: \"files\" must map file names to {{\"sha256\", \"bytes\"}}")
    return meta


def check_not_dit(path: str | Path) -> None:
    """A DiT checkpoint trained here (config.json {"dit": ...}, written by train/dit.py) opened as a U-Net
    checkpoint (mirage-run, mirage-serve and mirage-export without --dit): say which config it names, where
    read_meta would only say it is no U-Net checkpoint."""
    config = Path(path) / CONFIG
    try:
        name = json.loads(config.read_text())["dit"]["name"] if config.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return  # not one: read_meta says what it is not
    if name is not None:
        raise CheckpointError(f"{path} is a DiT checkpoint: add --dit {name}")


def model_config(meta: dict, folder: Path) -> ModelConfig:
    try:
        return from_json(ModelConfig, meta["model"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG}: bad model config ({e})") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MirageUNet, dict]:
    """Load the EMA model of a checkpoint folder (or its model.safetensors) in eval mode."""
    folder = _folder(path)
    meta = read_meta(folder)
    cfg = model_config(meta, folder)
    check_weights_fit(cfg)
    model = MirageUNet(cfg)
    _load_into(model, folder / WEIGHTS, meta, prefix="")
    return model.to(device).eval(), meta


def _verified(file: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors of `file`, after checking its recorded size and hash (when recorded) and
    that every floating-point value is finite."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    recorded = meta.get("files", {}).get(file.name)
    if "files" in meta and recorded is None:
        raise CheckpointError(f"{file}: not part of the checkpoint {CONFIG} describes (left from another save); "
                              "delete it or retrain")
    if recorded is not None:
        size = file.stat().st_size
        if size != recorded["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, but {CONFIG} recorded {recorded['bytes']} "
                                  "(truncated or replaced); restore it or retrain")
        if sha256_file(file) != recorded["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one {CONFIG} recorded at save "
                                  "(the file is corrupt); restore it or retrain")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({e})") from e
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values; "
                                  "the checkpoint is corrupt or training diverged")
    return tensors


def _load_into(model: torch.nn.Module, file: Path, meta: dict, prefix: str) -> dict:
    """Verify `file`, load its `prefix`ed weights into `model`; returns all of the file's tensors."""
    tensors = _verified(file, meta)
    _load_weights(model, tensors, file, prefix)
    return tensors


def _load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path, prefix: str) -> None:
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # size mismatches: the weights belong to another config
        raise CheckpointError(f"{file}: weights do not fit the model config ({str(e).splitlines()[1].strip()})") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{file}: weights do not fit the model config (missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")


def _restore_optimizer(folder: Path, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       prefix: str, param_groups) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: optimizer state does not fit the model ({e})") from e


def load_train_state(folder: str | Path, model: MirageUNet, ema: MirageUNet,
                     optimizer: torch.optim.Optimizer, aux: dict[str, Trainable] | None = None) -> dict:
    """Restore raw weights, EMA weights and AdamW state (and those of the `aux` models, as
    save_checkpoint wrote them) for resuming; returns the meta dict."""
    folder = Path(folder)
    meta = read_meta(folder)
    _load_into(ema, folder / WEIGHTS, meta, prefix="")
    tensors = _load_into(model, folder / STATE, meta, prefix="model.")
    if "param_groups" not in meta:
        raise CheckpointError(f"{folder / CONFIG}: no optimizer param_groups; this checkpoint cannot resume training")
    _restore_optimizer(folder, optimizer, tensors, "opt.", meta["param_groups"])
    for name, (module, opt) in (aux or {}).items():
        groups = meta.get("aux_param_groups", {}).get(name)
        if groups is None:
            raise CheckpointError(f"{folder / STATE}: holds no {name} model, which this run trains beside the model "
                                  "(was it saved by another kind of run?); choose another --out or pass --no-resume")
        _load_weights(module, tensors, folder / STATE, prefix=f"{name}.model.")  # the state file is read once
        _restore_optimizer(folder, opt, tensors, f"{name}.opt.", groups)
    return meta
