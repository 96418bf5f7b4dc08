"""FLOP and latency profiling of one generation.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the whole denoising loop, full and skipped steps alike
(the decoder is excluded, as in the paper's tables). CPU scaled-dot-product attention is counted through a
registered formula where the installed torch does not count it. Latency: median wall time over repeats after a
warm-up, with CUDA events and synchronisation on a GPU, repeated until the samples agree (`SPREAD`) or a time cap
passes; every sample is kept, and `latency_mark` marks a cell whose samples still spread, or whose speed-up beats
its FLOPs speed-up beyond the noise. Speed-ups are always against `method=none` under the same config in the
same run: latency interleaved with the baseline (`profile`).
"""

import ctypes
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

import methods
from methods.base import CacheConfig


def _ensure_cpu_attention_formula() -> None:
    """Registers FLOPs for `aten._scaled_dot_product_flash_attention_for_cpu` when torch counts it as 0."""
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_registry or op in flop_registry:
        return

    @register_flop_formula(op, get_raw=True)
    def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs) -> int:  # (B, H, S, D) inputs
        return sdpa_flop_count(query.shape, key.shape, value.shape)


_ensure_cpu_attention_formula()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = {"mmap_threshold": (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's maximum on 64-bit
                    "trim_threshold": (_M_TRIM_THRESHOLD, 1 << 30), "top_pad": (_M_TOP_PAD, 64 << 20)}


def tune_cpu_allocator() -> Optional[dict]:
    """Keeps freed activation buffers in glibc's heap instead of handing them back to the kernel.

    With glibc's defaults every large tensor is a fresh `mmap` that page-faults on first touch and is
    `munmap`ed when freed, so each full step pays the kernel for its attention and MLP intermediates again (a
    quarter of the toy demo's time was system time). That slows the full-compute baseline more than a cached
    run and would flatter every speed-up; measured on toy_dit (batch 16, 2 cores) a full step went from ~50-65
    ms to ~41 ms. PyTorch's CPU tuning guide recommends jemalloc/tcmalloc for the same reason; this does it
    in-process with `mallopt`. Freed memory stays with the process (its peak), which suits one-run processes.

    Returns:
        The settings applied ({name: bytes}), or None where the C library is not glibc (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    applied = {name: value for name, (param, value) in _MALLOC_SETTINGS.items() if mallopt(param, value) == 1}
    return applied or None


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of `fn()` (matmuls, convolutions and attention; elementwise ops are not counted), run eagerly:
    compiled code (`model.compile`) would hide its kernels from the counter."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call: CUDA events with synchronisation on a GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# A latency measurement repeats until its samples spread (interquartile range / median) at most SPREAD, or
# TIME_CAP_S has passed since its first timed run; a table marks what is still wider (`latency_mark`).
SPREAD = 0.05
TIME_CAP_S = 30.0
NOISY, BEYOND_FLOPS = "†", "§"  # `latency_mark`'s marks; README.md says what they mean


def spread(samples: Sequence[float]) -> float:
    """Interquartile range / median of timings (0 for one sample): the noise of a median, which one load spike
    among several samples does not dominate (for 3 samples it is half of (max - min) / median)."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times),
            "spread": spread(times), "samples_s": list(times)}


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3,
                        max_spread: float = SPREAD, time_cap_s: float = TIME_CAP_S) -> dict[str, dict]:
    """Wall times of several functions in rounds (A, B, C, A, B, C, ...), so machine drift cancels in their ratios:
    at least `repeats` rounds, then more until every function's samples spread at most `max_spread` or
    `time_cap_s` has passed since the first timed round; `warmup` untimed rounds first. Every sample is kept.

    Returns:
        Per name, {"median_s", "min_s", "max_s", "repeats", "spread", "samples_s"}: the i-th samples of all
        functions come from round i (pairs for `latency_mark`).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    while True:
        counted = len(next(iter(times.values())))
        if counted >= repeats and (all(spread(t) <= max_spread for t in times.values())
                                   or time.perf_counter() - started >= time_cap_s):
            break
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return {name: _stats(t) for name, t in times.items()}


def measure_latency(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3,
                    max_spread: float = SPREAD, time_cap_s: float = TIME_CAP_S) -> dict:
    """Median and spread of `fn()`'s wall time (`measure_interleaved` of one function)."""
    return measure_interleaved({"fn": fn}, device, warmup, repeats, max_spread, time_cap_s)["fn"]


def measure_latency_pair(fn: Callable[[], object], baseline: Callable[[], object], device: torch.device,
                         warmup: int = 1, repeats: int = 3, max_spread: float = SPREAD,
                         time_cap_s: float = TIME_CAP_S) -> tuple[dict, dict]:
    """Latency of `fn` and of `baseline`, interleaved (B, A, B, A, ...; `measure_interleaved`).

    Returns:
        (stats of fn, stats of baseline); the i-th samples of the two form a pair.
    """
    stats = measure_interleaved({"baseline": baseline, "fn": fn}, device, warmup, repeats, max_spread, time_cap_s)
    return stats["fn"], stats["baseline"]


def latency_mark(mine_s: Sequence[float], base_s: Sequence[float], flops_speedup: Optional[float] = None,
                 max_spread: float = SPREAD) -> str:
    """The mark a latency cell gets from its samples (pure: timings in, mark out; every table builder calls it).

    Args:
        mine_s: the row's timings; base_s: the baseline's, paired with them (interleaved), or the same list for the
            baseline row itself.
        flops_speedup: the row's FLOPs speed-up over the same baseline, if known.
        max_spread: the largest `spread` (interquartile range / median) a cell's samples may have.

    Returns:
        `NOISY` (†) when either side's samples spread more than `max_spread` (`spread`), plus `BEYOND_FLOPS` (§)
        when the lower quartile of the paired latency speed-ups (baseline_i / row_i) exceeds the FLOPs speed-up:
        a speed-up beyond what the work removed, and beyond the noise, which a measurement artefact (load, a cold
        baseline) explains; '' else.
    """
    mark = NOISY if max(spread(mine_s), spread(base_s)) > max_spread else ""
    if flops_speedup is not None and len(mine_s) == len(base_s) and mine_s:
        paired = [b / m for b, m in zip(base_s, mine_s)]
        low = statistics.quantiles(paired, n=4, method="inclusive")[0] if len(paired) > 1 else paired[0]
        if low > flops_speedup:
            mark += BEYOND_FLOPS
    return mark


_BASELINE_FLOPS: dict[str, int] = {}


def baseline_sampler(sampler: Any, settings: Any) -> Any:
    """`sampler` with the step count of the full-compute baseline of every speed-up (`profile.baseline_steps`)."""
    return dataclasses.replace(sampler, steps=settings.baseline_steps or sampler.steps)


def is_baseline(cache: CacheConfig, sampler: Any, settings: Any) -> bool:
    """Whether a run is itself the full-compute baseline (then it is measured, not compared)."""
    return cache.name == "none" and baseline_sampler(sampler, settings).steps == sampler.steps


def profile(adapter: Any, cache: CacheConfig, sampler: Any, settings: Any, device: str) -> dict:
    """The record's `profile` block: flops, latency_s, and speed-ups against `none` under the same config at
    `profile.baseline_steps` steps (so `method=none sampler.steps=25` is the paper's 2x "DDIM-25 steps" row).

    Latency is measured interleaved with the `none` baseline in this run (so drift of a shared machine cancels
    in the ratio) on a batch of `profile.batch_size`, median of `profile.repeats` after `profile.warmup`.

    Args:
        sampler: the run's `SamplerConfig`; settings: its `profile` config.
    """
    from foca_bench.generation import generate_examples

    none = methods.get("none").config_class()
    base = baseline_sampler(sampler, settings)
    baseline = is_baseline(cache, sampler, settings)
    block: dict[str, Any] = {"baseline": {"method": "none", "steps": base.steps}}
    if settings.flops:
        block["flops"] = count_flops(lambda: generate_examples(adapter, cache, sampler, 1))
        key = json.dumps([OmegaConf.to_container(adapter.cfg, resolve=True), dataclasses.asdict(base)], default=str)
        if not baseline and key not in _BASELINE_FLOPS:  # deterministic: counted once per process
            _BASELINE_FLOPS[key] = count_flops(lambda: generate_examples(adapter, none, base, 1))
        block["flops_none"] = block["flops"] if baseline else _BASELINE_FLOPS[key]
        block["flops_speedup"] = block["flops_none"] / block["flops"]
    if settings.latency and adapter.device.type != "meta":
        b = settings.batch_size
        run_method = lambda: generate_examples(adapter, cache, sampler, b)
        args = (torch.device(device), settings.warmup, settings.repeats)
        if baseline:
            mine = other = measure_latency(run_method, *args)
        else:
            mine, other = measure_latency_pair(run_method, lambda: generate_examples(adapter, none, base, b), *args)
        block.update(latency_s=mine["median_s"], latency_none_s=other["median_s"],
                     latency_speedup=other["median_s"] / mine["median_s"],
                     latency_detail={**mine, "batch_size": b, "none": other, "protocol": "interleaved with none"})
        if methods.get(cache.name).latency_note:
            block["latency_note"] = methods.get(cache.name).latency_note
    return block
