"""Compiled denoising steps (`model.compile`): each step of the model runs as one torch.compile graph.

Where a skipped step's time goes, eagerly: per block the adaLN modulation, two gates and two residual adds over
the whole (B, tokens, D) hidden state, one to three forecast kernels per site, and the Python dispatch of some
220 small kernels on DiT-XL/2 (on a GPU, each a launch). None of it is counted in FLOPs, so it is what separates
a method's latency speed-up from its FLOPs speed-up.

Here, for a method whose forecasts are linear combinations of tensors it holds (`CacheMethod.forecast_terms`:
FORA, TaylorSeer, FoCa) and for `none`, the engine runs the model's own forward through `torch.compile` at every
step (inductor: C++ on a CPU, Triton on a GPU). At a skipped step each site's wrapper returns sum_j w_j T_j
from the method's terms, so inside the graph every forecast fuses into the gate and residual add that consume
it: the held tensors are read once, no forecast is written, no Python runs between the blocks. The weights enter
as one (sites, terms) tensor, never as constants, and the held tensors as inputs, so one graph serves every
skipped step of every generation (tested under `error_on_recompile`). At a full step the graph computes every
site and returns its value; the method's `update` then runs eagerly on each, in site order, as the hooks would
have called it. `model.compile_mode=reduce-overhead` captures both graphs as CUDA graphs (cudagraph trees; the
features a full step hands the method are cloned out of the graph's memory pool, which its next replay reuses).

Methods that decide per site (TeaCache), recompute tokens (ToCa, DuCa), skip blocks (Δ-DiT) or run diffusers'
hooks keep the eager engine, with the sites' modules compiled regionally (`hooks.compile_sites`).
"""

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from foca_bench.hooks import CacheEngine, Site, compile_sites
from methods.base import CacheMethod, SiteKey

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SITE_ROLES = ("attn", "mlp", "fused")  # the sites a compiled step forecasts inside the model's graph
# per model: (backend, mode) -> its `_Compiled` (weak: a model's graphs go with it)
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def allow_many_methods(graphs_per_method: int = 4, methods: int = 16) -> None:
    """For a process that compiles several methods on one model (`make bench`, `make gpu-check`): every method
    adds its own full- and skipped-step graphs to the model forward's compile cache, whose default limit (8 per
    code object) four methods reach, after which dynamo silently runs the forward eagerly and a "compiled" figure
    would be an eager one. Raises the limit to fit `methods` methods and makes hitting it an error."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, graphs_per_method * methods)
    cfg.fail_on_recompile_limit_hit = True


def uses_cuda_graphs(mode: Optional[str]) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def regional_mode(mode: Optional[str]) -> Optional[str]:
    """The mode for regionally compiled site modules: without CUDA graphs, whose outputs the next replay overwrites
    while an eager method still holds them."""
    return {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def fuses(method: CacheMethod, sites: list[Site], trace: bool = False) -> bool:
    """Whether `CompiledEngine` runs `method`'s steps as whole-model graphs on a model with these sites: `none`, or
    a `fusable` method of attention/MLP/fused sites (not `reuse`, whose site is the model itself)."""
    whole_model = any(s.role == "model" for s in sites)
    sites_inside = method.fusable and set(method.roles) <= set(SITE_ROLES)
    return whole_model and not trace and not method.external and (sites_inside or not method.roles)


def build_engine(method: CacheMethod, sites: list[Site], backend: Optional[str] = None, mode: Optional[str] = None,
                 **kwargs: Any) -> CacheEngine:
    """The engine for a run: `CompiledEngine` when the model is compiled (`backend`) and the method fuses, else the
    eager engine (with the sites' modules compiled regionally when `backend` is set).

    Args:
        method, sites: as `CacheEngine`'s.
        backend: `model.compile` (`inductor`, `aot_eager`, ...), None for eager.
        mode: `model.compile_mode`, torch.compile's mode.
        **kwargs: `CacheEngine`'s keyword arguments.
    """
    if backend is None:
        return CacheEngine(method, sites, **kwargs)
    if fuses(method, sites, kwargs.get("trace", False)):
        return CompiledEngine(method, sites, backend, mode, **kwargs)
    compile_sites(sites, backend, regional_mode(mode) if backend == "inductor" else None)
    return CacheEngine(method, sites, **kwargs)


def _inference(t: Tensor) -> Tensor:
    """`t` as an inference tensor (a copy if it was made outside inference mode, as a sampler's noise is): the
    graph is specialized on it."""
    return t if t.is_inference() else t.clone()


@dataclass
class _Compiled:
    """A model's compiled forward, and (CUDA graphs) the static slots its skipped steps read the held tensors from:
    per (site, branch, term), the slot and a weak reference to the tensor last copied in."""

    forward: Callable[..., Any]
    slots: dict[tuple[str, str, int], list] = field(default_factory=dict)


@dataclass
class _InGraph:
    """What the site wrappers read inside a step graph: a skipped step's terms, or a full step's captured values."""

    tensors: Optional[list[tuple[Tensor, ...]]] = None  # per site: the tensors of its forecast
    weights: Optional[Tensor] = None  # (sites, terms)
    dtypes: tuple[torch.dtype, ...] = ()  # per site: the model's dtype of its features
    captured: list[Tensor] = field(default_factory=list)  # full step: site values in call order


class CompiledEngine(CacheEngine):
    """The caching engine with every step of the model run as a compiled graph (see the module docstring).

    Args:
        method, sites: as `CacheEngine`'s; `fuses(method, sites)` must hold.
        backend: torch.compile backend (`inductor`; `aot_eager` captures the same graphs without code generation).
        mode: torch.compile mode (`reduce-overhead`: CUDA graphs); inductor only.
        **kwargs: `CacheEngine`'s keyword arguments.

    Attributes:
        graph_steps: how many skipped and full steps ran as graphs.
    """

    def __init__(self, method: CacheMethod, sites: list[Site], backend: str = "inductor", mode: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(method, sites, **kwargs)
        if not fuses(method, sites, self.trace is not None):
            raise ValueError(f"method={method.name} cannot run as compiled steps (it is not `fusable`, or the model "
                             "has no `model` site); use hooks.CacheEngine with compile_sites.")
        if mode not in MODES:
            raise ValueError(f"model.compile_mode={mode!r}: choose one of {', '.join(map(str, MODES))}.")
        self.model = next(s.module for s in sites if s.role == "model")
        self.backend, self.mode = backend, (mode if backend == "inductor" else None)
        self._graph: Optional[_InGraph] = None
        self._index = {site.name: i for i, site in enumerate(self.sites)}
        self.graph_steps = {"skipped": 0, "full": 0}

    def __enter__(self) -> "CompiledEngine":
        super().__enter__()
        try:
            self._install(self.model, self._wrap_model(self._compiled()), "model")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _compiled(self) -> _Compiled:
        """The model class's forward compiled once per (model, backend, mode) and shared by every engine on the
        model (unbound, so the cache holds no reference to the model), with its static slots."""
        graphs = _GRAPHS.setdefault(self.model, {})
        if (self.backend, self.mode) not in graphs:
            forward = torch.compile(type(self.model).forward, backend=self.backend, mode=self.mode)
            graphs[self.backend, self.mode] = _Compiled(forward)
        return graphs[self.backend, self.mode]

    def _wrap_model(self, compiled: _Compiled) -> Callable[..., Any]:
        model, self._slots = self.model, compiled.slots
        original = type(model).forward.__get__(model)

        def forward(*args: Any, **kwargs: Any) -> Any:
            plan = self._plan
            if self._step is None or plan.partial:  # a probe call outside a step: plain forward
                return original(*args, **kwargs)
            self._graph = _InGraph() if plan.full else self._skipped_inputs()
            if uses_cuda_graphs(self.mode):
                torch.compiler.cudagraph_mark_step_begin()
            if torch.is_inference_mode_enabled():  # a first step's noise, made outside: one graph, not two
                args, kwargs = tree_map_only(Tensor, _inference, (args, kwargs))
            try:
                out = compiled.forward(model, *args, **kwargs)
            finally:
                graph, self._graph = self._graph, None
            if plan.full:
                self._hand_over(graph.captured)
            self.graph_steps["full" if plan.full else "skipped"] += 1
            return out

        return forward

    def _skipped_inputs(self) -> _InGraph:
        """Every site's forecast terms at this step (the method's state advances as `forecast` would advance it)."""
        tensors, weights, dtypes = [], [], []
        for site in self.sites:
            key = SiteKey(site.name, self.branch)
            terms = self.method.forecast_terms(key, self._step)
            tensors.append(terms.tensors)
            weights.append(terms.weights)
            dtypes.append(self.method.feature_dtypes.get(key, terms.tensors[0].dtype))
        width = max(map(len, weights))  # a ragged step (methods should not return one) pads at weight 0
        tensors = [(*t, *[t[0]] * (width - len(t))) for t in tensors]
        weights = [(*w, *[0.0] * (width - len(w))) for w in weights]
        device = tensors[0][0].device
        if uses_cuda_graphs(self.mode):
            tensors = self._static(tensors)
        return _InGraph(tensors, torch.tensor(weights, dtype=torch.float32).to(device), tuple(dtypes))

    def _static(self, tensors: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
        """The held tensors in static slots (CUDA graphs): a tensor is copied into its slot when the method hands
        out a new one, once per run of skipped steps, instead of at every replay, as cudagraph trees copy inputs
        whose address changes. Costs a second copy of the forecast's tensors in memory."""
        dst, src, out = [], [], []
        for site, terms in zip(self.sites, tensors):
            row = []
            for j, t in enumerate(terms):
                slot = self._slots.get((site.name, self.branch, j))
                if slot is None or slot[0].shape != t.shape or slot[0].dtype != t.dtype:
                    slot = self._slots[site.name, self.branch, j] = [torch.empty_like(t), None]
                    torch._dynamo.mark_static_address(slot[0], guard=False)
                if slot[1] is None or slot[1]() is not t:
                    dst.append(slot[0])
                    src.append(t)
                    slot[1] = weakref.ref(t)
                row.append(slot[0])
            out.append(tuple(row))
        if dst:
            torch._foreach_copy_(dst, src)
        return out

    def _hand_over(self, values: list[Tensor]) -> None:
        """A full step's site values to the method, in the order the hooks would have (cloned out of a CUDA
        graph's pool, which the graph's next replay overwrites)."""
        if len(values) != len(self.sites):
            raise RuntimeError(f"A compiled full step computed {len(values)} of {len(self.sites)} sites.")
        for site, value in zip(self.sites, values):
            key = SiteKey(site.name, self.branch)
            value = value.clone() if uses_cuda_graphs(self.mode) else value
            self.method.update(key, self._step, self.method.keep(key, value))

    def _wrap(self, site: Site, original: Callable[..., Any]) -> Callable[..., Any]:
        eager = super()._wrap(site, original)
        i = self._index[site.name]

        def forward(*args: Any, **kwargs: Any) -> Any:
            graph = self._graph
            if graph is None:  # outside the compiled model call (a probe): the eager engine's wrapper
                return eager(*args, **kwargs)
            if graph.weights is None:  # full step: compute, and capture the value for the method
                value = site.unpack(original(*args, **kwargs))
                graph.captured.append(value)
                return site.pack(value)
            tensors, w = graph.tensors[i], graph.weights[i]
            value = tensors[0] * w[0]
            for j in range(1, len(tensors)):
                value = value + tensors[j] * w[j]
            return site.pack(value.to(graph.dtypes[i]))

        return forward
