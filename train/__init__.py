"""Training in PyTorch: data (data.py), the training loop and its memory check (trainer.py,
resources.py), one-unit checkpoints (checkpoint.py), rollout on the model (rollout.py), a training
step's context (context.py), the autoencoder stage (autoencoder.py, ae_eval.py), the frozen codec of
latent models and its clip cache (codec.py, latent_cache.py), distillation, self-forcing and DMD
(distill.py, self_forcing.py, dmd.py). The model, noise schedule and DDIM sampler it trains with
live below it, in mirage.model and mirage.core."""
