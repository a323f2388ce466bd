"""TensorRT / TensorRT-RTX engines, on the deployment side (imports no torch): the builder (build.py), the
manifest and its verification, the Engine lifecycle (check -> load -> bind -> execute). Building an
artifact from a checkpoint is mirage.bridge.artifact."""
