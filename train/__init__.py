"""PyTorch reference: model, noise schedule, DDIM sampler, rollout, data, training."""
