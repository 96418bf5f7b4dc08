"""Measures SmoothCache's calibration errors for a model: `python -m foca_bench.calibrate_smoothcache model=<name>`.

As the official `CalibrationHelper` (Roblox/SmoothCache, SmoothCache/calibration/calibration_helper.py) does: one
full-compute generation of a batch (`calibrate.samples` samples, seeds 0..n-1, class s % C), recording every
attention, MLP and fused site's output at every step; for each lookahead j = 1..`calibrate.lookahead` (3) the
relative L1 error between a site's output at step i and at step i + j, ||F_i - F_{i+j}||_1 / ||F_{i+j}||_1 over the
whole batch; averaged over the sites of each layer type (`attn`, `mlp`, ...). It prints the contents of
`conf/model_method/<model>_smoothcache.yaml` and writes `results/calibration/smoothcache_<model>.json`. Any `run.py`
override applies (`model.path=...`, `sampler.steps=...`); extra knobs: `+calibrate.samples=8 +calibrate.lookahead=3`.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from foca_bench.adapters import build_adapter
from foca_bench.config import compose, split_knobs, validate
from foca_bench.hooks import CacheEngine
from foca_bench.records import atomic_write_json
from methods.base import FULL, Plan, SiteKey, Step
from methods.smoothcache import SmoothCache, SmoothCacheConfig, layer_type


def relative_l1(previous: Tensor, current: Tensor) -> float:
    """||previous - current||_1 / ||current||_1, in float32 as the official `rel_l1_loss`."""
    return float((previous.float() - current.float()).abs().sum() / current.float().abs().sum())


class _Recorder(SmoothCache):
    """Computes every step and records each site's errors against its last `lookahead` outputs."""

    def __init__(self, lookahead: int) -> None:
        self.lookahead = lookahead
        super().__init__(SmoothCacheConfig())

    def reset(self) -> None:
        super().reset()
        self.history: dict[SiteKey, list[Tensor]] = {}  # most recent first
        self.site_errors: dict[SiteKey, list[list[float]]] = defaultdict(lambda: [[] for _ in range(self.lookahead)])

    def plan(self, step: Step) -> Plan:
        return FULL

    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        past = self.history.setdefault(key, [])
        for j, old in enumerate(past):
            self.site_errors[key][j].append(relative_l1(old, features))
        past.insert(0, features.detach().clone())
        del past[self.lookahead:]

    def averaged(self) -> dict[str, list[list[float]]]:
        """Per layer type, per lookahead: the errors averaged over the type's sites."""
        by_type: dict[str, list[list[list[float]]]] = defaultdict(list)
        for key, rows in self.site_errors.items():
            by_type[layer_type(key)].append(rows)
        return {kind: [torch.tensor([site[j] for site in sites], dtype=torch.float64).mean(0).tolist()
                       for j in range(self.lookahead)] for kind, sites in by_type.items()}


def measure(overrides: list[str], samples: int, lookahead: int) -> tuple[dict[str, list[list[float]]], str, int]:
    """(errors per layer type and lookahead, model name, steps) from one full-compute generation of `samples`."""
    cfg = compose(*overrides)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    recorder = _Recorder(lookahead)
    with CacheEngine(recorder, adapter.sites()) as engine:
        adapter.generate(engine, adapter.make_noise(list(range(samples))), cfg.sampler.steps,
                         cfg.sampler.guidance_scale, cfg.sampler.guided_channels, progress=True,
                         **adapter.example_conditions(samples))
    return recorder.averaged(), cfg.model.name, cfg.sampler.steps


def main(argv: list[str]) -> dict:
    knobs = {"samples": 8, "lookahead": 3}
    overrides = split_knobs(argv, "calibrate", knobs)
    errors, model, steps = measure(overrides, knobs["samples"], knobs["lookahead"])
    errors = {kind: [[float(f"{e:.4g}") for e in row] for row in rows] for kind, rows in errors.items()}
    result = {"model": model, "overrides": overrides, "samples": knobs["samples"], "steps": steps,
              "lookahead": knobs["lookahead"], "errors": errors}
    out = Path("results/calibration") / f"smoothcache_{model}.json"
    atomic_write_json(out, result)
    print(f"SmoothCache errors for {model}: {steps} steps, one batch of {knobs['samples']} samples, lookahead "
          f"{knobs['lookahead']} (written to {out}). For conf/model_method/{model}_smoothcache.yaml:\n")
    print("# @package cache\nerrors:")
    for kind, rows in errors.items():
        print(f"  {kind}:")
        for row in rows:
            print("    - [" + ", ".join(f"{e:.4g}" for e in row) + "]")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
