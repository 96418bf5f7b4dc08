"""Latency benchmark: cost of a full step and of a skipped step per method, in one process.

`python -m foca_bench.bench_latency [--batch 16 64] [--repeats 3]` (`make bench`) prints, for the shipped toy_dit
and each batch size, the measured time of a full step, of a skipped step for each method (from a run with a
single full step), and the ratio of FoCa N=5's latency speed-up to its FLOPs speed-up. Figures, not assertions:
speed targets are read here, never timed in tests. On a CPU the ratio grows with the batch: a skipped step
still runs the per-block conditioning MLPs, the gates and residual adds, whose fixed per-op cost weighs more
against a small batch's full step.
"""

import argparse
import statistics

import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import compose, schedule_full_steps, validate
from foca_bench.hooks import CacheEngine
from foca_bench.profiling import count_flops, time_once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    cfg = compose()
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    for batch in args.batch:
        bench(adapter, cfg, batch, args.steps, args.repeats)


def bench(adapter, cfg, batch: int, steps: int, repeats: int) -> None:
    labels, noise = torch.arange(batch) % 10, adapter.make_noise(list(range(batch)))
    device = torch.device("cpu")

    def run(cache: dict, batch_labels=labels, batch_noise=noise) -> None:
        with CacheEngine(methods.build({"warmup": 1, **cache}), adapter.sites()) as engine:
            adapter.generate(engine, batch_labels, batch_noise, steps, cfg.sampler.guidance_scale)

    def median(cache: dict) -> float:
        run(cache)
        return statistics.median(time_once(lambda: run(cache), device) for _ in range(repeats))

    T = steps
    full = median({"name": "none"}) / T
    print(f"\ntoy_dit, batch {batch} (CFG batch {2 * batch}), {T} DDIM steps, {torch.get_num_threads()} threads")
    print(f"full step:              {1e3 * full:7.2f} ms")
    for name in ("reuse", "fora", "taylorseer", "foca"):
        one_full = median({"name": name, "N": 10 * T, "warmup": 1})  # steps 0 and 1 full, the rest skipped
        print(f"skipped step, {name:10s}{1e3 * (one_full - 2 * full) / (T - 2):7.2f} ms")
    foca5 = {"name": "foca", "N": 5, "warmup": 1}
    none_t, foca_t = [], []
    for _ in range(repeats):  # interleaved, as the runner does
        none_t.append(time_once(lambda: run({"name": "none"}), device))
        foca_t.append(time_once(lambda: run(foca5), device))
    latency_speedup = statistics.median(none_t) / statistics.median(foca_t)
    one = (torch.tensor([0]), noise[:1])
    flops_speedup = count_flops(lambda: run({"name": "none"}, *one)) / count_flops(lambda: run(foca5, *one))
    n_full = schedule_full_steps(methods.build(foca5).cfg, T)
    print(f"FoCa N=5 ({n_full}/{T} full): FLOPs speed-up {flops_speedup:.2f}x, latency speed-up "
          f"{latency_speedup:.2f}x, ratio {latency_speedup / flops_speedup:.2f}")


if __name__ == "__main__":
    main()
