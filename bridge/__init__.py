"""Where the PyTorch side meets the torch-free deployment side: a checkpoint built into an artifact,
run through the runtime on the PyTorch backend, or measured over a long rollout."""
