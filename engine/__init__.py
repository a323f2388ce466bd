"""TensorRT / TensorRT-RTX engines: the builder (build.py), the `Engine` lifecycle the runtime's
TensorRT backend drives (engine.py: check -> load -> bind -> execute), an artifact's manifest
(manifest.py) and its verification against the graph specs (verify.py)."""
