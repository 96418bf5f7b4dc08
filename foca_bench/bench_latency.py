"""Latency benchmark (`make bench`): what a full and a skipped step cost per method, eager and compiled, beside
diffusers' TaylorSeerCache, in one table and one record.

`python -m foca_bench.bench_latency` runs, per model (toy_dit at batch 16; DiT-XL/2 at batch 2 with random
weights; tiny FLUX), per mode (`eager`; `compiled`: `model.compile=inductor`, every step of FORA, TaylorSeer,
FoCa and `none` one graph, `foca_bench/fused.py`) and per method:
- the model call of a full step and of a skipped step (medians of per-run medians; probe runs of a few steps,
  interleaved across methods round by round until their spreads settle or `--time-cap` passes);
- FLOPs per full and skipped step (meta-device counts; a skipped step's are the uncached work, ~1% of a full one);
- at the schedule of the speed-up columns (`--N`, 50 steps): the FLOPs speed-up, the latency speed-up projected
  from the step times, and, where whole generations are affordable (not DiT-XL/2 on a CPU), the latency speed-up
  measured end to end, interleaved with `none`; latency/FLOPs ratios of both, cells marked by
  `profiling.latency_mark` (README: 'Latency you can trust').
Peers: diffusers' TaylorSeerCache hook at the same N and order (`method=diffusers_taylorseer`, eager: it is
Python hooks), and any other method listed in `PEERS` (cache-dit's DBCache joins there once the project has
it as a method). The record (`results/bench/bench_<time>.json`) keeps every sample, the machine's
load average before and after, and the table (`.md`).

Figures, not assertions: speed targets are read here, never timed in tests. What a skipped step still runs
(adaLN modulation, gates and residual adds, patch embedding, final layer) is elementwise, memory-bound and counted
as 0 FLOPs, so its share of the time exceeds its share of the FLOPs most on a narrow model (toy_dit: width 128).
"""

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import compose, validate
from foca_bench.fused import allow_many_methods, build_engine
from foca_bench.profiling import (BEYOND_FLOPS, SPREAD, count_flops, latency_mark, measure_interleaved, spread,
                                  tune_cpu_allocator)
from foca_bench.records import atomic_write, atomic_write_json, environment

STEPS = 50
OURS = ("fora", "taylorseer", "foca")
# Other projects' implementations at the same schedule, run eagerly (they are Python hooks), where registered.
# cache-dit's rows (branch cachedit-rows: `method=dbcache` and cache-dit's TaylorSeer) join here with a name, a
# display name and their full-step rule in `full_steps`.
PEERS = ("diffusers_taylorseer",)
NAMES = {"none": "none", "fora": "FORA", "taylorseer": "TaylorSeer", "foca": "FoCa",
         "diffusers_taylorseer": "diffusers TaylorSeerCache"}


@dataclass(frozen=True)
class Model:
    """A benchmarked model: its overrides, batch, probe runs and whether whole generations are timed."""

    key: str
    overrides: tuple[str, ...]
    batch: int
    probe_steps: int  # steps of a method's probe run: `probe_n` interval, warmup `probe_warmup` (2+ full steps)
    probe_n: int
    probe_warmup: int
    none_steps: int  # steps of `none`'s probe run (all full; 2+)
    end_to_end: bool
    rounds: Optional[int] = None  # timing rounds at least (default `--repeats`)


MODELS = {
    "toy_dit": Model("toy_dit", ("model=toy_dit",), 16, 12, 2, 1, 12, True),
    # each probe: full, skipped, ... 8 steps (a full step is seconds on a CPU): TaylorSeer O=2 holds its three
    # factors from the third full step on; two rounds at least
    "dit_xl_2": Model("dit_xl_2", ("model=dit_xl_2", "model.weights=random"), 2, 8, 2, 0, 2, False, 2),
    "flux_tiny": Model("flux_tiny", ("model=flux", "model.size=tiny"), 2, 12, 2, 1, 12, True),
}


def cache_cfg(name: str, N: int, warmup: int, order: int) -> dict:
    return {"name": name, "N": N, "warmup": warmup, **({"O": order} if "taylorseer" in name else {})}


def is_full(cache: dict, i: int, steps: int) -> bool:
    """Whether step i is computed: ours by `CacheMethod.is_full`; diffusers' TaylorSeerCache computes i < d and
    i = d + 1 + kN with d = max(warmup, 1) (tests/test_diffusers_taylorseer.py pins it)."""
    if cache["name"] == "diffusers_taylorseer":
        d = max(cache["warmup"], 1)
        return i < d or (i - d - 1) % cache["N"] == 0
    return methods.build(cache).is_full(i, steps)


def full_steps(cache: dict, steps: int) -> int:
    return sum(is_full(cache, i, steps) for i in range(steps))


class Bench:
    """One model: its adapter, FLOP counts and timing runs."""

    def __init__(self, model: Model, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.cfg = compose(*model.overrides)
        validate(self.cfg)
        self.adapter = build_adapter(self.cfg.model, args.device)
        meta_cfg = compose(*model.overrides, "model.weights=meta")
        self.meta = build_adapter(meta_cfg.model, "meta")
        self.warmup = self.cfg.model.warmup
        self.conditions = self.adapter.example_conditions(model.batch)  # class labels 0.. or example prompts
        self.noise = self.adapter.make_noise(list(range(model.batch)))
        self.guidance = self.cfg.sampler.guidance_scale or self.cfg.model.guidance_scale
        self.device = torch.device(args.device)

    def generate(self, cache: dict, steps: int, backend: Optional[str], on: Any = None,
                 times: Optional[list] = None) -> methods.CacheMethod:
        """One generation; returns the method (its state as the generation left it). With `times`, each step's
        model call is appended as (full, seconds, bytes the method held before it), full by the method's schedule
        (diffusers' hooks skip behind our engine's back)."""
        adapter = on or self.adapter
        n = self.model.batch
        method = methods.build(cache)
        engine = build_engine(method, adapter.sites(), backend, self.args.mode)
        if times is not None:
            engine.step = _timed(engine.step, times, self.device, lambda i: is_full(cache, i, steps),
                                 method.cache_bytes)
        with engine:
            noise = self.noise if on is None else adapter.make_noise(list(range(n)))
            conditions = self.conditions if on is None else adapter.example_conditions(n)
            adapter.generate(engine, noise, steps, self.guidance, **conditions)
        return method

    # -- FLOPs -----------------------------------------------------------------------------------------------
    def flops(self, rows: list[str]) -> dict:
        full = count_flops(lambda: self.generate({"name": "none"}, 2, None, self.meta)) / 2
        skip = {}
        for name in rows:
            if name in OURS:  # 3 steps at interval 99: at least one skipped (FORA's countdown computes the last)
                cache = cache_cfg(name, 99, 0, self.args.order)
                total = count_flops(lambda: self.generate(cache, 3, None, self.meta))
                n_full = full_steps(cache, 3)
                skip[name] = (total - n_full * full) / (3 - n_full)
        skip.update({p: skip.get("taylorseer", 0.0) for p in rows if p in PEERS})  # the same uncached work
        return {"full": full, "skipped": skip}

    # -- per-step times ----------------------------------------------------------------------------------------
    def step_times(self, rows: list[str], backend: Optional[str]) -> dict[str, dict]:
        """Per method, the median model-call time of its full and skipped steps in each probe run, in the steady
        state: steps before which the method holds its whole state (its most bytes in the run; a TaylorSeer
        skipped step after two full steps reads 2 factors, not O+1). A run's first full step apart (`first`: it
        also allocates the method's state, once per generation). `floor`: the time to read once every tensor the
        method holds at the end of a probe (what any skipped step of it must at least stream from memory), taken
        after each probe run, so no method's state outlives its run."""
        m = self.model

        def probe(name: str) -> Callable[[], tuple[list, Optional[float]]]:
            def run() -> tuple[list, Optional[float]]:
                times: list = []
                if name == "none":
                    self.generate({"name": "none"}, m.none_steps, backend, times=times)
                    return times, None
                cache = cache_cfg(name, m.probe_n, m.probe_warmup, self.args.order)
                method = self.generate(cache, m.probe_steps, backend if name in OURS else None, times=times)
                held = method.held_tensors()
                return times, read_time(held, self.device) if held else None

            return run

        runs = {name: probe(name) for name in ["none", *rows]}
        for run in runs.values():  # warm-up (compilation) and a first look
            run()
        samples: dict[str, dict[str, list[float]]] = {name: {"first": [], "full": [], "skipped": []} for name in runs}
        started, rounds = time.perf_counter(), m.rounds or self.args.repeats
        while True:
            done = min(len(s["full"] or s["skipped"]) for s in samples.values())
            settled = all(spread(v) <= SPREAD for s in samples.values() for v in s.values() if v)
            if done >= rounds and (settled or time.perf_counter() - started >= self.args.time_cap):
                break
            for name, run in runs.items():  # one round: every method once
                times, floor = run()
                if floor is not None:
                    samples[name].setdefault("floor", []).append(floor)
                first = next(i for i, (f, _, _) in enumerate(times) if f)
                samples[name]["first"].append(times[first][1])
                steady = max(h for _, _, h in times)
                for kind, full in (("full", True), ("skipped", False)):
                    mine = [s for i, (f, s, h) in enumerate(times) if f == full and i != first and h == steady]
                    if mine:
                        samples[name][kind].append(statistics.median(mine))
        return samples

    # -- whole generations ------------------------------------------------------------------------------------
    def end_to_end(self, rows: list[str], backend: Optional[str]) -> dict[str, dict]:
        N, order = self.args.N, self.args.order
        fns = {"none": lambda: self.generate({"name": "none"}, STEPS, backend)}
        for name in rows:
            on = backend if name in OURS else None
            fns[name] = lambda name=name, on=on: self.generate(cache_cfg(name, N, self.warmup, order), STEPS, on)
        return measure_interleaved(fns, self.device, warmup=1, repeats=self.args.repeats,
                                   time_cap_s=self.args.time_cap)


def _timed(step: Callable[..., Any], times: list, device: torch.device, full: Callable[[int], bool],
           held: Callable[[], int]) -> Callable[..., Any]:
    """`engine.step`, timing the model call inside it as (`full(index)`, seconds, `held()` before it)."""

    @contextmanager
    def timed(index: int, t: float, total: Optional[int] = None) -> Iterator[Any]:
        before = held()
        with step(index, t, total) as plan:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            yield plan
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((full(index), time.perf_counter() - start, before))

    return timed


def read_time(tensors: list[torch.Tensor], device: torch.device) -> float:
    """Seconds to read every tensor once (a sum each: memory-bound, one pass over the data)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for t in tensors:
        t.sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def speedup(full_s: float, method_full_s: float, skip_s: float, n_full: int, first_s: Optional[float] = None,
            none_first_s: Optional[float] = None) -> float:
    """STEPS steps of `none` (its first taking `none_first_s`, default `full_s`) over a method's `n_full` full steps
    (its first taking `first_s`, default `method_full_s`) and STEPS - n_full skipped ones."""
    first_s = method_full_s if first_s is None else first_s
    none_first_s = full_s if none_first_s is None else none_first_s
    return (none_first_s + (STEPS - 1) * full_s) / (first_s + (n_full - 1) * method_full_s + (STEPS - n_full) * skip_s)


def rows_of(bench: Bench, mode: str, rows: list[str], flops: dict, steps: dict, e2e: Optional[dict]) -> list[dict]:
    """The table rows of one (model, mode): `none` first, then each method at N."""
    N, order = bench.args.N, bench.args.order
    med = {name: {k: statistics.median(v) if v else None for k, v in s.items()} for name, s in steps.items()}
    full_s, none_first = med["none"]["full"], med["none"]["first"]
    out = [{"model": bench.model.key, "mode": mode, "method": "none", "full_ms": 1e3 * full_s,
            "first_ms": 1e3 * none_first, "full_spread": spread(steps["none"]["full"])}]
    for name in rows:
        cache = cache_cfg(name, N, bench.warmup, order)
        n_full = full_steps(cache, STEPS)
        skip_s, skip_f = med[name]["skipped"], flops["skipped"][name]
        flops_up = STEPS * flops["full"] / (n_full * flops["full"] + (STEPS - n_full) * skip_f)
        row = {"model": bench.model.key, "mode": mode if name in OURS else "eager", "method": name,
               "schedule": f"N={N}" + (f", O={order}" if "taylorseer" in name else ""), "full_steps": n_full,
               "full_ms": 1e3 * (med[name]["full"] or full_s), "first_ms": 1e3 * med[name]["first"],
               "skip_ms": 1e3 * skip_s,
               "skip_spread": spread(steps[name]["skipped"]), "skip_time": skip_s / full_s,
               "skip_flops": skip_f / flops["full"], "flops_speedup": flops_up,
               "projected": speedup(full_s, med[name]["full"] or full_s, skip_s, n_full, med[name]["first"],
                                    none_first)}
        floor_s = med[name].get("floor")
        if floor_s is not None:  # full steps at `none`'s cost, skipped steps that only read the held tensors
            row.update(floor_ms=1e3 * floor_s, bound=speedup(full_s, full_s, floor_s, n_full) / flops_up)
        if e2e is not None:
            mine, base = e2e[name]["samples_s"], e2e["none"]["samples_s"]
            row.update(measured=e2e["none"]["median_s"] / e2e[name]["median_s"], measured_samples=mine,
                       none_samples=base, mark=latency_mark(mine, base, flops_up))
        out.append(row)
    return out


def projected_mark(row: dict) -> str:
    """§ on a projected speed-up above the FLOPs one: step times of different probe runs disagree (noise)."""
    return BEYOND_FLOPS if row["projected"] > row["flops_speedup"] else ""


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = ["Model", "Method", "Schedule", "Mode", "Full step ms (first)", "Skipped step ms (spread)", "Skip/full time",
            "Skip/full FLOPs", "Read floor ms (bound)", "FLOPs speed-up", "Latency projected (ratio)",
            "Latency measured (ratio)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["method"] == "none":
            cells = [r["model"], "none", "—", r["mode"],
                     f"{r['full_ms']:.1f} ({r['first_ms']:.1f}); spread {100 * r['full_spread']:.0f}%"]
            lines.append("| " + " | ".join(cells + ["—"] * 7) + " |")
            continue
        ratio = lambda x: f"{x:.2f}x ({x / r['flops_speedup']:.2f})"  # noqa: E731
        measured = ratio(r["measured"]) + r["mark"] if "measured" in r else "—"
        cells = [r["model"], NAMES[r["method"]], r["schedule"], r["mode"], f"{r['full_ms']:.1f} ({r['first_ms']:.1f})",
                 f"{r['skip_ms']:.2f} ({100 * r['skip_spread']:.0f}%)", f"{100 * r['skip_time']:.1f}%",
                 f"{100 * r['skip_flops']:.2f}%",
                 f"{r['floor_ms']:.2f} ({r['bound']:.2f})" if "floor_ms" in r else "—",
                 f"{r['flops_speedup']:.2f}x", ratio(r["projected"]) + projected_mark(r), measured]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"Speed-up columns: {STEPS} steps at the schedule shown, against `none` in the same mode (peers, eager: "
        "against eager `none`). Projected: from the step times (model calls only); measured: whole generations "
        "interleaved with `none`, medians. (ratio) = latency speed-up / FLOPs speed-up.",
        "Read floor: the time to read once every tensor the method holds (a sum each), the least a skipped step "
        "streams from memory; (bound) = the latency/FLOPs ratio of a method whose full steps cost `none`'s and whose "
        "skipped steps only read its held tensors. "
        "Full step: a probe run's full steps after its first (first: the first full step of a run, which also "
        "allocates the method's state; the projection counts it once per generation). "
        f"Step times: medians over probe runs interleaved round by round; spread = interquartile range / median of "
        f"the runs' medians. Marks: † samples spread more than {SPREAD:.0%}; § the paired speed-ups' lower quartile "
        "exceeds the FLOPs speed-up (an artefact; on a projection: it exceeds the FLOPs speed-up, i.e. the full-step "
        "times of different probe runs disagree by more than the work skipped). DiT-XL/2 runs random weights "
        "(timing does not depend on their values); its whole generations are not timed on a CPU (minutes each): its "
        "ratio is projected.",
    ]
    return "\n".join(lines + [""] + notes) + "\n"


def targets(rows: list[dict], N: int) -> list[str]:
    """The issue's target figures, read off the rows (measured where whole generations were timed, else
    projected): FoCa's latency/FLOPs ratio per model and mode, and our TaylorSeer's latency speed-up over
    diffusers' TaylorSeerCache's at the same schedule."""
    def speed(r: dict) -> tuple[float, str]:
        return (r["measured"], "measured") if "measured" in r else (r["projected"], "projected")

    lines = []
    by = {(r["model"], r["method"], r["mode"]): r for r in rows}
    for (model, method, mode), r in by.items():
        if method == "foca":
            up, how = speed(r)
            bound = f"; bound by its held tensors' read time {r['bound']:.2f}" if "bound" in r else ""
            lines.append(f"FoCa N={N} on {model}, {mode}: latency/FLOPs {up / r['flops_speedup']:.2f} ({how}){bound}")
    for (model, method, mode), r in by.items():
        peer = by.get((model, "diffusers_taylorseer", "eager"))
        if method == "taylorseer" and peer is not None:
            (ours, how), (theirs, _) = speed(r), speed(peer)
            lines.append(f"TaylorSeer N={N} on {model}: ours {mode} {ours:.2f}x / diffusers' eager {theirs:.2f}x = "
                         f"{ours / theirs:.2f} ({how})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    parser.add_argument("--mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--N", type=int, default=5, help="interval of the speed-up columns")
    parser.add_argument("--order", type=int, default=2, help="TaylorSeer's order")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many rounds of each measurement")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds of timing rounds beyond the minimum")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()
    malloc = tune_cpu_allocator() if args.device == "cpu" else None
    allow_many_methods()  # every method's graphs on one model in this process
    started, load = time.perf_counter(), os.getloadavg()
    print(f"<bench> {torch.get_num_threads()} threads, load average {load[0]:.1f}, malloc {malloc or 'default'}")
    rows, record = [], {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
                        "threads": torch.get_num_threads(), "malloc": malloc, "load_before": load, "models": {}}
    for key in args.models:
        bench = Bench(MODELS[key], args)
        peers = [p for p in PEERS if p in methods.METHODS]
        flops = bench.flops([*OURS, *peers])
        record["models"][key] = {"flops": flops, "batch": bench.model.batch, "modes": {}}
        for mode in args.modes:
            backend = args.backend if mode == "compiled" else None
            listed = [*OURS, *(peers if mode == "eager" else [])]
            print(f"<bench> {key} {mode}: per-step probes", flush=True)
            steps = bench.step_times(listed, backend)
            e2e = None
            if bench.model.end_to_end:
                print(f"<bench> {key} {mode}: whole generations", flush=True)
                e2e = bench.end_to_end(listed, backend)
            rows += rows_of(bench, mode, listed, flops, steps, e2e)
            record["models"][key]["modes"][mode] = {"steps": steps, "end_to_end": e2e}
    record.update(rows=rows, load_after=os.getloadavg(), seconds=time.perf_counter() - started)
    text = table(rows, args) + "\n" + "\n".join(targets(rows, args.N)) + "\n"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench_{stamp}.json"
    atomic_write_json(path, record)
    atomic_write(path.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text)
    print(f"<bench> {record['seconds']:.0f} s, load average {load[0]:.1f} -> {record['load_after'][0]:.1f}; "
          f"record {path}")


if __name__ == "__main__":
    main()
