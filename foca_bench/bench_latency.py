"""Latency benchmark: what a full step and a skipped step cost per method, and where FoCa's speed-up goes.

`python -m foca_bench.bench_latency` (`make bench`) prints, for the shipped toy_dit at batches 16 and 64:
- the wall time and FLOPs of a full step, and of a skipped step for each method (medians of the model calls of
  individual steps, from runs with two full steps and the rest skipped; FLOPs per step from meta-device counts);
- for FoCa N=5 over 50 steps: its FLOPs speed-up, the latency speed-up projected from those per-step costs, the
  projection with FORA's skipped step (a forecast that costs nothing: the model's own uncached work only), and
  the end-to-end latency speed-up measured interleaved with `none`, as the runner does.
`--model dit_xl_2 --batch 1 --steps 7` does the same on the real DiT-XL/2 architecture with random weights
(timing does not depend on weight values; ~3 minutes on 2 cores) and, at so few steps, projects only.

Figures, not assertions: speed targets are read here, never timed in tests. A skipped step still runs what no
per-site cache removes (adaLN conditioning, gates and residual adds, patch embedding, final layer, scheduler)
plus the forecast arithmetic; these are elementwise, memory-bound and counted as 0 FLOPs, so their share of
the time exceeds their share of the FLOPs most on a narrow model (toy_dit: width 128) and least on a wide one.
`--default-malloc` keeps glibc's allocator defaults (see `profiling.tune_cpu_allocator`).
"""

import argparse
import statistics
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import compose, schedule_full_steps, validate
from foca_bench.hooks import CacheEngine
from foca_bench.profiling import count_flops, time_once, tune_cpu_allocator

METHODS = ("reuse", "fora", "taylorseer", "foca")
FOCA5 = {"name": "foca", "N": 5, "warmup": 1}
PAPER_STEPS = 50


class TimedEngine(CacheEngine):
    """The engine, timing each step's model call (CPU wall time) and noting whether it was full."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: list[tuple[float, bool]] = []

    @contextmanager
    def step(self, index: int, t: float, total: Optional[int] = None) -> Iterator:
        full_before = self.full_steps
        start = time.perf_counter()
        with super().step(index, t, total) as plan:
            yield plan
        self.step_times.append((time.perf_counter() - start, self.full_steps > full_before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy_dit")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=PAPER_STEPS)
    parser.add_argument("--default-malloc", action="store_true")
    args = parser.parse_args()
    malloc = None if args.default_malloc else tune_cpu_allocator()
    weights = () if args.model == "toy_dit" else ("model.weights=random",)
    cfg = compose(f"model={args.model}", *weights)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    meta_cfg = compose(f"model={args.model}", "model.weights=meta")
    meta = build_adapter(meta_cfg.model, "meta")
    print(f"{args.model}: {torch.get_num_threads()} threads, malloc {malloc or 'glibc defaults'}")
    for batch in args.batch:
        bench(adapter, meta, cfg, batch, args.steps, args.repeats)


def bench(adapter, meta, cfg, batch: int, T: int, repeats: int) -> None:
    guidance = cfg.sampler.guidance_scale or cfg.model.guidance_scale

    def run(cache: dict, on=adapter, n: int = batch) -> list[tuple[float, bool]]:
        with TimedEngine(methods.build({"warmup": 1, **cache}), on.sites()) as engine:
            on.generate(engine, on.make_noise(list(range(n))), T, guidance, **on.example_conditions(n))
        return engine.step_times

    def step_median(cache: dict, full: bool) -> float:
        run(cache)  # warm-up
        times = [s for _ in range(repeats) for s, was_full in run(cache) if was_full == full]
        return statistics.median(times)

    def flops(cache: dict) -> float:
        return count_flops(lambda: run(cache, meta, batch))

    two_full = lambda name: {"name": name, "N": 10 * T}  # steps 0 and 1 full (warmup 1), the rest skipped
    full_s, full_f = step_median({"name": "none"}, full=True), flops({"name": "none"}) / T
    skip_s = {m: step_median(two_full(m), full=False) for m in METHODS}
    skip_f = {m: (flops(two_full(m)) - 2 * full_f) / (T - 2) for m in METHODS}
    print(f"\nbatch {batch} (CFG batch {2 * batch if guidance > 1 else batch}), {T} steps")
    print(f"full step:              {1e3 * full_s:8.2f} ms  {full_f / 1e9:9.3f} GFLOP")
    for m in METHODS:
        print(f"skipped step, {m:10s}{1e3 * skip_s[m]:8.2f} ms  {skip_f[m] / 1e9:9.3f} GFLOP  "
              f"({100 * skip_s[m] / full_s:4.1f}% of a full step's time, {100 * skip_f[m] / full_f:4.1f}% of its FLOPs)")

    n_full = schedule_full_steps(methods.build(FOCA5).cfg, PAPER_STEPS)
    n_skip = PAPER_STEPS - n_full
    speedup = lambda full, skip: PAPER_STEPS * full / (n_full * full + n_skip * skip)
    flops_speedup = speedup(full_f, skip_f["foca"])
    projected = speedup(full_s, skip_s["foca"])
    free_forecast = speedup(full_s, skip_s["fora"])
    print(f"FoCa N=5 over {PAPER_STEPS} steps ({n_full} full): FLOPs speed-up {flops_speedup:.2f}x; latency speed-up "
          f"projected {projected:.2f}x (ratio {projected / flops_speedup:.2f}); with a cost-free forecast (FORA's "
          f"skipped step) {free_forecast:.2f}x (ratio {free_forecast / flops_speedup:.2f})")
    if T != PAPER_STEPS:
        return
    none_t, foca_t = [], []
    for _ in range(repeats):  # whole generations, interleaved, as the runner measures them
        none_t.append(time_once(lambda: run({"name": "none"}), torch.device("cpu")))
        foca_t.append(time_once(lambda: run(FOCA5), torch.device("cpu")))
    measured = statistics.median(none_t) / statistics.median(foca_t)
    print(f"FoCa N=5 end to end, interleaved with none: latency speed-up {measured:.2f}x "
          f"(ratio {measured / flops_speedup:.2f})")


if __name__ == "__main__":
    main()
