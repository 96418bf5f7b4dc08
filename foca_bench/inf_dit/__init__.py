"""Inf-DiT (Yang et al., ECCV 2024, arXiv:2405.04312), our own PyTorch implementation of its inference path.

The original (THUDM/Inf-DiT) is a SwissArmyTransformer model run through DeepSpeed; this package rebuilds what
inference needs from its description and code, as plain `nn.Module`s the caching engine can hook:
- `model`: the transformer (UniBA block attention, adaLN without gates, layer-0 low-res cross-attention), the
  OpenCLIP image embedding of the low-res input, and tile mode's key/value memories;
- `sampler`: the EDM preconditioning and Heun sampler (20 steps, 39 model evaluations);
- `checkpoint`: the key map from the original checkpoint's parameter names onto ours;
- `memory`: what the feature cache and the memories will take at a resolution, before generating.
The adapter (`foca_bench/adapters/inf_dit.py`) maps the model for the caching engine and runs the sampler.
"""
