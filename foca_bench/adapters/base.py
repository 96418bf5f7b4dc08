"""The adapter interface: load a model, list its cache sites, and generate with a caching engine."""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foca_bench.hooks import CacheEngine, FeedForwardParts, Site


def feed_forward_parts(ff: nn.Module) -> Optional[FeedForwardParts]:
    """A diffusers `FeedForward` whose activation is a GELU projection (DiT, FLUX, HunyuanVideo: `net` = [GELU(proj),
    Dropout, Linear]) as `up -> act -> down`, for delta methods; None for other activations (a gated GEGLU)."""
    from diffusers.models.activations import GELU

    act, down = ff.net[0], ff.net[2]
    if type(act) is not GELU or not isinstance(down, nn.Linear):
        return None
    return FeedForwardParts(act.proj, lambda hidden: F.gelu(hidden, approximate=act.approximate), down)


class MissingWeightsError(FileNotFoundError):
    """Raised when a model's weights are not on this machine; the message says how to point at them."""


class Adapter(ABC):
    """Knows where the cache sites of one model family are and how its sampling loop runs.

    Args:
        cfg: the `model` config node.
        device: torch device string.
    """

    vae: Optional[torch.nn.Module] = None  # set by adapters whose latents a VAE decodes
    lineages: tuple[str, ...] = ("diffusers",)  # the sampler lineages (`sampler.lineage`) its loop can run

    def __init__(self, cfg: Any, device: str) -> None:
        self.cfg = cfg
        self.device = torch.device("meta") if cfg.weights == "meta" else torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)

    @classmethod
    def refuse(cls, model_cfg: Any, cache: Any) -> Optional[str]:
        """Why this model cannot run the method configuration `cache` (checked by `config.validate`, before any
        weights load), or None."""
        return None

    @staticmethod
    def engine_steps(steps: int) -> int:
        """The caching engine's steps in a generation of `sampler.steps=steps` (a Heun sampler's model evaluations)."""
        return steps

    @abstractmethod
    def sites(self) -> list[Site]:
        """Every cache site, in model order."""

    @abstractmethod
    def make_noise(self, seeds: list[int]) -> Tensor:
        """Initial noise, one generator per sample seed, so a sample does not depend on its batch."""

    @abstractmethod
    def generate(self, engine: CacheEngine, labels: Tensor, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers") -> Tensor:
        """Runs the sampling loop of `lineage` (one of `lineages`); returns latents (B, C, H, W)."""

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

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        """Sampler facts that change numbers (lineage, scheduler, guidance convention, TF32...) under the run's
        `sampler` config, stored in records."""
        return {}
