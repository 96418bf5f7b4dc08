"""Benchmarks: a fixed, ordered list of samples (each with its seed and condition) and a way to score them.

Every benchmark has one protocol (`Benchmark`), and `foca_bench.runner` runs them all through one pipeline:
validate -> plan samples -> generate the missing ones -> pack -> profile -> score -> record. A benchmark
registers itself and its config schema with `@register_benchmark(name, schema)`, as methods do, so adding one is
its module here and its `conf/benchmark/<name>.yaml`: every module of this package is imported on start-up.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from foca_bench.errors import MissingFileError  # noqa: F401  (benchmarks raise it)
from foca_bench.samples import Sample, SampleStore

LOCAL = {"local": True}  # field metadata: where work runs or how it is split, not what it computes (no identity)


@dataclass
class BenchmarkConfig:
    """Attributes:
    samples_per_class: K samples per class, each from its own seed `seed + global index`.
    batch_size: generation batch (the CFG batch is twice as large).
    """

    name: str = MISSING
    samples_per_class: int = 20
    batch_size: int = 100
    seed: int = 0


@dataclass
class FileBenchmarkConfig(BenchmarkConfig):
    """A benchmark generated in shards, possibly over many jobs (`foca_bench.samples`).

    Attributes:
        limit: generate and score only the first `limit` samples of the list (smoke runs); null: all of them.
        shard, num_shards: this job's share of the fixed batch grid; null takes the launcher's rank and world size
            (torchrun's RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS), else one shard.
        metric_batch_size: batch of the metric networks.
    """

    limit: Optional[int] = None
    shard: Optional[int] = field(default=None, metadata=LOCAL)
    num_shards: Optional[int] = field(default=None, metadata=LOCAL)
    metric_batch_size: int = field(default=32, metadata=LOCAL)


BENCHMARKS: dict[str, type["Benchmark"]] = {}


def register_benchmark(name: str, schema: type = BenchmarkConfig) -> Callable[[type], type]:
    """Registers a benchmark class under `name` (the `conf/benchmark/<name>.yaml` stem) and its config dataclass
    in Hydra's ConfigStore as `benchmark/<name>_schema`, which the YAML lists first in its defaults."""

    def decorate(cls: type) -> type:
        if name in BENCHMARKS:
            raise ValueError(f"Benchmark {name!r} registered twice.")
        cls.name = name
        BENCHMARKS[name] = cls
        ConfigStore.instance().store(group="benchmark", name=f"{name}_schema", node=schema)
        return cls

    return decorate


def build_benchmark(cfg: Any, model_cfg: Any) -> "Benchmark":
    if cfg.name not in BENCHMARKS:
        raise KeyError(f"Unknown benchmark {cfg.name!r}; registered: {', '.join(sorted(BENCHMARKS))}.")
    return BENCHMARKS[cfg.name](cfg, model_cfg)


def require_file(path: Optional[str], what: str, key: str, how: str) -> Path:
    """`path` as a Path if it is a file, else a MissingFileError naming `what`, the config key and how to get it."""
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    where = f"{path} does not exist" if path else f"benchmark.{key} is not set"
    raise MissingFileError(f"{what}: {where}. {how} Then set benchmark.{key}=/path/to/it (nothing was generated).")


class Benchmark:
    """The protocol every benchmark follows.

    Class attributes:
        name: registry key (set by `register_benchmark`).
        condition: the keyword of `Adapter.generate` its samples fill: `class_labels`, `prompts` or `low_res`;
            a model whose adapter takes another is refused before anything runs.
        needs_reference: `score` compares with the full-compute samples of the same seeds (`method=none` at
            `profile.baseline_steps`), which the runner generates (once) when they are missing.
        model_hint: what to use instead when a model is refused.

    Subclasses implement `all_samples` and `score`; `preflight` checks their files and the model before anything
    is generated; `inputs` names the files the run reads (hashed into its identity).
    """

    name: ClassVar[str] = ""
    condition: ClassVar[str] = "class_labels"
    needs_reference: ClassVar[bool] = False
    model_hint: ClassVar[str] = ""

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self.preflight()

    def preflight(self) -> None:
        """Raises (MissingFileError, ValueError) before any generation if a file or the model does not fit."""

    def check_model(self, adapter_class: type) -> None:
        """Refuses a model whose adapter does not take this benchmark's condition."""
        takes = getattr(adapter_class, "condition", None)
        if takes != self.condition:
            raise ValueError(f"benchmark={self.name} conditions each sample on `{self.condition}`, and model="
                             f"{self.model_cfg.name} takes `{takes}`. {self.model_hint} (nothing was generated)")

    def inputs(self) -> dict[str, dict]:
        """The files the run reads, {name: `identity.input_item(...)`}: hashed into the run's identity."""
        return {}

    def all_samples(self) -> list[Sample]:
        """The benchmark's full ordered list: sample i has index i and seed `seed + i`."""
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """The list, cut to `benchmark.limit` samples when set (smoke runs)."""
        items = self.all_samples()
        limit = self.cfg.get("limit")
        return items[:limit] if limit else items

    def conditions(self, samples: list[Sample]) -> dict:
        """The keyword arguments of `Adapter.generate` for a batch of samples: class labels (B,) or prompts."""
        if self.condition == "class_labels":
            import torch

            return {"class_labels": torch.tensor([s.label for s in samples])}
        if self.condition == "prompts":
            return {"prompts": [s.prompt for s in samples]}
        raise NotImplementedError(f"{type(self).__name__}.conditions must build `{self.condition}`.")

    def store(self, root: Path) -> SampleStore:
        """The sample folder of a run (lossless PNG files; `samples.npz` once complete)."""
        return SampleStore(root, self.samples())

    def to_files(self, images: Any) -> np.ndarray:
        """Generated images (B, C, H, W) in [0, 1] -> what the store writes (uint8 NHWC)."""
        from foca_bench.samples import to_uint8

        return to_uint8(images)

    def preview(self, store: SampleStore) -> tuple[Any, int]:
        """(images (N, C, H, W) in [0, 1], images per row) of the grid saved beside the record: the first 16."""
        import torch

        first = np.stack([store.read(s) for s in store.samples[:16]])
        return torch.from_numpy(first).permute(0, 3, 1, 2) / 255, 8

    def score(self, store: SampleStore, reference: Optional[SampleStore], device: str) -> dict:
        """{metric: {"value", "higher_is_better"}} of the complete store (`reference`: see `needs_reference`)."""
        raise NotImplementedError


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
