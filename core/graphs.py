"""Names shared by the exporter, the engine builder and the runtime (no torch here).

Two graphs make a frame: `denoise` runs once per DDIM step, `context_encode` once per frame.
"""

DENOISE = "denoise"
CONTEXT = "context_encode"
GRAPHS = (DENOISE, CONTEXT)

# denoise(x_t, t, [cond], memory, ages) -> v
X_T, T, COND, MEMORY, AGES, V = "x_t", "t", "cond", "memory", "ages", "v"
# context_encode(frame, t_ctx) -> kv
FRAME, T_CTX, KV = "frame", "t_ctx", "kv"


def denoise_inputs(video_to_video: bool) -> tuple[str, ...]:
    return (X_T, T, COND, MEMORY, AGES) if video_to_video else (X_T, T, MEMORY, AGES)


CONTEXT_INPUTS = (FRAME, T_CTX)

MANIFEST = "manifest.json"


def onnx_file(graph: str) -> str:
    return f"{graph}.onnx"


def engine_file(graph: str) -> str:
    return f"{graph}.engine"


def layers_file(graph: str) -> str:
    return f"{graph}.layers.json"


TIMING_CACHE = "timing.cache"

# The temporal-attention TensorRT plugin (plugins_cpp/): the custom ONNX node's op_type, and
# the plugin_version / plugin_namespace attributes the TensorRT ONNX parser matches it by.
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "MirageTemporalAttention", "1", "mirage"
