"""The adapter interface: load a model, list its cache sites, and generate with a caching engine."""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from foca_bench.hooks import CacheEngine, Site


class MissingWeightsError(FileNotFoundError):
    """Raised when a model's weights are not on this machine; the message says how to point at them."""


class Adapter(ABC):
    """Knows where the cache sites of one model family are and how its sampling loop runs.

    Args:
        cfg: the `model` config node.
        device: torch device string.

    Class attributes:
        condition: the keyword argument of `generate` that conditions each sample, as diffusers' pipelines take
            them: `class_labels` (B,), `prompts` (B strings) or `low_res` (B, 3, h, w) in [0, 1]. A benchmark's
            samples fill it (`Benchmark.conditions`); a benchmark conditioning on another is refused up front.
    """

    condition: ClassVar[str] = "class_labels"
    vae: Optional[torch.nn.Module] = None  # set by adapters whose latents a VAE decodes

    def __init__(self, cfg: Any, device: str) -> None:
        self.cfg = cfg
        self.device = torch.device("meta") if cfg.weights == "meta" else torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)

    @abstractmethod
    def sites(self) -> list[Site]:
        """Every cache site, in model order."""

    @abstractmethod
    def make_noise(self, seeds: list[int]) -> Tensor:
        """Initial noise, one generator per sample seed, so a sample does not depend on its batch."""

    @abstractmethod
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, **conditions: Any) -> Tensor:
        """Runs the sampling loop on `noise` conditioned on `conditions` (the keyword `condition` names, one entry
        per sample); returns latents (B, C, H, W)."""

    def example_conditions(self, n: int, start: int = 0) -> dict:
        """Conditions of `n` samples for profiling, tracing and calibration, where no benchmark gives them: class
        labels start..start+n-1 (modulo the classes)."""
        return {"class_labels": torch.arange(start, start + n) % max(self.cfg.num_classes, 1)}

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, C, H, W) in [0, 1]."""

    def require_vae(self) -> Any:
        """The VAE that decodes this model's latents; meta weights have none."""
        if self.vae is None:
            raise RuntimeError(f"model.weights={self.cfg.weights} has no VAE to decode {self.cfg.name} latents.")
        return self.vae

    @staticmethod
    def to_unit(decoded: Tensor) -> Tensor:
        """A VAE's (or a pixel-space model's) output in [-1, 1] -> float32 in [0, 1] on the CPU, as `decode`
        returns it."""
        return ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()

    @classmethod
    def weights_location(cls, cfg: Any) -> str:
        """Where pretrained weights are read: `model.path`, else the hub id (in the local Hugging Face cache)."""
        return str(cfg.path or cfg.hub_id)

    @classmethod
    def weight_files(cls, cfg: Any) -> tuple[str, list[Path]]:
        """(location, the config and index files of its weights: `model_index.json`, `transformer/config.json`,
        `transformer/*.index.json`), hashed into a run's identity; no files where the weights are not local."""
        location = cls.weights_location(cfg)
        folder = Path(location).expanduser()
        if not folder.is_dir() and location.count("/") == 1 and not location.startswith((".", "/", "~")):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(location, "transformer/config.json")
            folder = Path(found).parent.parent if isinstance(found, str) else folder
        files = [folder / "model_index.json", folder / "transformer" / "config.json",
                 *sorted((folder / "transformer").glob("*.index.json"))]
        return location, [f for f in files if f.is_file()]

    @staticmethod
    def has_local_weights(location: str, subfolder: str) -> bool:
        """Whether `location` (a folder, else a hub id in the local Hugging Face cache) holds
        `<subfolder>/config.json`, checked without importing diffusers (whose import alone takes seconds), so a
        run without weights fails fast."""
        folder = Path(location).expanduser()
        if folder.is_dir() or location.startswith((".", "/", "~")) or location.count("/") != 1:
            return (folder / subfolder / "config.json").is_file()
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(location, f"{subfolder}/config.json"), str)

    def provenance(self) -> dict:
        """Sampler facts that change numbers (scheduler, guidance convention, TF32...), stored in records."""
        return {}
