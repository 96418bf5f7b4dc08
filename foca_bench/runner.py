"""One run, one path, for every benchmark: validate -> plan samples -> generate the missing ones -> pack ->
profile -> score -> record.

A benchmark is data (its ordered samples, each with a seed and a condition) and a scoring function
(`foca_bench.benchmarks.Benchmark`). Samples are files in a folder keyed by what decides them, generated in shards
that skip the files already on disk (`foca_bench.samples`); whichever job finds the set complete packs it, profiles,
scores and writes the one record. Speed-ups are measured against `method=none` under the same config in the same
process (`foca_bench.profiling`). A benchmark that measures fidelity to full compute reads the samples of
`method=none` at `profile.baseline_steps` with the same seeds: that run's own folder, generated here if missing, so
every cached run of a sweep is compared with the very same baseline samples.
"""

import copy
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import methods
from foca_bench.adapters import ADAPTERS
from foca_bench.adapters.base import Adapter
from foca_bench.benchmarks import Benchmark, build_benchmark
from foca_bench.config import SamplerConfig, validate
from foca_bench.generation import generate, generate_examples, get_adapter, resolve_device
from foca_bench.identity import identity, inputs, run_id, samples_key
from foca_bench.memory import plan_run
from foca_bench.profiling import baseline_sampler, profile, tune_cpu_allocator
from foca_bench.records import (atomic_write, atomic_write_json, claim, describe_claim, environment, finite, git_commit,
                                read_record, record_path)
from foca_bench.samples import IncompleteSamples, SampleStore, batches, resolve_shard
from foca_bench.significance import externalize
from foca_bench.tracking import log_run
from methods.base import CacheConfig

log = logging.getLogger("foca_bench")

MEMORY_NOTE = ("cache_bytes_peak: the feature cache the method held at its peak, per generation batch; "
               "device_peak_bytes: the accelerator's peak allocated memory while generating (CUDA only)")


@dataclass(frozen=True)
class Run:
    """Everything one run is, built once by `prepare` and handed along instead of loose arguments.

    Attributes:
        cfg: the validated config (read-only).
        cache, sampler: the method's and the sampler's config dataclasses.
        benchmark: the benchmark, its files checked; None when `profile.benchmark=false` (profiling only).
        identity: what defines the run (`foca_bench.identity.identity`), its input files' hashes included.
        inputs: {name: {"path", "sha256"}} of every input file the run reads.
        id: the run id; record: the record's path; samples: the sample folder (None without a benchmark).
        device: the resolved torch device; started: `time.perf_counter()` at the start.
    """

    cfg: DictConfig
    cache: CacheConfig
    sampler: SamplerConfig
    benchmark: Optional[Benchmark]
    identity: dict
    inputs: dict
    id: str
    record: Path
    samples: Optional[Path]
    device: str
    started: float

    @property
    def name(self) -> str:
        """The benchmark's name, `flops` for a profiling-only run: the first folder of the record's path."""
        return self.benchmark.name if self.benchmark else "flops"


def prepare(cfg: DictConfig) -> Run:
    """Validates the config, checks the benchmark's files and model (nothing has run yet), hashes the inputs and
    names the run."""
    started = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cache = validate(cfg)
    benchmark = build_benchmark(cfg.benchmark, cfg.model) if cfg.profile.benchmark else None
    if benchmark is not None and cfg.model.name in ADAPTERS:
        benchmark.check_model(ADAPTERS[cfg.model.name])
    found = inputs(cfg, benchmark)
    ident = identity(cfg, cache, found)
    rid = run_id(ident)
    name = benchmark.name if benchmark else "flops"
    results = Path(cfg.results_dir)
    samples = results / "samples" / name / cfg.model.name / cache.name / samples_key(ident) if benchmark else None
    OmegaConf.set_readonly(cfg, True)
    return Run(cfg, cache, OmegaConf.to_object(cfg.sampler), benchmark, ident, found, rid,
               record_path(results, name, cfg.model.name, cache.name, rid), samples, resolve_device(cfg.device),
               started)


def run(cfg: DictConfig) -> dict:
    """Runs one configuration end to end and writes its record.

    Returns:
        The record (also written to `results/<benchmark>/<model>/<method>/<run_id>.json`), or, for a job that left
        the rest to others, what it did (`skipped`, `pending`).
    """
    r = prepare(cfg)
    if r.record.is_file() and not r.cfg.force:
        log.info(f"Record exists, skipping (force=true reruns): {r.record}")
        return read_record(r.record)
    store = r.benchmark.store(r.samples) if r.benchmark else None
    if store is not None and not store.complete():  # this shard's missing samples; other jobs may run other shards
        shard, num_shards = resolve_shard(r.cfg.benchmark)
        with claim(store.root / f"shard-{shard}-of-{num_shards}.json", r.cfg.claim_timeout_s, r.cfg.force) as holder:
            if holder is not None:
                return _skipped(r, holder, f"generating shard {shard}/{num_shards} of {store.root}")
            fill(r, store, r.cache, r.sampler, shard, num_shards)
    with claim(r.record, r.cfg.claim_timeout_s, r.cfg.force) as holder:  # the merge: one job packs, scores, records
        if holder is not None:
            return _skipped(r, holder, f"scoring {r.record}")
        if r.record.is_file() and not r.cfg.force:  # it finished between our check and our claim
            return read_record(r.record)
        if store is not None and not store.complete():
            try:
                log.info(f"All {len(store.samples)} samples are on disk: {store.pack()}")
            except IncompleteSamples as err:
                log.info(f"This job's shard of <{r.name}> is done; {len(err.missing)} samples of other shards are "
                         "still missing. The job that completes the set packs and scores it.")
                return {"run_id": r.id, "pending": len(err.missing)}
        return write_record(r, store)


def _skipped(r: Run, holder: dict, doing: str) -> dict:
    """What a job returns when another job holds the claim on the work it came to do."""
    log.warning(f"Skipping: another job is {doing}; it holds the claim {describe_claim(holder)}. The claim is "
                "taken over once its heartbeat is older than claim_timeout_s, or now with force=true.")
    return {"run_id": r.id, "skipped": f"another job is {doing}", "holder": holder}


def _adapter(r: Run) -> tuple[Adapter, Optional[dict]]:
    """The run's model (loaded once per process) and the CPU allocator settings applied for it."""
    malloc = tune_cpu_allocator() if r.device == "cpu" and r.cfg.profile.tune_malloc else None
    return get_adapter(r.cfg.model, r.device), malloc


def fill(r: Run, store: SampleStore, cache: CacheConfig, sampler: Any, shard: int = 0, num_shards: int = 1) -> None:
    """Generates this shard's batches whose files are missing or unreadable, writes only those files, and leaves
    an account of the work (`shard-<s>-of-<k>.json`: counts, time, full steps, memory, non-finite samples)."""
    t0 = time.perf_counter()
    grid = batches(len(store.samples), r.cfg.benchmark.batch_size, shard, num_shards)
    todo = {b.start: store.todo(b) for b in tqdm(grid, desc=f"<{r.name}> checking files on disk", unit="batch",
                                                  disable=len(grid) < 50)}
    pending = [b for b in grid if todo[b.start]]
    reused = sum(len(b) - len(todo[b.start]) for b in grid)
    log.info(f"Shard {shard}/{num_shards} of {store.root}: {len(grid)} batches, {len(pending)} to generate, "
             f"{reused} samples on disk")
    info: dict[str, Any] = {"shard": shard, "num_shards": num_shards, "batches": len(grid), "generated": 0,
                            "reused": reused, "host": socket.gethostname(), "pid": os.getpid(),
                            "git_commit": git_commit(), "non_finite": []}
    if pending:
        plan_run(r.cfg, cache, r.device, len(store.samples))  # said before the model loads
        adapter, _ = _adapter(r)
        stats: dict = {}
        samples = store.samples
        work = (([samples[i].seed for i in b], r.benchmark.conditions([samples[i] for i in b])) for b in pending)
        images = generate(adapter, cache, sampler, work, stats, measure_cache=True,
                          desc=f"<{r.name}: {cache.name}> shard {shard}/{num_shards}")
        for batch, b in zip(images, pending):  # the generator first: its last step fills `stats`
            bad = ~torch.isfinite(batch.flatten(1)).all(1)  # NaN/inf would be written as some clamped value
            info["non_finite"] += [b.start + j for j in bad.nonzero().flatten().tolist()]
            info["generated"] += store.write(list(b), r.benchmark.to_files(batch), only=set(todo[b.start]))
        info.update(full_steps=stats["full_steps_per_generation"], cache_bytes_peak=stats["cache_bytes_peak"],
                    device_peak_bytes=stats["device_peak_bytes"])
    info["generation_s"] = time.perf_counter() - t0
    store.write_progress(shard, num_shards, info)


def reference(r: Run) -> SampleStore:
    """The full-compute samples of the run's seeds (`method=none` at `profile.baseline_steps`): that run's own
    folder, generated (whole) when missing."""
    sampler = baseline_sampler(r.sampler, r.cfg.profile)
    ident = {**r.identity, "cache": {"name": "none"}, "sampler": {**r.identity["sampler"], "steps": sampler.steps}}
    store = r.benchmark.store(r.samples.parent.parent / "none" / samples_key(ident))
    if not store.complete():
        fill(r, store, methods.get("none").config_class(), sampler)
        store.pack()
    return store


def write_record(r: Run, store: Optional[SampleStore]) -> dict:
    """Profiles, scores the complete sample store (when the run has a benchmark) and writes the record."""
    plan_run(r.cfg, r.cache, r.device, len(store.samples) if store is not None else 1)  # before the model loads
    adapter, malloc = _adapter(r)
    shards = store.progress() if store is not None else []
    record: dict[str, Any] = {
        "run_id": r.id, "benchmark": r.name, "model": r.cfg.model.name, "method": r.cache.name, "config": r.identity,
        "inputs": r.inputs, "environment": environment(), "world_size": max([p["num_shards"] for p in shards],
                                                                             default=1),
        "device": r.device, "sampler_provenance": adapter.provenance(r.sampler),
        "method_provenance": methods.build(r.cache).provenance(), "malloc": malloc,
        "profile": profile(adapter, r.cache, r.sampler, r.cfg.profile, r.device),
        "samples": {"steps": r.sampler.steps}, "timing": {}}
    faults = []
    if store is not None:
        bad = sorted({i for p in shards for i in p.get("non_finite", [])})
        if bad:  # scores of NaN samples mean nothing, and metric backends can crash on them (FID's sqrtm in MKL)
            faults.append({"field": "samples", "value": "non-finite", "count": len(bad), "indices": bad[:20]})
            log.error(f"{len(bad)} samples are NaN or infinite (first: {bad[:5]}); the run is not scored")
        ref = reference(r) if r.benchmark.needs_reference and not bad else None
        t0 = time.perf_counter()
        if not bad:
            log.info(f"Evaluating <{r.name}> on {len(store.samples)} samples from {store.root}")
        record["metrics"] = {} if bad else r.benchmark.score(store, ref, r.device)
        seeds = [s.seed for s in store.samples]
        record["samples"].update(
            count=len(seeds), seeds=[seeds[0], seeds[-1]], seed_rule="seed + index", folder=str(store.root),
            npz=str(store.npz) if store.packs_npz else None, shards=shards,
            full_steps=next((p["full_steps"] for p in shards if p.get("full_steps") is not None), None))
        record["timing"] = {"generation_s": sum(p["generation_s"] for p in shards),
                            "evaluation_s": time.perf_counter() - t0}
        peak = {k: max([p[k] for p in shards if p.get(k) is not None], default=None)
                for k in ("cache_bytes_peak", "device_peak_bytes")}
        record["memory"] = {**peak, "batch_size": r.cfg.benchmark.batch_size, "note": MEMORY_NOTE}
        images, nrow = r.benchmark.preview(store)
        record["sample_grid"] = str(_save_grid(images, r.record.with_suffix(".png"), nrow))
    if r.cfg.trace:
        record["trace"] = str(save_trace(r, adapter))
    record["timing"]["total_s"] = time.perf_counter() - r.started
    externalize(record, r.record)  # FID/IS features beside the record, for paired comparisons (significance)
    record, found = finite(record)
    if faults + found:
        record["faults"] = faults + found
        log.error(f"Non-finite values in {r.record}: {record['faults']}")
    atomic_write_json(r.record, record)
    log.info(f"Wrote record {r.record}")
    print(summary_line(record))
    try:
        log_run(r.cfg, record, r.record)
    except Exception as err:  # tracking mirrors the record, which is already safe on disk: never fail the run
        log.warning(f"Experiment tracking failed ({type(err).__name__}: {err}); the record is at {r.record}")
    return record


def save_trace(r: Run, adapter: Adapter) -> Path:
    """Per-site trajectories of one sample (the adapter's example condition, seed `benchmark.seed`) as
    safetensors."""
    from safetensors.torch import save_file

    stats: dict = {}
    generate_examples(adapter, r.cache, r.sampler, 1, seed=r.cfg.benchmark.seed, stats=stats, trace=True)
    path = Path(r.cfg.results_dir) / "traces" / r.cfg.model.name / r.cache.name / f"{r.id}.safetensors"
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in stats["trace"].items()}, str(tmp)))
    log.info(f"Wrote trace {path}")
    return path


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    from torchvision.utils import save_image

    atomic_write(path, lambda tmp: save_image(images[: nrow * 10], tmp, nrow=nrow, padding=1, format="png"))
    return path


def summary_line(record: dict) -> str:
    p = record["profile"]
    knobs = ", ".join(f"{k}={v}" for k, v in record["config"]["cache"].items() if k != "name")
    parts = [f"[{record['method']}{' ' + knobs if knobs else ''}]"]
    if p.get("flops") and p.get("flops_speedup"):
        parts.append(f"FLOPs {p['flops'] / 1e12:.4f} T ({p['flops_speedup']:.2f}x)")
    if p.get("latency_s") and p.get("latency_speedup"):
        parts.append(f"latency {p['latency_s']:.3f} s ({p['latency_speedup']:.2f}x)")
    for name, m in record.get("metrics", {}).items():
        if m["value"] is not None and "@" not in name:  # per-category breakdowns stay in the record
            parts.append(f"{name} {m['value']:.4g}")
    if record.get("faults"):
        parts.append(f"FAULTS: {', '.join(f['field'] for f in record['faults'])}")
    return "  ".join(parts)
