"""The caching engine: one generic forward hook that connects adapter cache sites to a caching method.

As diffusers' `ModelHook`/`HookRegistry` do, each site module's `forward` is replaced by a wrapper for the
engine's lifetime. At each denoising step the runner opens `engine.step(index, t)`; the method's plan decides
whether the sites are computed (their outputs are handed to the method) or skipped (the module's forward is NOT
run and the method's forecast is returned). The engine passes the step explicitly rather than counting forward
calls. CFG branches computed in separate passes get named contexts (`with engine.context("uncond")`); a
batched-CFG forward such as DiT's is one context.
"""

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from methods.base import CacheMethod, Plan, SiteKey, Step, resolve


def _identity(x: Any) -> Any:
    return x


@dataclass
class Site:
    """A cache site, as an adapter describes it.

    Attributes:
        name: stable name, e.g. `blocks.3.attn`.
        role: what it is (`attn`, `mlp`, `model`); methods choose sites by role.
        module: the module whose forward is cached.
        unpack: module output -> the cached tensor (e.g. `out[0]` for a tuple output).
        pack: cached tensor -> module output.
        feeders: modules whose output only this site consumes (e.g. the LayerNorm + modulation in front of a
            DiT block's attention), with a cheap stand-in for their output. On a forecast step their result
            is dead, so the engine returns the stand-in instead of running them, as the official caching
            codes do by not computing a skipped branch's input. Results are bit-identical (tested).
    """

    name: str
    role: str
    module: nn.Module
    unpack: Callable[[Any], Tensor] = _identity
    pack: Callable[[Tensor], Any] = _identity
    feeders: tuple[tuple[nn.Module, Callable[..., Any]], ...] = ()


@dataclass
class Trace:
    """Per-site values used at each step of one generation (what `trace=true` saves)."""

    values: dict[SiteKey, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    times: list[float] = field(default_factory=list)
    full: list[bool] = field(default_factory=list)


class CacheEngine:
    """Runs a caching method over an adapter's sites.

    Args:
        method: the caching method.
        sites: every site the adapter offers; the engine hooks those whose role the method caches.
        trace: record the value of every hooked site at every step (on CPU; for one-sample runs); with a method
            that caches nothing, the `attn` and `mlp` sites are hooked to be traced.
        elide_feeders: skip the sites' feeders on forecast steps (see `Site.feeders`).
    """

    def __init__(self, method: CacheMethod, sites: list[Site], trace: bool = False,
                 elide_feeders: bool = True) -> None:
        self.method = method
        self.elide_feeders = elide_feeders
        # a method that caches nothing (`none`) still has its attention/MLP trajectories traced when asked
        roles = method.roles or (("attn", "mlp") if trace else ())
        self.sites = [s for s in sites if s.role in roles]
        self.trace: Optional[Trace] = Trace() if trace else None
        self.branch = "default"
        self._step: Optional[Step] = None
        self._plan: Optional[Plan] = None
        self.full_steps = 0
        self.total_steps = 0
        self._installed: list[nn.Module] = []

    def __enter__(self) -> "CacheEngine":
        try:
            for site in self.sites:
                self._install(site.module, self._wrap(site, site.module.forward), site.name)
                for feeder, stand_in in site.feeders if self.elide_feeders else ():
                    self._install(feeder, self._wrap_feeder(feeder.forward, stand_in), f"{site.name} feeder")
        except BaseException:
            self.__exit__()  # leave no half-installed hooks behind
            raise
        return self

    def _install(self, module: nn.Module, forward: Callable[..., Any], what: str) -> None:
        if "forward" in module.__dict__:
            raise RuntimeError(f"{what} is already hooked; detach the other engine first.")
        module.forward = forward
        self._installed.append(module)

    def __exit__(self, *exc: Any) -> None:
        for module in self._installed:
            del module.forward  # the class's forward is visible again
        self._installed.clear()

    def reset(self) -> None:
        """Called at the start of every generation: forgets the method's state and the counters."""
        self.method.reset()
        self.branch = "default"
        self._step = self._plan = None
        self.full_steps = self.total_steps = 0
        if self.trace is not None:
            self.trace = Trace()

    @contextmanager
    def step(self, index: int, t: float) -> Iterator[Plan]:
        """Opens denoising step `index` at scheduler time `t`; yields the method's plan."""
        self._step = Step(index, float(t))
        self._plan = self.method.plan(self._step)
        self.total_steps += 1
        self.full_steps += int(self._plan.full)
        if self.trace is not None:
            self.trace.times.append(float(t))
            self.trace.full.append(self._plan.full)
        try:
            yield self._plan
        finally:
            self._step = self._plan = None

    @contextmanager
    def context(self, branch: str) -> Iterator[None]:
        """Names the CFG branch of the forwards inside (separate cond/uncond passes keep separate caches)."""
        previous, self.branch = self.branch, branch
        try:
            yield
        finally:
            self.branch = previous

    def _wrap(self, site: Site, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._step is None:  # outside a denoising step (e.g. a probe call): plain forward
                return original(*args, **kwargs)
            key = SiteKey(site.name, self.branch)
            value = resolve(self.method, key, self._step, self._plan.full,
                            lambda: site.unpack(original(*args, **kwargs)))
            if self.trace is not None:
                self.trace.values[key].append(value.detach().to("cpu", copy=True))
            return site.pack(value)

        return forward

    def _wrap_feeder(self, original: Callable[..., Any], stand_in: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._plan is not None and not self._plan.full and self._plan.mask is None:
                return stand_in(*args, **kwargs)  # its only consumer is not computed at this step
            return original(*args, **kwargs)

        return forward

    def trace_tensors(self) -> dict[str, Tensor]:
        """The recorded trace as flat tensors: `<site>/<branch>` (T, ...), plus `times` and `full`."""
        if self.trace is None:
            raise RuntimeError("Tracing is off: build the engine with trace=True.")
        out = {f"{k.site}/{k.branch}": torch.stack(v) for k, v in self.trace.values.items()}
        out["times"] = torch.tensor(self.trace.times, dtype=torch.float64)
        out["full"] = torch.tensor(self.trace.full)
        return out
