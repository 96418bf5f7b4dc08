"""FLOP and latency profiling of one generation.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the whole denoising loop, full and skipped steps alike
(the decoder is excluded, as in the paper's tables). CPU scaled-dot-product attention is counted through a
registered formula where the installed torch does not count it. Latency: median wall time over repeats after a
warm-up, with CUDA events and synchronisation on a GPU. Speed-ups are always against `method=none` under the
same config, measured in the same process (see `runner.baseline_profile`).
"""

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


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


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of `fn()` (matmuls, convolutions and attention; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure_latency(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> dict:
    """Median and spread of `fn()`'s wall time, after `warmup` untimed runs.

    Returns:
        {"median_s", "min_s", "max_s", "repeats"}.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}
