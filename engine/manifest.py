"""The artifact manifest: written by `mirage-export`, checked before any engine is loaded.

An engine is only valid for the library version that built it, the GPUs it was built for
and the plugin library it was parsed with. The manifest records all three, and
`check_loadable` refuses a mismatch before TensorRT does, with the exact command that
rebuilds the artifact for this machine (TensorRT's own refusal is a log line and a None).

Schema (format 2; `validate_manifest` checks every key is present and every value's meaning):

    format, mirage_version, created, model {ModelConfig or DiTConfig fields},
    family unet|dit (optional, unet when absent: which graphs the artifact must hold), batch, max_batch,
    options {the ArtifactOptions it was built with: what `rebuild_command` replays},
    checkpoint {path, sha256}, precision fp32|fp16|int8|fp8, temporal_attention onnx|plugin,
    graphs {denoise | context_encode: {onnx, onnx_sha256, inputs [{name, shape, dtype}],
            outputs [...], engine (null for ONNX-only), engine_sha256, layers,
            engine_refused (only where the backend refused to parse or build the graph: why)}},
    backend {name onnx|tensorrt-rtx|tensorrt, version}, target {compute_capabilities [...]},
    plugin {path (relative to the artifact, which holds a copy of the library), sha256} | null,
    build_options {...}, build_seconds, parity {...},
    rebuild_command
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mirage import __version__
from mirage.core.errors import MirageError
from mirage.core.files import sha256_file
from mirage.core.graphs import FAMILY_GRAPHS, MANIFEST, PRECISIONS


class EngineError(MirageError, ValueError):
    """An engine or artifact that cannot be built or loaded here; one line that says what to do."""


FORMAT = 2
BACKENDS = ("onnx", "tensorrt-rtx", "tensorrt")  # what mirage-export builds
# TensorRT-RTX 1.7 build targets; FP8 needs the ones with FP8 tensor cores (Ada, Blackwell)
RTX_TARGETS = ("sm80", "sm86", "sm89", "sm120")
FP8_TARGETS = ("sm89", "sm120")

REQUIRED = ("format", "mirage_version", "created", "model", "batch", "max_batch", "options", "checkpoint", "precision",
            "temporal_attention", "graphs",
            "backend", "target", "plugin", "build_options", "build_seconds", "parity", "rebuild_command")
# keys inside the nested objects (the plugin is null for artifacts without one, so it has none here)
NESTED_REQUIRED = {"checkpoint": ("path", "sha256"), "backend": ("name", "version"),
                   "target": ("compute_capabilities",)}
GRAPH_REQUIRED = ("onnx", "onnx_sha256", "inputs", "outputs", "engine", "engine_sha256", "layers")

# TensorRT-RTX does not run on Hopper at all (verified on an H100: UNSUPPORTED_CC for every plan)
RTX_UNSUPPORTED = {"sm90": "Hopper"}


# ---------------------------------------------------------------------------------------------
# Files


def write_manifest(folder: str | Path, data: dict) -> Path:
    """Write DIR/manifest.json; an incomplete manifest is refused rather than written."""
    validate_manifest(data)
    path = Path(folder) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a manifest
    return path


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; build it with "
                          f"`mirage-export --checkpoint CHECKPOINT --out {folder}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: corrupt JSON ({e}); rebuild the artifact with mirage-export") from e
    if not isinstance(data, dict):
        raise EngineError(f"{path}: not a Mirage manifest (a JSON object is expected)")
    try:
        validate_manifest(data)
    except EngineError as e:
        raise EngineError(f"{path}: {e}") from e
    return data


def validate_manifest(m: dict) -> None:
    """Raise EngineError naming every missing key (dotted for nested ones), then the first value
    that cannot be right."""
    missing = [k for k in REQUIRED if k not in m]
    for key, inner in NESTED_REQUIRED.items():
        if isinstance(m.get(key), dict):
            missing += [f"{key}.{k}" for k in inner if k not in m[key]]
    if m.get("plugin") is not None:
        missing += [f"plugin.{k}" for k in ("path", "sha256") if k not in m["plugin"]]
    graphs = m.get("graphs")
    if isinstance(graphs, dict):
        # the family's own graphs (the autoencoder's: engine.verify); older manifests are all U-Nets
        required = FAMILY_GRAPHS.get(m.get("family", "unet"), ())
        missing += [f"graphs.{g}" for g in required if g not in graphs]
        for graph, meta in graphs.items():
            missing += [f"graphs.{graph}.{k}" for k in GRAPH_REQUIRED if k not in meta]
    if missing:
        raise EngineError(f"manifest is incomplete: missing {', '.join(missing)}")
    bad = _bad_value(m)
    if bad:
        raise EngineError(f"manifest: {bad}; rebuild the artifact with mirage-export")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def _bad_value(m: dict) -> str | None:
    if m["format"] != FORMAT:
        return f"format {m['format']!r}, this Mirage reads format {FORMAT}"
    if _version(m["mirage_version"]) > _version(__version__):
        return f"written by Mirage {m['mirage_version']}, newer than this one ({__version__})"
    if m.get("family", "unet") not in FAMILY_GRAPHS:
        return f"model family {m['family']!r} is not one of {', '.join(FAMILY_GRAPHS)}"
    if m["precision"] not in PRECISIONS:
        return f"precision {m['precision']!r} is not one of {', '.join(PRECISIONS)}"
    backend = m["backend"]
    if not isinstance(backend, dict) or backend.get("name") not in BACKENDS:
        return f"backend {backend!r} is not one of {', '.join(BACKENDS)}"
    if not isinstance(m["batch"], int) or m["batch"] < 1 or not (m["max_batch"] is None or isinstance(m["max_batch"], int)):
        return f"batch {m['batch']!r} / max_batch {m['max_batch']!r} are not batch sizes"
    if not isinstance(m["graphs"], dict) or not all(isinstance(g, dict) for g in m["graphs"].values()):
        return "graphs is not a table of graphs"
    for graph, meta in m["graphs"].items():
        if not meta.get("onnx") or not meta.get("onnx_sha256"):
            return f"graph {graph} records no ONNX file or hash"
    if backend["name"] != "onnx":
        if not backend.get("version"):
            return f"backend {backend['name']} records no version"
        if not m["target"].get("compute_capabilities"):
            return "no target compute capabilities are recorded for the engines"
        for graph, meta in m["graphs"].items():
            # a graph the backend refused is recorded as such (engine_refused: why), never just absent
            if (not meta.get("engine") or not meta.get("engine_sha256")) and not meta.get("engine_refused"):
                return f"graph {graph} records no engine file or hash"
    return None


# ---------------------------------------------------------------------------------------------
# Can this engine load here?


def normalize_cc(cc: str) -> str:
    """'sm_89', 'SM89', '8.9' and '89' all mean 'sm89' (the spelling of `mirage-export --gpu`)."""
    s = str(cc).strip().lower().replace("_", "")
    if s.startswith("sm"):
        s = s[2:]
    s = s.replace(".", "")
    if not s.isdigit():
        raise EngineError(f"compute capability {cc!r}: write it as sm89, sm120, ...")
    return f"sm{s}"


# mirage-export's flags for the recorded ArtifactOptions fields (defaults are left out)
_FLAGS = {"precision": "--precision", "backend": "--backend", "gpus": "--gpu", "batch": "--batch",
          "max_batch": "--max-batch", "optimization_level": "--opt-level", "workspace_mb": "--workspace-mb",
          "plugin_library": "--plugin-library", "temporal_attention": "--temporal-attention",
          "calibration_frames": "--calib-frames", "parity_frames": "--parity-frames"}
_FLAG_DEFAULTS = {"batch": 1, "max_batch": None, "optimization_level": 3, "workspace_mb": 1024, "gpus": (),
                  "plugin_library": None, "temporal_attention": "onnx", "calibration_frames": 8, "parity_frames": 50}
_SWITCHES = {"allow_parity_failure": "--allow-parity-failure", "experimental_int8": "--experimental-int8"}


def export_command(checkpoint: str | Path, out: str | Path, options: dict) -> str:
    """The mirage-export command line that builds `options` (ArtifactOptions as a dict) again,
    with absolute paths so that it works from any folder."""
    cmd = ["mirage-export", "--checkpoint", str(Path(checkpoint).resolve()), "--out", str(Path(out).resolve())]
    for key, flag in _FLAGS.items():
        value = options.get(key, _FLAG_DEFAULTS.get(key))
        if key in _FLAG_DEFAULTS and value in (_FLAG_DEFAULTS[key], None, [], ()):
            continue
        if key == "gpus":
            value = ",".join(value)
        elif key == "plugin_library":
            value = str(Path(value).resolve())
        cmd += [flag, str(value)]
    cmd += [flag for key, flag in _SWITCHES.items() if options.get(key)]
    return shlex.join(cmd)


def rebuild_command(m: dict, folder: str | Path | None = None) -> str:
    """The command that rebuilds this artifact into `folder` (where it is now), or the recorded one."""
    recorded = m.get("rebuild_command")
    if recorded and folder is None:
        return recorded
    if recorded and "--checkpoint" not in shlex.split(recorded):  # a DiT's (--dit NAME and its weights): as it was
        return with_option(recorded, "--out", str(Path(folder).resolve()))
    return export_command(m["checkpoint"]["path"], folder or "DIR", m.get("options") or {
        "precision": m.get("precision"), "backend": (m.get("backend") or {}).get("name")})


def with_option(command: str, flag: str, value: str | None) -> str:
    """`command` with `flag value` set (replacing an existing one), or removed when value is None."""
    words, out, i = shlex.split(command), [], 0
    while i < len(words):
        if words[i] == flag:
            i += 2
            continue
        if words[i].startswith(flag + "="):
            i += 1
            continue
        out.append(words[i])
        i += 1
    return shlex.join(out + ([flag, value] if value is not None else []))


def check_loadable(manifest: dict, backend_version: str, gpu_cc: str | None, plugin_path: str | None,
                   folder: str | Path | None = None) -> None:
    """Refuse an engine that this library version, GPU or plugin library cannot load.

    backend_version: `trt.__version__` of the module that will deserialize. gpu_cc: this GPU
    ('sm89'; None skips the GPU checks). plugin_path: the plugin library that will be loaded
    (None: the manifest's, relative to `folder`). folder: the artifact, for a rebuild command built here.
    """
    m = manifest
    backend, built_version = m["backend"]["name"], m["backend"].get("version")
    command = rebuild_command(m, folder)
    if backend not in ("tensorrt-rtx", "tensorrt"):
        raise EngineError(f"the artifact has no TensorRT engines (backend {backend}); rebuild: "
                          + with_option(command, "--backend", "tensorrt-rtx"))
    cc = normalize_cc(gpu_cc) if gpu_cc else None

    # first, since no rebuild with TensorRT-RTX can help here
    if backend == "tensorrt-rtx" and cc in RTX_UNSUPPORTED:
        full = with_option(with_option(command, "--gpu", None), "--backend", "tensorrt")
        raise EngineError(f"this GPU is {cc} ({RTX_UNSUPPORTED[cc]}): TensorRT-RTX does not run on "
                          f"{RTX_UNSUPPORTED[cc]}; full TensorRT is needed: {full}")
    if built_version and built_version != backend_version and not _runs_forward(m, built_version, backend_version):
        raise EngineError(f"engine built by {backend} {built_version} but this is {backend} {backend_version}; "
                          f"rebuild: {command}")
    targets = [normalize_cc(t) for t in m["target"].get("compute_capabilities") or []]
    if cc and targets and cc not in targets:
        # TensorRT-RTX builds for any listed GPU from here (keep the old ones, add this one);
        # full TensorRT builds for the GPU it runs on
        # full TensorRT builds for the GPU it runs on; so does RTX's fallback for a GPU it cannot target
        allowed = FP8_TARGETS if m["precision"] == "fp8" else RTX_TARGETS
        rtx = backend == "tensorrt-rtx" and cc in allowed
        fixed = with_option(command, "--gpu", ",".join(targets + [cc])) if rtx else \
            with_option(with_option(command, "--gpu", None), "--backend", "tensorrt")
        where = "" if rtx else " (with full TensorRT, on this GPU)"
        raise EngineError(f"engine targets compute capabilities [{', '.join(targets)}] but this GPU is {cc}; "
                          f"rebuild{where}: {fixed}")
    _check_plugin(m, plugin_path, command, folder)


def plugin_file(manifest: dict, folder: str | Path) -> Path | None:
    """The plugin library an artifact's engines need: its copy inside the artifact folder, so the
    folder can move (an older manifest's absolute path is used as it is)."""
    plugin = manifest.get("plugin")
    return Path(folder) / plugin["path"] if plugin else None


def _runs_forward(m: dict, built: str, runtime: str) -> bool:
    """A version-compatible engine (full TensorRT) loads in a later TensorRT of the same major version."""
    b, r = _version(built), _version(runtime)
    return bool((m.get("build_options") or {}).get("version_compatible")) and b[:1] == r[:1] and r >= b


def _check_plugin(m: dict, plugin_path: str | Path | None, command: str, folder) -> None:
    plugin = m.get("plugin")
    if not plugin:
        return  # built without one: nothing to match
    path = Path(plugin_path) if plugin_path else plugin_file(m, folder or ".")
    if not path.is_file():
        raise EngineError(f"engine needs the plugin library {plugin['path']}, which is missing at {path}; "
                          f"rebuild: {command}")
    if sha256_file(path) != plugin["sha256"]:
        raise EngineError(f"plugin library {path} differs from the one the engine was built with "
                          f"(sha256 mismatch); rebuild: {command}")
