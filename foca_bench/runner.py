"""One run: validate the config, profile FLOPs and latency, run the benchmark, write the record.

Speed-ups are measured against `method=none` under the same config in the same process: its FLOPs are counted
once per process (they are deterministic), its latency is measured interleaved with each run's own (machine
drift cancels in the ratio). The full-compute reference samples of a benchmark are cached on
disk under `results/cache/reference/`, keyed by everything that determines them, so every cached run of a sweep
is compared with the very same baseline images.
"""

import copy
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import Adapter
from foca_bench.benchmarks import build_benchmark
from foca_bench.config import LOCAL_BENCHMARK_KEYS, validate
from foca_bench.fused import build_engine
from foca_bench.memory import plan_run
from foca_bench.profiling import count_flops, measure_latency, measure_latency_pair, tune_cpu_allocator
from foca_bench.records import (atomic_write, atomic_write_json, claim, describe_claim, environment, read_record,
                                record_path, run_id)
from foca_bench.samples import IncompleteSamples, SampleStore, batches, shard_from_env
from foca_bench.significance import externalize
from foca_bench.tracking import log_run
from methods.base import CacheConfig

log = logging.getLogger("foca_bench")

_ADAPTERS: dict[str, Adapter] = {}
_BASELINE_FLOPS: dict[str, int] = {}


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def get_adapter(model_cfg: DictConfig, device: str) -> Adapter:
    """Loads a model once per process (a local multirun reuses it across jobs)."""
    key = _key(OmegaConf.to_container(model_cfg, resolve=True), device)
    if key not in _ADAPTERS:
        log.info(f"Instantiating adapter <{model_cfg.name}> ({model_cfg.weights} weights) on {device}")
        adapter = build_adapter(model_cfg, device)
        if model_cfg.get("compile") and model_cfg.weights != "meta":
            log.info(f"<{model_cfg.name}> runs compiled: torch.compile(backend={model_cfg.compile}, "
                     f"mode={model_cfg.get('compile_mode')}), per step or per site module (foca_bench/fused.py)")
        _ADAPTERS[key] = adapter
    return _ADAPTERS[key]


MEMORY_NOTE = ("cache_bytes_peak: the feature cache the method held at its peak, per generation batch; "
               "device_peak_bytes: the accelerator's peak allocated memory while generating (CUDA only)")


def generate_batches(adapter: Adapter, cache: CacheConfig, cfg: DictConfig, labels: torch.Tensor, seeds: list[int],
                     grid: list[range], stats: dict, desc: Optional[str] = None, trace: bool = False,
                     measure_cache: bool = False) -> Iterator[tuple[range, torch.Tensor]]:
    """Generates the batches `grid` (ranges of sample positions in `labels`/`seeds`) with a fresh engine state per
    batch, yielding (batch, images (B, C, H, W) in [0, 1] on CPU, or latents on the meta device).

    When the generator is exhausted, `stats` holds the engine's full steps per generation, the method's peak cache
    bytes when `measure_cache` (off in timed and FLOP-counted runs, which it would only slow) and the trace.
    """
    method = methods.build(cache)
    cuda = measure_cache and adapter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(adapter.device)
    backend = cfg.model.get("compile") if adapter.device.type != "meta" else None
    with build_engine(method, adapter.sites(), backend, cfg.model.get("compile_mode"), trace=trace,
                      measure_cache=measure_cache) as engine:
        for batch in tqdm(grid, desc=desc, disable=desc is None, unit="batch"):
            noise = adapter.make_noise([seeds[i] for i in batch])
            latents = adapter.generate(engine, labels[batch.start : batch.stop], noise, cfg.sampler.steps,
                                       cfg.sampler.guidance_scale, cfg.sampler.guided_channels,
                                       lineage=cfg.sampler.lineage)
            yield batch, (latents if latents.device.type == "meta" else adapter.decode(latents))
        # the engine's counters restart every generation; diffusers' hooks (external methods) do not report theirs
        stats["full_steps_per_generation"] = None if method.external else engine.full_steps
        if measure_cache:
            stats["cache_bytes_peak"] = None if method.external else engine.cache_bytes_peak
            stats["device_peak_bytes"] = torch.cuda.max_memory_allocated(adapter.device) if cuda else None
        if trace:
            stats["trace"] = engine.trace_tensors()


def generate(adapter: Adapter, cache: CacheConfig, cfg: DictConfig, labels: torch.Tensor, seeds: list[int],
             batch_size: int, desc: Optional[str] = None, trace: bool = False,
             measure_cache: bool = False) -> tuple[torch.Tensor, dict]:
    """Generates images for (labels, seeds) in batches of `batch_size` (see `generate_batches`).

    Returns:
        images (N, C, H, W) in [0, 1] on CPU (or latents on the meta device), and engine stats.
    """
    stats: dict = {}
    images = [x for _, x in generate_batches(adapter, cache, cfg, labels, seeds, batches(len(seeds), batch_size),
                                             stats, desc, trace, measure_cache)]
    return torch.cat(images), stats


def _count_flops(adapter: Adapter, cache: CacheConfig, cfg: DictConfig) -> int:
    """FLOPs of one sample's whole denoising loop."""
    return count_flops(lambda: generate(adapter, cache, cfg, torch.tensor([0]), [0], 1))


def _baseline_flops(adapter: Adapter, cfg: DictConfig) -> int:
    """FLOPs of `method=none` under this config (deterministic: counted once per process)."""
    key = _key(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True))
    if key not in _BASELINE_FLOPS:
        _BASELINE_FLOPS[key] = _count_flops(adapter, methods.get("none").config_class(), cfg)
    return _BASELINE_FLOPS[key]


def baseline_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the step count of the full-compute baseline of every speed-up (`profile.baseline_steps`)."""
    base = copy.deepcopy(cfg)
    base.sampler.steps = cfg.profile.baseline_steps or cfg.sampler.steps
    return base


def is_baseline(cache: CacheConfig, cfg: DictConfig) -> bool:
    """Whether this run is itself the full-compute baseline (then it is measured, not compared)."""
    return cache.name == "none" and (cfg.profile.baseline_steps or cfg.sampler.steps) == cfg.sampler.steps


def profile(adapter: Adapter, cache: CacheConfig, cfg: DictConfig, device: str) -> dict:
    """The record's `profile` block: flops, latency_s, and speed-ups against `none` under the same config at
    `profile.baseline_steps` steps (so `method=none sampler.steps=25` is the paper's 2x "DDIM-25 steps" row).

    Latency is measured interleaved with the `none` baseline in this run (so drift of a shared machine cancels
    in the ratio) on a batch of `profile.batch_size`, median of `profile.repeats` after `profile.warmup`.
    """
    block: dict[str, Any] = {}
    none = methods.get("none").config_class()
    base_cfg = baseline_config(cfg)
    baseline = is_baseline(cache, cfg)
    block["baseline"] = {"method": "none", "steps": base_cfg.sampler.steps}
    if cfg.profile.flops:
        block["flops"] = _count_flops(adapter, cache, cfg)
        block["flops_none"] = block["flops"] if baseline else _baseline_flops(adapter, base_cfg)
        block["flops_speedup"] = block["flops_none"] / block["flops"]
    if cfg.profile.latency and adapter.device.type != "meta":
        b = cfg.profile.batch_size
        labels, seeds = torch.arange(b) % max(cfg.model.num_classes, 1), list(range(b))
        run_method = lambda: generate(adapter, cache, cfg, labels, seeds, b)
        args = (torch.device(device), cfg.profile.warmup, cfg.profile.repeats)
        if baseline:
            mine = base = measure_latency(run_method, *args)
        else:
            mine, base = measure_latency_pair(run_method, lambda: generate(adapter, none, base_cfg, labels, seeds, b),
                                              *args)
        block.update(latency_s=mine["median_s"], latency_none_s=base["median_s"],
                     latency_speedup=base["median_s"] / mine["median_s"],
                     latency_detail={**mine, "batch_size": b, "none": base, "protocol": "interleaved with none"})
        if methods.get(cache.name).latency_note:
            block["latency_note"] = methods.get(cache.name).latency_note
    return block


def _reference_path(cfg: DictConfig, device: str, cache_dir: Path) -> Path:
    """Where the full-compute samples of (model, sampler, benchmark, device) are cached."""
    key = _key(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.sampler, resolve=True),
               OmegaConf.to_container(cfg.benchmark, resolve=True), device)
    return cache_dir / f"{run_id({'reference': key})}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def reference_samples(adapter: Adapter, cfg: DictConfig, labels: torch.Tensor, seeds: list[int], device: str,
                      cache_dir: Path) -> torch.Tensor:
    """Full-compute samples with the same seeds, cached on disk (atomically) for the whole sweep."""
    path = _reference_path(cfg, device, cache_dir)
    if path.is_file():
        try:
            return torch.load(path)
        except Exception:  # truncated or corrupt: regenerate rather than use it
            log.warning(f"Reference samples at {path} are unreadable; regenerating them")
    images, _ = generate(adapter, methods.get("none").config_class(), cfg, labels, seeds, cfg.benchmark.batch_size,
                         desc="<reference: none> generating")
    _atomic_save(images, path)
    return images


def identity(cfg: DictConfig, cache: CacheConfig) -> dict:
    """The resolved config that defines a run; schedule fields are dropped for schedule-free methods, and the
    benchmark's machine-local keys (file locations `*_path`, the shard split, metric batch sizes)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if methods.get(cache.name).schedule_free:
        for k in ("N", "warmup", "time"):
            config["cache"].pop(k, None)
    if config["cache"].get("dtype", "unset") is None:  # the default (the model's dtype): ids from before it stay
        config["cache"].pop("dtype")
    for key, value in type(cache).omit_from_identity.items():  # e.g. FoCa's reading=ours: ids from before it stay
        if config["cache"].get(key, "unset") == value:
            config["cache"].pop(key)
    for key in ("compile", "compile_mode"):
        if config["model"].get(key, "unset") is None:  # eager, the default: likewise
            config["model"].pop(key)
    config["model"].pop("tiny", None)  # its values are merged into the model's keys when size=tiny, unused else
    if config["model"].get("size") == "full":
        config["model"].pop("size")
    config["model"].pop("lineage", None)  # only a default: the sampler's lineage is what ran
    if config["sampler"].get("lineage") == "diffusers":  # the lineage every run had before it: ids stay
        config["sampler"].pop("lineage")
    if not cfg.profile.benchmark:
        config.pop("benchmark", None)
    for key in list(config.get("benchmark", {})):  # where files are and how work is split change no sample
        if key in LOCAL_BENCHMARK_KEYS or key.endswith("_path"):
            config["benchmark"].pop(key)
    return config


def run(cfg: DictConfig) -> dict:
    """Runs one configuration end to end and writes its record.

    Returns:
        The record (also written to `results/<benchmark>/<model>/<method>/<run_id>.json`).
    """
    started = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cache = validate(cfg)
    config = identity(cfg, cache)
    rid = run_id(config)
    results = Path(cfg.results_dir)
    bench_name = cfg.benchmark.name if cfg.profile.benchmark else "flops"
    path = record_path(results, bench_name, cfg.model.name, cache.name, rid)
    if path.is_file() and not cfg.force:
        log.info(f"Record exists, skipping (force=true reruns): {path}")
        return read_record(path)
    # a missing reference file or metric weight stops the run here, before any model loads or sample is generated
    benchmark = build_benchmark(cfg.benchmark, cfg.model) if cfg.profile.benchmark else None
    if getattr(benchmark, "on_disk", False):
        return _run_on_disk(cfg, cache, config, rid, path, benchmark, started)
    with claim(path, cfg.claim_timeout_s, cfg.force) as holder:  # concurrent jobs of a cell: one computes
        if holder is not None:
            return _skipped(rid, holder, f"computing {path}")
        if path.is_file() and not cfg.force:  # it finished between our check and our claim
            return read_record(path)
        return _compute(cfg, cache, config, rid, path, bench_name, benchmark, started)


def _skipped(rid: str, holder: dict, doing: str) -> dict:
    """What a job returns when another job holds the claim on the work it came to do."""
    log.warning(f"Skipping: another job is {doing}; it holds the claim {describe_claim(holder)}. The claim is "
                "taken over once its heartbeat is older than claim_timeout_s, or now with force=true.")
    return {"run_id": rid, "skipped": f"another job is {doing}", "holder": holder}


def _compute(cfg: DictConfig, cache: CacheConfig, config: dict, rid: str, path: Path, bench_name: str,
             benchmark: Any, started: float) -> dict:
    results = Path(cfg.results_dir)
    device = resolve_device(cfg.device)
    malloc = tune_cpu_allocator() if device == "cpu" and cfg.profile.tune_malloc else None
    plan_run(cfg, cache, device, len(benchmark.samples()[1]) if benchmark else 1)  # said before the model loads
    adapter = get_adapter(cfg.model, device)
    record = _base_record(cfg, cache, config, rid, bench_name, device, adapter, malloc)
    record["profile"] = profile(adapter, cache, cfg, device)

    if benchmark is not None:
        labels, seeds = benchmark.samples()
        t0 = time.perf_counter()
        images, stats = generate(adapter, cache, cfg, labels, seeds, cfg.benchmark.batch_size,
                                 desc=f"<{bench_name}: {cache.name}> generating", measure_cache=True)
        generation_s = time.perf_counter() - t0
        ref_dir = results / "cache" / "reference"
        if is_baseline(cache, cfg):  # its own samples are the reference of the whole sweep
            reference = images
            _atomic_save(images, _reference_path(cfg, device, ref_dir))
        else:  # fidelity is measured against the full-compute original
            reference = reference_samples(adapter, baseline_config(cfg), labels, seeds, device, ref_dir)
        log.info(f"Evaluating <{bench_name}> on {len(images)} samples")
        record["metrics"] = benchmark.evaluate(images, labels, reference)
        record["samples"] = {"count": len(images), "seeds": [seeds[0], seeds[-1]], "seed_rule": "seed + index",
                             "full_steps": stats["full_steps_per_generation"],
                             "steps": cfg.sampler.steps}
        record["timing"] = {"generation_s": generation_s}
        record["memory"] = {"cache_bytes_peak": stats["cache_bytes_peak"], "batch_size": cfg.benchmark.batch_size,
                            "device_peak_bytes": stats["device_peak_bytes"], "note": MEMORY_NOTE}
        grid = path.with_suffix(".png")
        _save_grid(images, grid, nrow=cfg.benchmark.samples_per_class)
        record["sample_grid"] = str(grid)
    else:
        record["timing"] = {}
        record["samples"] = {"steps": cfg.sampler.steps}

    _finish(cfg, adapter, cache, record, path, rid, started)
    return record


def _finish(cfg: DictConfig, adapter: Adapter, cache: CacheConfig, record: dict, path: Path, rid: str,
            started: float) -> None:
    """Trace (when asked), total time, the atomic record write, its summary line and experiment tracking."""
    if cfg.trace:
        record["trace"] = str(save_trace(adapter, cache, cfg, Path(cfg.results_dir), rid))
    record["timing"]["total_s"] = time.perf_counter() - started
    externalize(record, path)  # FID/IS features beside the record, for paired comparisons (foca_bench.significance)
    atomic_write_json(path, record)
    log.info(f"Wrote record {path}")
    print(summary_line(record))
    try:
        log_run(cfg, record, path)
    except Exception as err:  # tracking mirrors the record, which is already safe on disk: never fail the run
        log.warning(f"Experiment tracking failed ({type(err).__name__}: {err}); the record is at {path}")


def _base_record(cfg: DictConfig, cache: CacheConfig, config: dict, rid: str, bench_name: str, device: str,
                 adapter: Adapter, malloc: Optional[dict]) -> dict:
    return {"run_id": rid, "benchmark": bench_name, "model": cfg.model.name, "method": cache.name, "config": config,
            "environment": environment(), "world_size": 1, "device": device,
            "sampler_provenance": adapter.provenance(cfg.sampler), "method_provenance": methods.build(cache).provenance(),
            "malloc": malloc}


def sample_folder(cfg: DictConfig, benchmark: Any, cache: CacheConfig, rid: str) -> Path:
    """`results/samples/<benchmark>/<model>/<method>/<run_id>/`: one file per sample, `samples.npz`, `DONE`."""
    return Path(cfg.results_dir) / "samples" / benchmark.name / cfg.model.name / cache.name / rid


def _run_on_disk(cfg: DictConfig, cache: CacheConfig, config: dict, rid: str, path: Path, benchmark: Any,
                 started: float) -> dict:
    """An on-disk benchmark: this shard generates its batches (skipping those already on disk), then whichever
    process finds every sample present packs the folder, profiles, scores and writes the one record."""
    shard, num_shards = resolve_shard(cfg.benchmark)
    store = benchmark.store(sample_folder(cfg, benchmark, cache, rid))
    device = resolve_device(cfg.device)
    if not store.complete():
        with claim(store.root / f"shard-{shard}-of-{num_shards}.json", cfg.claim_timeout_s, cfg.force) as holder:
            if holder is not None:
                return _skipped(rid, holder, f"generating shard {shard}/{num_shards} of {store.root}")
            _generate_shard(cfg, cache, benchmark, store, shard, num_shards, device)
    with claim(path, cfg.claim_timeout_s, cfg.force) as holder:  # the merge: one process packs and scores
        if holder is not None:
            return _skipped(rid, holder, f"scoring {path}")
        if path.is_file() and not cfg.force:
            return read_record(path)
        if not store.complete():
            try:
                packed = store.pack()
            except IncompleteSamples as err:
                log.info(f"Shard {shard}/{num_shards} of <{benchmark.name}> is done; {len(err.missing)} samples of "
                         "other shards are still missing. The job that completes the set packs and scores it.")
                return {"run_id": rid, "shard": shard, "num_shards": num_shards, "pending": len(err.missing)}
            log.info(f"All {len(store.samples)} samples are on disk: {packed}")
        return _score_on_disk(cfg, cache, config, rid, path, benchmark, store, device, started)


def resolve_shard(bench_cfg: DictConfig) -> tuple[int, int]:
    """`benchmark.shard`/`benchmark.num_shards` when set, else the launcher's rank and world size."""
    if bench_cfg.get("num_shards") is not None:
        return int(bench_cfg.shard or 0), int(bench_cfg.num_shards)
    return shard_from_env()


def _generate_shard(cfg: DictConfig, cache: CacheConfig, benchmark: Any, store: SampleStore, shard: int,
                    num_shards: int, device: str) -> None:
    """Generates this shard's batches whose files are missing or unreadable; writes only those files."""
    t0 = time.perf_counter()
    grid = batches(len(store.samples), cfg.benchmark.batch_size, shard, num_shards)
    todo = {b.start: store.todo(b) for b in tqdm(grid, desc=f"<{benchmark.name}> checking files on disk",
                                                  unit="batch", disable=len(grid) < 50)}
    pending = [b for b in grid if todo[b.start]]
    reused = sum(len(b) - len(todo[b.start]) for b in grid)
    log.info(f"Shard {shard}/{num_shards}: {len(grid)} batches, {len(pending)} to generate, {reused} samples on disk")
    info: dict[str, Any] = {"shard": shard, "num_shards": num_shards, "batches": len(grid), "generated": 0,
                            "reused": reused, "host": socket.gethostname(), "pid": os.getpid()}
    if pending:
        if device == "cpu" and cfg.profile.tune_malloc:
            tune_cpu_allocator()
        plan_run(cfg, cache, device, len(store.samples))
        adapter = get_adapter(cfg.model, device)
        benchmark.prepare(adapter)
        labels, seeds = benchmark.conditions(store.samples)
        stats: dict = {}
        for batch, images in generate_batches(adapter, cache, cfg, labels, seeds, pending, stats,
                                              desc=f"<{benchmark.name}: {cache.name}> shard {shard}/{num_shards}",
                                              measure_cache=True):
            info["generated"] += store.write(list(batch), benchmark.to_files(images), only=set(todo[batch.start]))
        info.update(full_steps=stats["full_steps_per_generation"], cache_bytes_peak=stats["cache_bytes_peak"],
                    device_peak_bytes=stats["device_peak_bytes"])
    info["generation_s"] = time.perf_counter() - t0
    store.write_progress(shard, num_shards, info)


def _score_on_disk(cfg: DictConfig, cache: CacheConfig, config: dict, rid: str, path: Path, benchmark: Any,
                   store: SampleStore, device: str, started: float) -> dict:
    malloc = tune_cpu_allocator() if device == "cpu" and cfg.profile.tune_malloc else None
    adapter = get_adapter(cfg.model, device)
    benchmark.prepare(adapter)  # a text model's prompts, for the profiled runs
    record = _base_record(cfg, cache, config, rid, benchmark.name, device, adapter, malloc)
    shards = store.progress()
    record["world_size"] = max([p["num_shards"] for p in shards], default=1)
    record["profile"] = profile(adapter, cache, cfg, device)
    t0 = time.perf_counter()
    log.info(f"Evaluating <{benchmark.name}> on {len(store.samples)} samples from {store.root}")
    record["metrics"] = benchmark.evaluate(store, device)
    seeds = [s.seed for s in store.samples]
    record["samples"] = {"count": len(store.samples), "seeds": [seeds[0], seeds[-1]], "seed_rule": "seed + index",
                         "folder": str(store.root), "npz": str(store.npz) if store.packs_npz else None,
                         "steps": cfg.sampler.steps,
                         "full_steps": next((p.get("full_steps") for p in shards if p.get("full_steps")), None),
                         "shards": shards}
    record["timing"] = {"generation_s": sum(p["generation_s"] for p in shards), "evaluation_s":
                        time.perf_counter() - t0}
    _save_grid(benchmark.preview(store), path.with_suffix(".png"), nrow=8)  # the first samples, beside the record
    record["sample_grid"] = str(path.with_suffix(".png"))
    peak = {k: max([p[k] for p in shards if p.get(k) is not None], default=None)
            for k in ("cache_bytes_peak", "device_peak_bytes")}
    record["memory"] = {**peak, "batch_size": cfg.benchmark.batch_size, "note": MEMORY_NOTE}
    _finish(cfg, adapter, cache, record, path, rid, started)
    return record


def save_trace(adapter: Adapter, cache: CacheConfig, cfg: DictConfig, results: Path, rid: str) -> Path:
    """Per-site trajectories of one sample (class 0, seed `benchmark.seed`) as safetensors."""
    from safetensors.torch import save_file

    _, stats = generate(adapter, cache, cfg, torch.tensor([0]), [cfg.benchmark.seed], 1, trace=True)
    path = results / "traces" / cfg.model.name / cache.name / f"{rid}.safetensors"
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in stats["trace"].items()}, str(tmp)))
    log.info(f"Wrote trace {path}")
    return path


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    if images.device.type == "meta":
        return
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_image(images[: nrow * 10], tmp, nrow=nrow, padding=1, format="png"))


def summary_line(record: dict) -> str:
    p = record["profile"]
    cache = record["config"]["cache"]
    knobs = ", ".join(f"{k}={v}" for k, v in cache.items() if k != "name")
    parts = [f"[{record['method']}{' ' + knobs if knobs else ''}]"]
    if "flops" in p:
        parts.append(f"FLOPs {p['flops'] / 1e12:.4f} T ({p['flops_speedup']:.2f}x)")
    if "latency_s" in p:
        parts.append(f"latency {p['latency_s']:.3f} s ({p['latency_speedup']:.2f}x)")
    for name, m in record.get("metrics", {}).items():
        if m["value"] is not None and "@" not in name:  # per-category breakdowns stay in the record
            parts.append(f"{name} {m['value']:.4g}")
    return "  ".join(parts)
