"""Measures MagCache's magnitude ratios for a model: `python -m foca_bench.calibrate_magcache model=<name> [...]`.

MagCache skips the block stack by the ratio of successive residual magnitudes, which depends on the model and
its sampler. This runs full-compute generations (`calibrate.samples` samples, seeds 0..n-1), takes the residual
of the whole block stack (last block's output minus first block's input) at every step, and records per step
ratio_i = mean over tokens of ||r_i|| / (||r_{i-1}|| + 1e-8) (1.0 at step 0), MagCache's own calibration formula,
averaged over the samples. It prints the YAML of `conf/model_method/<model>_diffusers_magcache.yaml` and
writes `results/calibration/magcache_<model>.json`. Any `run.py` override applies (`model.path=...`,
`sampler.steps=...`); extra knob: `+calibrate.samples=8`. diffusers' own calibration mode
(`MagCacheConfig(calibrate=True)`) gives the same numbers (tests/test_diffusers_hooks.py compares them).
"""

import sys
from typing import Optional

import torch
from torch import Tensor

import methods
from foca_bench.adapters import Adapter, build_adapter
from foca_bench.config import compose, split_knobs, validate
from foca_bench.hooks import CacheEngine, hidden_states
from foca_bench.records import write_calibration


def magnitude_ratios(adapter: Adapter, steps: int, guidance_scale: float, seeds: list[int],
                     guided_channels: Optional[int] = None, lineage: str = "diffusers") -> list[float]:
    """Per-step magnitude ratios of the block stack's residual, averaged over one generation per seed."""
    blocks = adapter.transformer.transformer_blocks
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args, kwargs: inputs.append(hidden_states(args, kwargs)),
                                                 with_kwargs=True),
             blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out))]
    per_seed = []
    try:
        with CacheEngine(methods.build({"name": "none"}), adapter.sites()) as engine:
            for seed in seeds:
                inputs.clear()
                outputs.clear()
                adapter.generate(engine, adapter.make_noise([seed]), steps, guidance_scale, guided_channels,
                                 lineage=lineage, **adapter.example_conditions(1, start=seed))
                norms = [torch.linalg.norm((out - inp).float(), dim=-1) for inp, out in zip(inputs, outputs)]
                per_seed.append([1.0] + [(new / (old + 1e-8)).mean().item() for old, new in zip(norms, norms[1:])])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.tensor(per_seed, dtype=torch.float64).mean(0).tolist()


def main(argv: list[str]) -> dict:
    knobs = {"samples": 8}
    overrides = split_knobs(argv, "calibrate", knobs)
    cfg = compose(*overrides)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    ratios = magnitude_ratios(adapter, cfg.sampler.steps, cfg.sampler.guidance_scale, list(range(knobs["samples"])),
                              cfg.sampler.guided_channels, cfg.sampler.lineage)
    model = cfg.model.name
    result = {"model": model, "overrides": overrides, "samples": knobs["samples"], "steps": cfg.sampler.steps,
              "mag_ratios": ratios}
    write_calibration("magcache", "diffusers_magcache", "mag_ratios", ratios, ".4f", result,
                      f"MagCache ratios for {model}: {cfg.sampler.steps} steps, mean of {knobs['samples']} samples")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
