"""The adapter interface: load a model, list its cache sites, and generate with a caching engine."""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from foca_bench.errors import MissingFileError
from foca_bench.hooks import CacheEngine, Site


class MissingWeightsError(MissingFileError):
    """Raised when a model's weights are not on this machine; the message says how to point at them."""


class Adapter(ABC):
    """Knows where the cache sites of one model family are and how its sampling loop runs.

    Args:
        cfg: the `model` config node.
        device: torch device string.
    """

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
    def generate(self, engine: CacheEngine, labels: Tensor, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False) -> Tensor:
        """Runs the sampling loop; returns latents (B, C, H, W)."""

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
