"""The adapter interface: load a model, list its cache sites, and generate with a caching engine."""

import inspect
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foca_bench.errors import CorruptFileError, MissingFileError
from foca_bench.hooks import CacheEngine, FeedForwardParts, Site


def feed_forward_parts(ff: nn.Module) -> Optional[FeedForwardParts]:
    """A diffusers `FeedForward` whose activation is a GELU projection (DiT, FLUX, HunyuanVideo: `net` = [GELU(proj),
    Dropout, Linear]) as `up -> act -> down`, for delta methods; None for other activations (a gated GEGLU)."""
    from diffusers.models.activations import GELU

    act, down = ff.net[0], ff.net[2]
    if type(act) is not GELU or not isinstance(down, nn.Linear):
        return None
    return FeedForwardParts(act.proj, lambda hidden: F.gelu(hidden, approximate=act.approximate), down)

log = logging.getLogger("foca_bench")


class MissingWeightsError(MissingFileError):
    """Raised when a model's weights are not on this machine; the message says how to point at them."""


def not_a_multiple(key: str, value: int, multiple: int, why: str) -> Optional[str]:
    """None when `value` is a positive multiple of `multiple`, else a message naming the nearest valid values (for
    `Adapter.refuse`: a size the model cannot honour is refused, never rounded)."""
    if value > 0 and value % multiple == 0:
        return None
    below, above = value // multiple * multiple, (value // multiple + 1) * multiple
    nearest = f"are {below} or {above}" if below > 0 else f"is {above}"
    return f"{key}={value}: {why} takes multiples of {multiple}; the nearest {nearest}."


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
    lineages: tuple[str, ...] = ("diffusers",)  # the sampler lineages (`sampler.lineage`) its loop can run
    # the `model.offload` values it takes; `sequential` (diffusers' enable_sequential_cpu_offload) is not offered yet:
    # on tiny FLUX it fails in accelerate's post-forward hook under our sampling loop (a plain forward runs)
    offloads: tuple[Any, ...] = ("none", "model")

    def __init__(self, cfg: Any, device: str) -> None:
        self.cfg = cfg
        self.device = torch.device("meta") if cfg.weights == "meta" else torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)
        offload = cfg.get("offload", "none")  # Inf-DiT's is a bool of its own (the cache in host memory)
        self.offload_mode = offload if isinstance(offload, str) and self.device.type != "meta" else "none"
        # where the weights are kept: the device, or host memory under `model.offload` (moved in when used)
        self.home = torch.device("cpu") if self.offload_mode != "none" else self.device
        self._offload_hooks: Any = None

    def offload(self, **modules: Optional[torch.nn.Module]) -> None:
        """`model.offload=model`: diffusers' model CPU offload (`enable_model_cpu_offload`) of `modules`, named in
        the order a generation uses them (text encoders, transformer, vae). The weights stay in host memory and each
        whole module moves to the device when it runs, the previous one back. The caching engine's hooks wrap
        accelerate's (tests/test_memory.py: the same samples)."""
        if self.offload_mode == "none":
            return
        from diffusers import DiffusionPipeline

        if self.device.type == "cpu":
            log.warning(f"model.offload={self.offload_mode} on device cpu: the weights are in host memory already")

        class Components(DiffusionPipeline):  # a pipeline of just these modules, which diffusers' offload manages
            model_cpu_offload_seq = "->".join(modules)

            def __init__(self, **parts: Optional[torch.nn.Module]) -> None:
                super().__init__()
                self.register_modules(**parts)

        Components.__init__.__signature__ = inspect.Signature(  # DiffusionPipeline.components reads it
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in modules])
        self._offload_hooks = Components(**modules)
        self._offload_hooks.enable_model_cpu_offload(device=self.device)

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
    def generate(self, engine: CacheEngine, noise: Tensor, steps: int, guidance_scale: float,
                 guided_channels: Optional[int] = None, progress: bool = False, lineage: str = "diffusers",
                 **conditions: Any) -> Tensor:
        """Runs the sampling loop of `lineage` (one of `lineages`) on `noise` conditioned on `conditions` (the
        keyword `condition` names, one entry per sample); returns latents (B, C, H, W)."""

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
    def local_file(location: str, name: str) -> Optional[Path]:
        """`location/name` when it is on this machine (`location` a folder, else a hub id in the local Hugging
        Face cache), else None; checked without importing diffusers (whose import alone takes seconds)."""
        folder = Path(location).expanduser()
        if folder.is_dir() or location.startswith((".", "/", "~")) or location.count("/") != 1:
            return folder / name if (folder / name).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(location, name)
        return Path(found) if isinstance(found, str) else None

    @classmethod
    def has_local_weights(cls, location: str, subfolder: str) -> bool:
        """Whether `location` holds `<subfolder>/config.json` (`local_file`), so a run without weights fails
        fast."""
        return cls.local_file(location, f"{subfolder}/config.json") is not None

    def from_pretrained(self, loader: Any, location: str, subfolder: Optional[str] = None, **kwargs: Any) -> Any:
        """`loader.from_pretrained(location, subfolder=..., local_files_only=True, **kwargs)` where the weights were
        found on this machine: whatever fails now is a damaged, truncated or mismatched file, reported as
        `CorruptFileError` with diffusers' own error (which names the file) and the folder, never as missing."""
        where = Path(location) / subfolder if subfolder else Path(location)
        if subfolder:
            kwargs["subfolder"] = subfolder
        try:
            return loader.from_pretrained(location, local_files_only=True, **kwargs)
        except Exception as err:
            raise CorruptFileError(
                where, f"The {subfolder or 'pipeline'} weights of model '{self.cfg.name}'", err,
                f"The folder is on this machine, so one of its files is truncated, damaged or not in diffusers' "
                f"format: download {self.cfg.hub_id or 'it'} again (e.g. `huggingface-cli download "
                f"{self.cfg.hub_id or '<hub id>'} --local-dir <dir>`) and point model.path at it.") from err

    def provenance(self, sampler: Optional[Any] = None) -> dict:
        """Sampler facts that change numbers (lineage, scheduler, guidance convention, TF32...) under the run's
        `sampler` config, stored in records."""
        return {}
