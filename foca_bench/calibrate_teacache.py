"""Fits TeaCache's rescaling polynomial for a model: `python -m foca_bench.calibrate_teacache model=<name> [...]`.

TeaCache decides from the relative L1 change of the first block's modulated input, x_i, but what matters is
the change of the model's output, y_i; the polynomial p with y ~ p(x) rescales one into the other. This runs
full-compute generations (every step computed, `calibrate.samples` samples from the benchmark's seeds rule),
records x_i and y_i at every step i >= 1, fits `numpy.polyfit(x, y, calibrate.degree)` and prints the
coefficients (highest degree first) as the YAML of `conf/model_method/<model>_teacache.yaml`, with the
fit's R^2. Any `run.py` override applies (`model.path=...`, `sampler.steps=...`); extra knobs:
`+calibrate.samples=8 +calibrate.degree=4`. The fit is also written to
`results/calibration/teacache_<model>.json`.
"""

import sys

import numpy as np
import torch
from torch import Tensor

from foca_bench.adapters import build_adapter
from foca_bench.config import compose, split_knobs, validate
from foca_bench.hooks import CacheEngine
from foca_bench.records import write_calibration
from methods.base import SiteKey, Step
from methods.teacache import TeaCache, TeaCacheConfig, _State, relative_l1


class _Recorder(TeaCache):
    """Computes every step and records the indicator's relative change (TeaCache with threshold 0)."""

    def reset(self) -> None:
        super().reset()
        self.changes: list[float] = []

    def decide(self, key: SiteKey, step: Step, signal: Tensor) -> bool:
        s = self.state.setdefault(key, _State())
        if s.previous_signal is not None:
            self.changes.append(relative_l1(signal, s.previous_signal))
        s.previous_signal = signal
        return True


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[list[float], float]:
    """Least-squares polynomial (highest degree first) and its R^2 on the data."""
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) @ (y - y.mean())) or 1.0)
    return [float(c) for c in coefficients], r2


def measure(overrides: list[str], samples: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y) pairs of indicator change and output change over `samples` full-compute generations."""
    cfg = compose(*overrides, "method=teacache", "cache.l=0.0", "cache.coefficients=[1.0,0.0]")
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu" if not torch.cuda.is_available() else "cuda")
    method = _Recorder(TeaCacheConfig(l=0.0, coefficients=[1.0, 0.0]))
    outputs: list[Tensor] = []
    hook = adapter.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().float()))
    xs, ys = [], []
    try:
        with CacheEngine(method, adapter.sites()) as engine:
            for s in range(samples):
                outputs.clear()
                adapter.generate(engine, adapter.make_noise([s]), cfg.sampler.steps, cfg.sampler.guidance_scale,
                                 cfg.sampler.guided_channels, lineage=cfg.sampler.lineage,
                                 **adapter.example_conditions(1, start=s))
                xs += method.changes
                ys += [relative_l1(new, old) for old, new in zip(outputs, outputs[1:])]
    finally:
        hook.remove()
    if len(xs) != len(ys):
        raise RuntimeError(f"recorded {len(xs)} indicator changes but {len(ys)} output changes")
    return np.array(xs), np.array(ys), cfg.model.name


def main(argv: list[str]) -> dict:
    knobs = {"samples": 8, "degree": 4}
    overrides = split_knobs(argv, "calibrate", knobs)
    x, y, model = measure(overrides, knobs["samples"])
    coefficients, r2 = fit_polynomial(x, y, knobs["degree"])
    result = {"model": model, "overrides": overrides, "samples": knobs["samples"], "points": len(x),
              "degree": knobs["degree"], "coefficients": coefficients, "r2": r2,
              "x_range": [float(x.min()), float(x.max())]}
    write_calibration("teacache", "teacache", "coefficients", coefficients, ".6g", result,
                      f"TeaCache rescaling for {model}: {len(x)} steps from {knobs['samples']} samples, degree "
                      f"{knobs['degree']}, R^2 = {r2:.3f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
