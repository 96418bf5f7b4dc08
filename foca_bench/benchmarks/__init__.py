"""Benchmarks: which samples to generate (classes or prompts, and per-sample seeds) and how to score them.

Two kinds:
- in-memory (`toy_fid`): a few hundred small samples, generated and scored in one process;
- on disk (`imagenet_fid`, `drawbench`, `vbench`, `div8k`): a `FileBenchmark` lists its samples, checks every
  reference file and metric weight before generation starts (`preflight`), and scores the packed sample folder
  that sharded generation (`foca_bench.samples`) wrote.
"""

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from foca_bench.errors import MissingFileError  # noqa: F401  (benchmarks raise it)
from foca_bench.samples import Sample, SampleStore

BENCHMARKS: dict[str, type] = {}


def register_benchmark(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        cls.name = name
        BENCHMARKS[name] = cls
        return cls

    return decorate


def build_benchmark(cfg: Any, model_cfg: Any):
    if cfg.name not in BENCHMARKS:
        raise KeyError(f"Unknown benchmark {cfg.name!r}; registered: {', '.join(sorted(BENCHMARKS))}.")
    return BENCHMARKS[cfg.name](cfg, model_cfg)


def require_file(path: Optional[str], what: str, key: str, how: str) -> Path:
    """`path` as a Path if it is a file, else a MissingFileError naming `what`, the config key and how to get it."""
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    where = f"{path} does not exist" if path else f"benchmark.{key} is not set"
    raise MissingFileError(f"{what}: {where}. {how} Then set benchmark.{key}=/path/to/it (nothing was generated).")


class FileBenchmark:
    """A benchmark whose samples are files on disk, generated in shards and scored from the packed folder.

    Subclasses implement `all_samples`, `preflight` and `evaluate`, and `prepare` when the model needs more than a
    label per sample (a text benchmark's prompts).
    """

    name: str = ""
    on_disk = True

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self.preflight()

    def preflight(self) -> None:
        """Raises MissingFileError before any generation if a reference file or metric weight is missing."""

    def all_samples(self) -> list[Sample]:
        """The benchmark's full ordered list."""
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """The list, cut to `benchmark.limit` samples when set (smoke runs)."""
        items = self.all_samples()
        return items[: self.cfg.limit] if self.cfg.limit else items

    def prepare(self, adapter: Any) -> None:
        """Gives the model what its samples are conditioned on beyond a label (a text model's prompts), or refuses a
        model that cannot run this benchmark. Called before generating and before profiling."""

    def conditions(self, samples: list[Sample]) -> tuple[Any, list[int]]:
        """(labels the adapter takes (N,), seeds) of `samples`: class labels, or indices into what `prepare` gave."""
        import torch

        return torch.tensor([s.label for s in samples]), [s.seed for s in samples]

    def store(self, root: Path) -> SampleStore:
        return SampleStore(root, self.samples())

    def to_files(self, images: Any) -> np.ndarray:
        """Generated images (B, C, H, W) in [0, 1] -> what `SampleStore.write` takes (uint8 NHWC)."""
        from foca_bench.samples import to_uint8

        return to_uint8(images)

    def preview(self, store: SampleStore) -> Any:
        """The first 16 samples as (N, C, H, W) in [0, 1], for the grid saved beside the record."""
        import torch

        first = np.stack([store.read(s) for s in store.samples[:16]])
        return torch.from_numpy(first).permute(0, 3, 1, 2) / 255

    def evaluate(self, store: SampleStore, device: str) -> dict:
        raise NotImplementedError


from foca_bench.benchmarks import toy_fid  # noqa: E402,F401  (registers on import)
from foca_bench.benchmarks import imagenet_fid  # noqa: E402,F401
from foca_bench.benchmarks import drawbench  # noqa: E402,F401
from foca_bench.benchmarks import div8k  # noqa: E402,F401
from foca_bench.benchmarks import vbench  # noqa: E402,F401
