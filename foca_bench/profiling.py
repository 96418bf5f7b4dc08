"""FLOP and latency profiling of one generation.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the whole denoising loop, full and skipped steps alike
(the decoder is excluded, as in the paper's tables). CPU scaled-dot-product attention is counted through a
registered formula where the installed torch does not count it. Latency: median wall time over repeats after a
warm-up, with CUDA events and synchronisation on a GPU. Speed-ups are always against `method=none` under the
same config in the same run: latency interleaved with the baseline (`profile`).
"""

import ctypes
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional

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
    """Total FLOPs of `fn()` (matmuls, convolutions and attention; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
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


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def measure_latency(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> dict:
    """Median and spread of `fn()`'s wall time, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    return _stats([time_once(fn, device) for _ in range(repeats)])


def measure_latency_pair(fn: Callable[[], object], baseline: Callable[[], object], device: torch.device,
                         warmup: int = 1, repeats: int = 3) -> tuple[dict, dict]:
    """Latency of `fn` and of `baseline`, interleaved (B, A, B, A, ...) so machine drift cancels in the ratio.

    Returns:
        (stats of fn, stats of baseline), each {"median_s", "min_s", "max_s", "repeats"}.
    """
    for _ in range(warmup):
        baseline()
        fn()
    mine, base = [], []
    for _ in range(repeats):
        base.append(time_once(baseline, device))
        mine.append(time_once(fn, device))
    return _stats(mine), _stats(base)


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
    return block
