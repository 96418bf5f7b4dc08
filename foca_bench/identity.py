"""A run's identity: everything that decides what it computes, and the run id hashed from it.

`identity` is the resolved config without what says where things are or how work is split (paths, results
folder, device, logger, shards, metric batch sizes) and without the knobs a method ignores, plus the content hash
of every input file the run reads (`inputs`: the model's weights config and index files, a benchmark's prompt
list, reference batch or ground truth and metric weights, a method's `*_path` files). So a changed input is a new
run id, while the same inputs at another path are the same run. The record keeps each input's path and hash.
"""

import hashlib
import json
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

import methods
from methods.base import CacheConfig

# Keys that say where things are, not what was computed: excluded from a run's identity at every level.
PATH_KEYS = {"path", "results_dir", "force", "device", "logger", "claim_timeout_s"}
# What decides a run's samples (not how they are profiled, traced or logged): their folder's key.
SAMPLE_BLOCKS = ("model", "cache", "sampler", "benchmark", "inputs")


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if k not in PATH_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def run_id(identity: dict) -> str:
    """Short hash of a run's identity (paths removed)."""
    blob = json.dumps(_strip(identity), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def samples_key(identity: dict) -> str:
    """The id of a run's samples: runs that differ only in profiling, tracing or logging share their samples."""
    return run_id({k: identity[k] for k in SAMPLE_BLOCKS if k in identity})


def local_keys(node: DictConfig) -> set[str]:
    """Keys of a config node that say where files are or how work is split: its `*_path` keys and the fields its
    schema marks `metadata={"local": True}` (shards, metric batch sizes, metric environments)."""
    schema = OmegaConf.get_type(node)
    marked = {f.name for f in fields(schema) if f.metadata.get("local")} if schema and hasattr(
        schema, "__dataclass_fields__") else set()
    return marked | {k for k in node if str(k).endswith("_path")}


def identity(cfg: DictConfig, cache: CacheConfig, inputs: Optional[dict[str, dict]] = None) -> dict:
    """The resolved config that defines a run, with `inputs` ({name: {"path", "sha256"}}) as {name: sha256}.

    Dropped: schedule fields of schedule-free methods; defaults that were added after records existed (cache
    dtype, a method's `omit_from_identity` values, model compile and compile_mode, size=full, model.offload=none
    with no memory budget, the diffusers sampler lineage); the unused `model.tiny` block and the model's default
    lineage (the sampler's is what ran);
    the machine-local keys of the benchmark and method (`local_keys`: their files enter through `inputs`); the
    benchmark when none runs (`profile.benchmark`).
    """
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
    if config["model"].get("offload") == "none":  # weights on the device, the default (memory plans): ids stay
        config["model"].pop("offload")
        if config["model"].get("memory_budget_gb", "unset") is None:  # Inf-DiT's own keys were in its ids before
            config["model"].pop("memory_budget_gb")
    if config["sampler"].get("lineage") == "diffusers":  # the lineage every run had before it: ids stay
        config["sampler"].pop("lineage")
    if cfg.profile.benchmark:
        for key in local_keys(cfg.benchmark):
            config["benchmark"].pop(key, None)
    else:
        config.pop("benchmark", None)
    for key in local_keys(cfg.cache):
        config["cache"].pop(key, None)
    if inputs:
        config["inputs"] = {name: item["sha256"] for name, item in sorted(inputs.items())}
    return config


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hashed once per process while its size and modification time stay)."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def digest(files: list[Path], root: Optional[Path] = None) -> str:
    """One SHA-256 over several files: their names (relative to `root`) and contents, in the given order."""
    if len(files) == 1 and root is None:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for path in files:
        h.update(f"{Path(path).relative_to(root) if root else Path(path).name}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def input_item(path: Any, files: Optional[list[Path]] = None) -> dict:
    """{"path", "sha256"} of an input: a file, or the listed `files` of a folder (relative names are hashed)."""
    if files is None:
        return {"path": str(path), "sha256": file_sha256(Path(path))}
    return {"path": str(path), "sha256": digest(files, Path(path))}


def inputs(cfg: DictConfig, benchmark: Any = None) -> dict[str, dict]:
    """Every input file the run reads, by name: the model's weights (config and index files: the weights
    themselves are tens of GB), the benchmark's (`Benchmark.inputs`), and the files of the method's `*_path`
    knobs (a router, a calibration file)."""
    from foca_bench.adapters import ADAPTERS

    found: dict[str, dict] = {}
    if cfg.model.weights == "pretrained" and cfg.model.name in ADAPTERS:
        location, files = ADAPTERS[cfg.model.name].weight_files(cfg.model)
        if files:
            found["weights"] = input_item(location, files)
    if benchmark is not None:
        found.update(benchmark.inputs())
    for key in local_keys(cfg.cache):
        if cfg.cache[key]:
            found[f"cache.{key}"] = input_item(Path(cfg.cache[key]).expanduser())
    return found
