"""Generation with a caching method: batches of (seeds, conditions) through a model adapter and the engine.

Every generation starts from a clean engine state (STYLE 8); a sample's noise comes from its own seed, so it does
not depend on its batch. Conditions (class labels, prompts, low-resolution images) are call arguments of
`Adapter.generate`, never attributes set on the adapter.
"""

import json
import logging
from typing import Any, Iterable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import Adapter
from foca_bench.fused import build_engine
from methods.base import CacheConfig

log = logging.getLogger("foca_bench")

_ADAPTERS: dict[str, Adapter] = {}
Batch = tuple[list[int], dict]  # (seeds, the keyword arguments of `Adapter.generate` that condition the samples)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def get_adapter(model_cfg: DictConfig, device: str) -> Adapter:
    """Loads a model once per process (a local multirun reuses it across jobs)."""
    key = json.dumps([OmegaConf.to_container(model_cfg, resolve=True), device], sort_keys=True, default=str)
    if key not in _ADAPTERS:
        log.info(f"Instantiating adapter <{model_cfg.name}> ({model_cfg.weights} weights) on {device}")
        adapter = build_adapter(model_cfg, device)
        if model_cfg.get("compile") and model_cfg.weights != "meta":
            log.info(f"<{model_cfg.name}> runs compiled: torch.compile(backend={model_cfg.compile}, "
                     f"mode={model_cfg.get('compile_mode')}), per step or per site module (foca_bench/fused.py)")
        _ADAPTERS[key] = adapter
    return _ADAPTERS[key]


def generate(adapter: Adapter, cache: CacheConfig, sampler: Any, batches: Iterable[Batch],
             stats: Optional[dict] = None, desc: Optional[str] = None, trace: bool = False,
             measure_cache: bool = False) -> Iterator[torch.Tensor]:
    """Generates each batch with a fresh engine state, yielding images (B, C, H, W) in [0, 1] on the CPU (latents on
    the meta device).

    Args:
        sampler: `steps`, `guidance_scale`, `guided_channels`, `lineage` (the `sampler` config, validated).
        stats: filled when the generator is exhausted: the engine's full steps per generation, the method's peak
            cache bytes and the device's peak memory when `measure_cache` (off in timed and FLOP-counted runs,
            which it would only slow), and the trace.
    """
    stats = {} if stats is None else stats
    method = methods.build(cache)
    cuda = measure_cache and adapter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(adapter.device)
    backend = adapter.cfg.get("compile") if adapter.device.type != "meta" else None
    with build_engine(method, adapter.sites(), backend, adapter.cfg.get("compile_mode"), trace=trace,
                      measure_cache=measure_cache) as engine:
        for seeds, conditions in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
            latents = adapter.generate(engine, adapter.make_noise(seeds), sampler.steps, sampler.guidance_scale,
                                       sampler.guided_channels, lineage=sampler.lineage, **conditions)
            yield latents if latents.device.type == "meta" else adapter.decode(latents)
        # the engine's counters restart every generation; diffusers' hooks (external methods) do not report theirs
        stats["full_steps_per_generation"] = None if method.external else engine.full_steps
        if measure_cache:
            stats["cache_bytes_peak"] = None if method.external else engine.cache_bytes_peak
            stats["device_peak_bytes"] = torch.cuda.max_memory_allocated(adapter.device) if cuda else None
        if trace:
            stats["trace"] = engine.trace_tensors()


def generate_examples(adapter: Adapter, cache: CacheConfig, sampler: Any, n: int, seed: int = 0,
                      stats: Optional[dict] = None, trace: bool = False, measure_cache: bool = False) -> torch.Tensor:
    """One batch of `n` samples (seeds `seed`.. `seed + n - 1`) on the adapter's example conditions: profiling and
    traces, which need no benchmark."""
    batch = (list(range(seed, seed + n)), adapter.example_conditions(n))
    return torch.cat(list(generate(adapter, cache, sampler, [batch], stats, trace=trace, measure_cache=measure_cache)))
