"""The memory plan of a run, said before any weights load: the weights, the method's feature cache and the
activations, against the device's free memory. A plan that cannot fit stops the run with the settings that would.

- Weights: the parameters the device holds at once under `model.offload` (`none`: every component; `model`,
  diffusers' model CPU offload: the largest component), counted from the safetensors headers of a local
  checkpoint (every component, at the model's dtype), else from the transformer built on the meta device (random
  weights have no text encoders).
- Feature cache: its closed form, sites x tensors x size x dtype, evaluated by the method's own code: one forward
  of the model on the meta device records the shape of every value the method is handed, per (site, CFG branch)
  (`site_shapes`), then a fresh copy of the method is driven through the run's whole schedule on meta tensors of
  those shapes (`cache_peak_bytes`, via `methods.base.resolve` as live generation calls it) and its
  `cache_bytes()` peak is read. It equals the `memory.cache_bytes_peak` a real run records (tests/test_memory.py).
  Adaptive methods decide from random signals (their decisions on real features may differ: an estimate).
- Activations: the peak bytes of the tensors alive during that meta forward (an estimate: no attention maps, as
  flash attention keeps none, and no VAE decode).

Inf-DiT has its own plan (`foca_bench/inf_dit/memory.py`: strips and cache offloading decide its memory per
generation); it shares this module's units, budgets and error.
"""

import logging
import math
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import methods
from foca_bench.hooks import CacheEngine, Site
from methods.base import FULL, CacheConfig, CacheMethod, SiteInfo, SiteKey, Step, Tokens, resolve

log = logging.getLogger("foca_bench")
GB = 1e9


class MemoryPlanError(ValueError):
    """The run does not fit the device; the message lists the settings that do."""


def size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point (1 kB = 1000 B)."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def host_available() -> int:
    """Bytes of host memory available (`MemAvailable`)."""
    try:
        with open("/proc/meminfo") as f:
            return int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def budgets(device: torch.device, override_gb: Optional[float] = None) -> tuple[int, int]:
    """(bytes the device has free for the run, bytes of host memory available); a CPU's free memory is the host's;
    `override_gb` (`model.memory_budget_gb`) replaces the device figure."""
    host = host_available()
    if override_gb is not None:
        return int(override_gb * GB), host
    return (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host), host


class _Recorder(CacheMethod):
    """Computes every site and notes the (shape, dtype) of each value the engine hands the configured method (the
    sites of its roles), and the shapes of adaptive methods' signals."""

    def __init__(self, like: type[CacheMethod]) -> None:
        self.name, self.roles, self.adaptive, self.stack_output = like.name, like.roles, like.adaptive, like.stack_output
        super().__init__(CacheConfig(name=like.name))
        self.values: dict[SiteKey, tuple[tuple[int, ...], torch.dtype]] = {}
        self.signals: dict[SiteKey, tuple[int, ...]] = {}

    def reset(self) -> None:
        self.last: dict[SiteKey, torch.Tensor] = {}

    def plan(self, step: Step):
        return FULL

    def decide(self, key: SiteKey, step: Step, signal: torch.Tensor) -> bool:
        self.signals[key] = tuple(signal.shape)
        return True

    def update(self, key: SiteKey, step: Step, features: torch.Tensor) -> None:
        self.values[key] = (tuple(features.shape), features.dtype)
        self.last[key] = features

    def forecast(self, key: SiteKey, step: Step) -> torch.Tensor:
        return self.last[key]  # a stack_output site's computed value, handed back


class _LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensor storages that ops create and that are alive at once while the mode is on (meta
    tensors included; parameters, created before, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self.alive: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage._cdata, storage.nbytes()
                if key not in self.alive:
                    self.alive.add(key)
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(t, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        if key in self.alive:
            self.alive.discard(key)
            self.now -= n


@dataclass
class Shapes:
    """What one meta forward of a run's model says: the sites the method hooks, the (shape, dtype) of each value it
    is handed per (site, branch) in call order, adaptive signals' shapes, and the activations' peak bytes."""

    sites: dict[str, Site]
    values: dict[SiteKey, tuple[tuple[int, ...], torch.dtype]]
    signals: dict[SiteKey, tuple[int, ...]]
    activation_bytes: int


def site_shapes(sites: list[Site], cache: CacheConfig, generate: Callable[[CacheEngine], Any]) -> Shapes:
    """Runs `generate(engine)` (a step of the run's batch on a meta-device model whose cache sites are `sites`) with
    a recorder in place of the method `cache` configures."""
    recorder = _Recorder(methods.get(cache.name))
    live = _LiveBytes()
    with CacheEngine(recorder, sites) as engine, live:
        generate(engine)
    return Shapes({s.name: s for s in engine.sites}, recorder.values, recorder.signals, live.peak)


def cache_peak_bytes(cache: CacheConfig, shapes: Shapes, steps: int, paired: bool = False,
                     on_step: Optional[Callable[[Step, dict[SiteKey, bool]], None]] = None) -> int:
    """The method's peak `cache_bytes()` over a generation of `steps` engine steps, driven on meta tensors of the
    recorded shapes (exact for the sizes the method keeps; no memory is used). `paired`: the batch holds CFG's
    [cond; uncond] halves. `on_step(step, computed)` sees which (site, branch) computed at each step."""
    method = methods.build(cache)
    method.bind({n: SiteInfo(s.role, s.layer) for n, s in shapes.sites.items()})
    method.reset()
    rng = torch.Generator().manual_seed(0)
    peak = 0
    for i in range(steps):
        step = Step(i, float(steps - i), steps)
        plan = method.plan(step)
        computed = {}
        for key, (shape, dtype) in shapes.values.items():
            site = shapes.sites[key.site]
            value = torch.empty(shape, dtype=dtype, device="meta")
            if method.adaptive:  # a real signal of at most 256 tokens: the method compares its values
                signal = shapes.signals[key]
                full = method.decide(key, step, torch.randn(signal[:1] + tuple(min(d, 256) for d in signal[1:2])
                                                            + signal[2:], generator=rng))
            else:
                full = method.computes(key, step, plan)
            partial = None
            if not full and plan.partial and site.tokenwise:
                tokens = Tokens(site.role, *site.layer, batch=shape[0], count=shape[1], paired=paired,
                                attention=torch.rand(shape[:2], generator=rng))
                partial = (tokens, lambda idx, s=shape, d=dtype: torch.empty((*idx.shape, *s[2:]), dtype=d,
                                                                            device="meta"))
            resolve(method, key, step, full, lambda v=value: v, partial)
            computed[key] = full
        if on_step is not None:
            on_step(step, computed)
        peak = max(peak, method.cache_bytes())
    return peak


@dataclass
class Weights:
    """Parameter bytes at the model's dtype: all components, and the largest component."""

    total: int
    largest_component: int
    source: str

    def on_device(self, offload: str) -> int:
        """What the device holds at once under `model.offload`."""
        return self.largest_component if offload == "model" else self.total


def weights_bytes(transformer: torch.nn.Module, location: Optional[str], dtype: torch.dtype) -> Weights:
    """From the safetensors headers under a local checkpoint folder (every component), else `transformer`'s (on
    the meta device)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    folder = Path(location).expanduser() if location else None
    if folder is not None and folder.is_dir() and any(folder.rglob("*.safetensors")):
        from safetensors import safe_open

        per: dict[str, int] = {}
        for path in folder.rglob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            parts = path.relative_to(folder).parts
            per[parts[0] if len(parts) > 1 else "."] = per.get(parts[0] if len(parts) > 1 else ".", 0) + n * itemsize
        return Weights(sum(per.values()), max(per.values()), f"{len(per)} components in {folder}")
    n = sum(p.numel() for p in transformer.parameters()) * itemsize
    return Weights(n, n, "the transformer (no local checkpoint to read the other components from)")


@dataclass(frozen=True)
class Plan:
    """The bytes a run needs, and what it has."""

    overrides: str  # the settings, as a user writes them
    weights: int  # on the device at once
    cache: Optional[int]  # None: an external method (diffusers' hooks) whose cache is not ours to count
    activations: int
    device_free: int
    host_weights: int  # weights kept in host memory (offloaded)
    host_free: int
    shared: bool  # the device is the host (CPU): everything counts against one budget

    def device_bytes(self) -> int:
        return self.weights + (self.cache or 0) + self.activations + (self.host_weights if self.shared else 0)

    def fits(self) -> bool:
        return self.device_bytes() <= self.device_free and (self.shared or self.host_weights <= self.host_free)

    def describe(self) -> str:
        cache = "not counted (diffusers' hooks)" if self.cache is None else size(self.cache)
        host = f", + {size(self.host_weights)} offloaded weights in host memory" if self.host_weights else ""
        return (f"{self.overrides}: weights {size(self.weights)} on the device{host}, feature cache {cache}, "
                f"activations ~{size(self.activations)} -> {size(self.device_bytes())} of "
                f"{size(self.device_free)} free")


def _meta_adapter(model: DictConfig) -> Any:
    from foca_bench.adapters import build_adapter

    meta = OmegaConf.merge(model, {"weights": "meta"})
    return build_adapter(meta, "cpu")


def plan_run(cfg: DictConfig, cache: CacheConfig, device: str, samples: int) -> Optional[Plan]:
    """Says the run's memory plan for generating `samples` samples (logged before the model loads) and returns it;
    None where there is nothing to plan (meta weights, Inf-DiT's own plan) or no weights to load (the load says
    what to set).

    Raises:
        MemoryPlanError: the plan does not fit; the message lists the settings that would.
    """
    from foca_bench.adapters import ADAPTERS

    model = cfg.model
    if model.weights == "meta" or not isinstance(model.get("offload", "none"), str):  # Inf-DiT: its own plan
        return None
    adapter = _meta_adapter(model)
    batch = max([min(cfg.benchmark.batch_size, samples)] * bool(cfg.profile.benchmark)
                + [cfg.profile.batch_size] * bool(cfg.profile.latency), default=1)
    method_cls = methods.get(cache.name)
    conditions = adapter.example_conditions(batch)  # class labels 0.. (modulo the classes) or the example prompt

    def one_step(engine: CacheEngine) -> None:
        adapter.generate(engine, adapter.make_noise(list(range(batch))), 1, cfg.sampler.guidance_scale,
                         cfg.sampler.guided_channels, lineage=cfg.sampler.lineage, **conditions)

    with torch.no_grad():
        shapes = site_shapes(adapter.sites(), cache, one_step)
    steps = ADAPTERS[model.name].engine_steps(cfg.sampler.steps)
    paired = adapter.cfg.num_classes > 0 and cfg.sampler.guidance_scale > 1
    peak = lambda c: None if method_cls.external else cache_peak_bytes(c, shapes, steps, paired)  # noqa: E731
    location = adapter.weights_location(adapter.cfg) if model.weights == "pretrained" else None
    if location is not None and not adapter.has_local_weights(location, "transformer"):
        return None  # loading the model names what is missing and what to set
    weights = weights_bytes(adapter.transformer, location, getattr(torch, model.dtype))
    dev = torch.device(device)
    device_free, host_free = budgets(dev, model.get("memory_budget_gb"))

    def make(offload: str, cache_bytes: Optional[int], scale: float, overrides: str) -> Plan:
        on_device = weights.on_device(offload)
        return Plan(overrides, on_device, None if cache_bytes is None else math.ceil(cache_bytes * scale),
                    math.ceil(shapes.activation_bytes * scale), device_free, weights.total - on_device, host_free,
                    dev.type == "cpu")

    here = make(model.offload, peak(cache), 1.0, f"model.offload={model.offload}"
                + (f" cache.dtype={cache.dtype}" if cache.dtype else ""))
    log.info(f"<{model.name}> memory plan for method={cache.name}, batch {batch}, {steps} steps (weights: "
             f"{weights.source}): {here.describe()}")
    if here.fits():
        return here
    options = []
    narrow = None if cache.dtype in ("bfloat16", "float16") or (cache.dtype is None and model.dtype != "float32") \
        else "bfloat16"
    narrow_bytes = peak(replace(cache, dtype=narrow)) if narrow else None
    offloads = ADAPTERS[model.name].offloads
    for offload in offloads[offloads.index(model.offload):]:
        for dtype, cache_bytes in [(cache.dtype, here.cache)] + ([(narrow, narrow_bytes)] if narrow else []):
            settings = f"model.offload={offload}" + (f" cache.dtype={dtype}" if dtype else "")
            options.append(make(offload, cache_bytes, 1.0, settings))
            if cfg.profile.benchmark and batch > 1:  # cache and activations scale with the batch
                options += [make(offload, cache_bytes, b / batch, f"{settings} benchmark.batch_size={b} "
                                 f"profile.batch_size={b}") for b in (batch // 2, 1)]
            if "frames" in model:  # a video: cache and activations scale with the latent frames
                latent = (model.frames - 1) // 4 + 1
                options += [make(offload, cache_bytes, f / latent, f"{settings} model.frames={4 * (f - 1) + 1}")
                            for f in range(latent - 1, 0, -1)]
    ok = [p for p in options if p.fits() and p.overrides != here.overrides]
    advice = ("These fit:\n  " + "\n  ".join(p.describe() for p in ok[:8])) if ok else (
        "No offloading, cache dtype, batch size or frame count fits: lower model.resolution, or use a device with "
        "more memory.")
    raise MemoryPlanError(
        f"<{model.name}> memory plan: {here.describe()}: more than {device} has free (model.memory_budget_gb "
        f"overrides the device figure). Nothing was loaded or generated. {advice}")
