"""Maps adaptive FoCa's `cache.tol` to full steps for a model: `python -m foca_bench.calibrate_foca_adaptive
model=<name> [...]`.

The estimate adaptive FoCa thresholds (methods/foca_adaptive.py) is a relative norm, but how fast it accumulates
depends on the model's features and sampler, so a `tol` chosen on one model says little about another. This runs
`method=foca_adaptive` generations (`calibrate.samples` samples, seeds 0..n-1, one batch) at each tolerance of
`calibrate.tols` and reports the full steps each computes, with the mean estimate at its skipped steps. Writes
`results/calibration/foca_adaptive_<model>.json`. Any `run.py` override applies (`cache.N=10`,
`sampler.steps=...`); extra knobs: `+calibrate.samples=4 +calibrate.tols=0.01,0.02,0.05,0.1,0.2`.
"""

import sys
from pathlib import Path

import numpy as np
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import compose, split_knobs, validate
from foca_bench.hooks import CacheEngine
from foca_bench.records import atomic_write_json


def full_steps(adapter, cfg, overrides: list[str], tol: float, seeds: list[int]) -> dict:
    """Full steps and estimates of one batch generation at `tol`."""
    cache = validate(compose(*overrides, "method=foca_adaptive", f"cache.tol={tol}"))
    method = methods.build(cache)
    conditions = adapter.example_conditions(len(seeds), start=seeds[0])  # class s % C of seed s, or the prompt
    with CacheEngine(method, adapter.sites()) as engine:
        engine.reset()
        adapter.generate(engine, adapter.make_noise(seeds), cfg.sampler.steps, cfg.sampler.guidance_scale,
                         cfg.sampler.guided_channels, lineage=cfg.sampler.lineage, **conditions)
    skipped = [e for e, full in zip(method.estimates, method.decisions) if not full and e is not None]
    return {"tol": tol, "full_steps": engine.full_steps, "steps": cfg.sampler.steps,
            "full_at": [i for i, full in enumerate(method.decisions) if full],
            "mean_estimate_when_skipped": float(np.mean(skipped)) if skipped else None}


def main(argv: list[str]) -> dict:
    knobs = {"samples": 4, "tols": "0,0.01,0.02,0.05,0.1,0.2"}
    overrides = split_knobs(argv, "calibrate", knobs)
    cfg = compose(*overrides, "method=foca_adaptive")
    validate(cfg)
    adapter = build_adapter(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
    seeds = list(range(knobs["samples"]))
    rows = [full_steps(adapter, cfg, overrides, float(t), seeds) for t in str(knobs["tols"]).split(",")]
    result = {"model": cfg.model.name, "overrides": overrides, "samples": knobs["samples"], "N": cfg.cache.N,
              "rows": rows}
    out = Path("results/calibration") / f"foca_adaptive_{cfg.model.name}.json"
    atomic_write_json(out, result)
    print(f"adaptive FoCa on {cfg.model.name}, {cfg.sampler.steps} steps, N={cfg.cache.N} (written to {out}):")
    for r in rows:
        print(f"  tol={r['tol']:<6g} full steps {r['full_steps']:>3}/{r['steps']}  at {r['full_at']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
