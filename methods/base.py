"""The caching-method interface shared by live generation and offline replay.

A method sees site names, step indices, times and tensors, never an `nn.Module` (adapters say *where*,
methods say *how*). Four verbs: `plan(step)`, `update(key, step, features)`, `forecast(key, step)`, `reset()`;
token-wise methods (ToCa, DuCa) add `select(key, step, tokens)` and `update_tokens(key, step, indices, features)`
for partial steps; delta methods (Chipmunk) add `attend(key, step, tokens, q, k, v, mask)` and
`feed_forward(key, step, tokens, x, ffn)`, which compute a site's attention core or MLP themselves from
tensors and the column-restricted projections the engine hands them (`FeedForward`). A method whose forecast is a linear combination of
tensors it holds (FORA, TaylorSeer, FoCa) states it as `forecast_terms(key, step)` instead of `forecast`: the same
numbers eagerly, and the engine can fuse a whole skipped step into one compiled graph (`foca_bench/fused.py`).
`resolve` is the one function that turns a plan into the value a site uses; both the runtime hook
(`foca_bench/hooks.py`) and `methods.replay` call it, so offline analysis drives exactly the live code path.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from methods._numerics import combine


class SiteKey(NamedTuple):
    """Where a feature lives: a cache site and the CFG branch (context) it belongs to."""

    site: str
    branch: str = "default"


@dataclass(frozen=True)
class Step:
    """One denoising step.

    Attributes:
        index: position in sampling order, 0..T-1.
        t: the scheduler's own time value at this step (DDIM timestep, flow-matching sigma, ...).
        total: T, the number of steps of this generation (None when unknown).
    """

    index: int
    t: float
    total: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    """What the engine does at a step: compute every site, let the method forecast them, (partial) let a
    token-wise method recompute a subset of each token-wise site's tokens (`CacheMethod.select`), or (delta) let a
    delta method compute attention cores and MLPs (`CacheMethod.attend`, `CacheMethod.feed_forward`).

    Attributes:
        full: compute every site.
        partial: a token-wise step; the sites' feeders run, since the selected tokens need their inputs.
        delta: a delta method's step: every site runs, and the method computes the attention cores and MLPs the
            adapter exposes (`Site.attention_core`, `Site.ffn`) itself, from cached outputs plus sparse deltas.
    """

    full: bool
    partial: bool = False
    delta: bool = False


FULL = Plan(full=True)
FORECAST = Plan(full=False)
PARTIAL = Plan(full=False, partial=True)
DELTA = Plan(full=False, delta=True)  # a delta method computes every attention core and MLP it can (`attend`, ...)


@dataclass(frozen=True)
class TokenLayout:
    """How a site's token sequence is laid out: `text` prompt tokens before (`text_first`) or after an image or
    video token grid of shape `grid` ((height, width) or (frames, height, width)), row-major."""

    text: int = 0
    text_first: bool = True
    grid: tuple[int, ...] = ()


@dataclass(frozen=True)
class Tokens:
    """What a token-wise method knows about a site's tokens at a partial step.

    Attributes:
        role: the site's role (`attn`, `mlp`).
        layer: the site's block index, 0..layers-1 (ToCa's layer-wise ratio).
        layers: the number of blocks.
        batch: samples in the call (a batched CFG forward holds both branches: cond first, then uncond).
        count: tokens per sample.
        attention: (batch, count) attention each token received at the site's block's last full step (the
            head-mean attention map summed over queries), where the method asked for it; else None.
        paired: the batch is [cond; uncond] halves of the same samples (a batched CFG forward).
        layout: where the text and image tokens are in the sequence, when the adapter says (delta methods).
    """

    role: str
    layer: int
    layers: int
    batch: int
    count: int
    attention: Optional[Tensor] = None
    paired: bool = False
    layout: Optional[TokenLayout] = None


class FeedForward(ABC):
    """An MLP `down(act(up(x)))` as tensor functions, for methods that compute some of its hidden columns only.

    `columns` are hidden-unit indices per block of tokens, (B, blocks, k), and the inputs then come in blocks,
    (B, blocks, m, D): each block of m tokens gets its own k columns. The engine builds it from the site's modules
    (`foca_bench.hooks`); a method never sees them.
    """

    bias: Optional[Tensor]  # (D_out,) the output bias `down` adds, or None when another part of the site owns it

    @abstractmethod
    def up(self, x: Tensor, columns: Optional[Tensor] = None) -> Tensor:
        """Pre-activations: (..., D) -> (..., F), or blocked (B, n, m, D) -> (B, n, m, k) for `columns`."""

    @abstractmethod
    def act(self, hidden: Tensor) -> Tensor:
        """The activation function, elementwise."""

    @abstractmethod
    def down(self, hidden: Tensor, columns: Optional[Tensor] = None, bias: bool = False) -> Tensor:
        """(..., F) -> (..., D_out), or blocked (B, n, m, k) -> (B, n, m, D_out) for `columns`; with `bias`, adds
        `self.bias` (dense only)."""


class SiteInfo(NamedTuple):
    """What a method may know of a site besides its name (`CacheMethod.bind`): its role (`attn`, `mlp`, `fused`,
    `blocks`, ...) and (block index, number of blocks) (`Site.layer`)."""

    role: str
    layer: tuple[int, int] = (0, 1)


class Terms(NamedTuple):
    """A forecast as a linear combination: sum_j weights[j] * tensors[j] (`CacheMethod.forecast_terms`)."""

    tensors: tuple[Tensor, ...]
    weights: tuple[float, ...]


@dataclass
class CacheConfig:
    """Fields every method accepts (`cache.*`).

    Attributes:
        N: interval between full computations for interval methods. Methods that do not use a schedule
            (`none`) accept and ignore it, so one sweep `method=none,foca cache.N=3,5` covers the baseline.
        warmup: number of leading steps always computed in full; None takes the model's default
            (`model.warmup`).
        time: time axis of the forecasts: `step` (t_i = i) or `sigma` (the scheduler's own time values, so
            non-uniform grids are handled).
        dtype: the dtype the method stores features in (`float32`, `bfloat16`, `float16`); null keeps the model's.
            `bfloat16` halves a float32 model's cache; `float32` on a bf16 model stores and forecasts in full
            precision (as diffusers' `taylor_factors_dtype`). Forecasts are cast back to the model's dtype.
    """

    name: str = "???"
    N: int = 1
    warmup: Optional[int] = None
    time: str = "step"
    dtype: Optional[str] = None

    # knob values that reproduce what runs did before the knob existed: left out of a run's identity
    # (`foca_bench.identity.identity`), so the records of those runs keep their ids
    omit_from_identity: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.N < 1:
            raise ValueError(f"cache.N={self.N}: the interval between full steps must be >= 1 (cache.N=1 "
                             "computes every step).")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"cache.warmup={self.warmup} must be >= 0 (or null for the model's default).")
        if self.time not in ("step", "sigma"):
            raise ValueError(f"cache.time={self.time!r}: choose `step` (t_i = i) or `sigma` (scheduler times).")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"cache.dtype={self.dtype!r}: choose float32, bfloat16, float16, or null (the model's).")


class CacheMethod(ABC):
    """Base class of every caching method.

    Class attributes:
        name: registry key, the same string as `conf/method/<name>.yaml`.
        roles: the site roles the method caches (`attn`, `mlp`, `fused` for a single-stream block's fused
            attention+MLP output, or `model` for the whole model output).
        schedule_free: True for methods whose result does not depend on `N`/`warmup`/`time`
            (they are dropped from the run's identity).
    """

    name: ClassVar[str]
    config_class: ClassVar[type] = CacheConfig
    roles: ClassVar[tuple[str, ...]] = ("attn", "mlp", "fused")
    schedule_free: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False  # decides per site and branch with `decide` instead of by `plan`
    decides_from_features: ClassVar[bool] = False  # a plan from feature values (adaptive FoCa): no meta runs
    tokenwise: ClassVar[bool] = False  # recomputes selected tokens at partial steps (`select`, `update_tokens`)
    # a residual stack (role `blocks`) caches the stack's output, and a forecast step returns it in place of the
    # stack's output (not input + residual); at a computed step the stack's value is the method's after `update`
    stack_output: ClassVar[bool] = False
    delta: ClassVar[bool] = False  # computes attention cores and MLPs at DELTA steps (`attend`, `feed_forward`)
    external: ClassVar[bool] = False  # run by diffusers' or cache-dit's hooks (foca_bench.external), not our engine
    uncond_first: ClassVar[bool] = False  # batched CFG as [uncond; cond] (FasterCache), not [cond; uncond]
    fusable: ClassVar[bool] = False  # forecasts by `forecast_terms`: the engine may fuse a skipped step (model.compile)
    # knobs that depend on the model (set by conf/model_method/<model>_<name>.yaml); empty ones fail validation
    model_specific: ClassVar[tuple[str, ...]] = ()
    how_to_set: ClassVar[str] = ""  # how a user obtains a model-specific knob for a new model
    latency_note: ClassVar[str] = ""  # why a measured latency is not the method's own (records and tables show it)

    def __init__(self, cfg: CacheConfig) -> None:
        self.cfg = cfg
        dtype = getattr(cfg, "dtype", None)
        self.storage_dtype: Optional[torch.dtype] = getattr(torch, dtype) if dtype else None
        self.feature_dtypes: dict[SiteKey, torch.dtype] = {}  # the model's dtype of each site's features
        self.feature_devices: dict[SiteKey, torch.device] = {}  # and device
        self.storage_device: Optional[torch.device] = None  # set by an adapter that offloads the cache to the host
        self.site_info: dict[str, SiteInfo] = {}
        self.reset()

    def bind(self, sites: dict[str, SiteInfo]) -> None:
        """Learns the role and depth of each site the method will see (the engine calls it once, before any
        step), for methods whose decisions depend on them (ToCa's per-block force steps, DuCa's block stack)."""
        self.site_info = dict(sites)

    def keep(self, key: SiteKey, features: Tensor) -> Tensor:
        """A fresh feature as the method stores it: in `cache.dtype`, on `storage_device` (remembering the model's
        dtype and device)."""
        self.feature_dtypes[key], self.feature_devices[key] = features.dtype, features.device
        features = features if self.storage_dtype is None else features.to(self.storage_dtype)
        return features if self.storage_device is None else features.to(self.storage_device)

    def give(self, key: SiteKey, value: Tensor) -> Tensor:
        """A stored or forecast value as the model uses it: back in the model's dtype and on its device."""
        return value.to(self.feature_devices.get(key, value.device), self.feature_dtypes.get(key, value.dtype))

    def is_full(self, index: int, total: Optional[int] = None) -> bool:
        """The interval schedule: full when i < warmup or (i - warmup) % N == 0 (`total`, the number of steps,
        matters only to schedules that depend on it, such as ToCa's)."""
        warmup = self.cfg.warmup or 0
        return index < warmup or (index - warmup) % self.cfg.N == 0

    def plan(self, step: Step) -> Plan:
        return FULL if self.is_full(step.index, step.total) else FORECAST

    def time(self, step: Step) -> float:
        """The step's time on the configured axis."""
        return float(step.index) if self.cfg.time == "step" else float(step.t)

    @abstractmethod
    def update(self, key: SiteKey, step: Step, features: Tensor) -> None:
        """Receives a freshly computed feature of `key` at a full step."""

    def forecast(self, key: SiteKey, step: Step) -> Tensor:
        """Returns the value `key` takes at a step that is not computed (by default, `forecast_terms` evaluated).

        The tensor is valid until the method's next step of `key` (a method may reuse its buffer); a caller
        that keeps it longer copies it.
        """
        return combine(*self.forecast_terms(key, step))

    def forecast_terms(self, key: SiteKey, step: Step) -> Terms:
        """The forecast of `key` at `step` as a linear combination of tensors the method holds, advancing its
        state as `forecast` would (methods with `fusable = True`).

        The engine's fused skipped step (`foca_bench/fused.py`) evaluates every site's combination inside one
        compiled graph, where it fuses into the gates and residual adds that consume it: no forecast is written.
        So that one graph serves every skipped step, a method returns the same number of tensors at every call
        for a site (padding with zero tensors it holds, at weight 0), no tensor twice (aliased inputs compile
        another graph), and none it will later modify in place. Weights are plain floats: they enter the graph as
        a tensor, never as constants.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither forecast nor forecast_terms")

    @abstractmethod
    def reset(self) -> None:
        """Forgets every site's history; called at the start of every generation."""

    def computes(self, key: SiteKey, step: Step, plan: Plan) -> bool:
        """Whether site `key` is computed at `step` under the step's plan (default: the plan, for every site; at a
        DELTA step every site computes). Methods that skip only some sites at a step (Delta-DiT's block ranges,
        ToCa's per-block force steps) override it; a site's feeders run when it is computed."""
        return plan.full or plan.delta

    def decide(self, key: SiteKey, step: Step, signal: Tensor) -> bool:
        """Adaptive methods only: whether `key` is computed at `step`, from a cheap signal the adapter derives
        from the site's input (e.g. TeaCache's modulated input of the first block)."""
        raise NotImplementedError(f"{type(self).__name__} is not adaptive")

    def provenance(self) -> dict:
        """Facts about the files the method read that change its numbers (a router's path and sha256), for the
        record; empty for methods that read none."""
        return {}

    def held_tensors(self) -> list[Tensor]:
        """The tensors the method's state holds now, one per storage: its feature cache."""
        seen: dict[object, Tensor] = {}

        def visit(obj: object) -> None:
            if isinstance(obj, Tensor):
                storage = obj.untyped_storage()
                key = (obj.device, storage.data_ptr()) if storage.data_ptr() else id(storage)
                seen[key] = obj
            elif isinstance(obj, dict):
                for value in obj.values():
                    visit(value)
            elif isinstance(obj, (list, tuple)):
                for value in obj:
                    visit(value)
            elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, CacheConfig):
                for name in obj.__dataclass_fields__:
                    visit(getattr(obj, name))

        for name, value in vars(self).items():
            if name != "cfg":
                visit(value)
        return list(seen.values())

    def cache_bytes(self) -> int:
        """Bytes of the tensors the method's state holds now (each storage counted once): its feature cache."""
        return sum(t.untyped_storage().nbytes() for t in self.held_tensors())

    def wants_attention(self, step: Step) -> bool:
        """Token-wise methods: whether a full `step` should also record each block's attention map (for
        `Tokens.attention`); a full step that records it runs the model's explicit-softmax attention."""
        return False

    def select(self, key: SiteKey, step: Step, tokens: Tokens) -> Optional[Tensor]:
        """Token-wise methods, at a partial step: indices (batch, k) of the tokens of `key` to recompute, or None
        to forecast the whole site (also what sites that cannot be computed token by token get)."""
        return None

    def update_tokens(self, key: SiteKey, step: Step, indices: Tensor, features: Tensor) -> Tensor:
        """Token-wise methods: receives the recomputed `features` (batch, k, ...) of tokens `indices`; returns the
        site's whole value at this step."""
        raise NotImplementedError(f"{type(self).__name__} is not token-wise")

    def attend(self, key: SiteKey, step: Step, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor,
               mask: Optional[Tensor] = None) -> Tensor:
        """Delta methods, at a DELTA step: the attention core softmax(q k^T / sqrt(d) + mask) v of site `key`,
        q, k, v (B, heads, S, d) -> (B, heads, S, d); `mask` is None or broadcastable to (B, heads, S, S)."""
        raise NotImplementedError(f"{type(self).__name__} is not a delta method")

    def feed_forward(self, key: SiteKey, step: Step, tokens: Tokens, x: Tensor, ffn: FeedForward) -> Tensor:
        """Delta methods, at a DELTA step: the MLP output of site `key` for input x (B, S, D), (B, S, D_out)."""
        raise NotImplementedError(f"{type(self).__name__} is not a delta method")


def resolve(method: CacheMethod, key: SiteKey, step: Step, full: bool, compute: Callable[[], Tensor],
            partial: Optional[tuple[Tokens, Callable[[Tensor], Tensor]]] = None) -> Tensor:
    """The value a site uses at a step: computed and handed to the method, forecast without computing, or (at a
    partial step of a token-wise site) recomputed for the tokens the method selects and cached for the rest.

    Args:
        method: the caching method.
        key: the site and branch.
        step: the current step.
        full: the plan's decision for this step.
        compute: runs the site's real computation; called only when `full`.
        partial: for a token-wise site at a partial step: its `Tokens` and `compute_tokens(indices (B, k)) ->
            (B, k, ...)`, the site's computation on those tokens only.

    Returns:
        The site's value at this step.
    """
    if full:
        features = compute()
        method.update(key, step, method.keep(key, features))
        return features
    if partial is not None:
        tokens, compute_tokens = partial
        indices = method.select(key, step, tokens)
        if indices is not None:
            return method.give(key, method.update_tokens(key, step, indices, compute_tokens(indices)))
    return method.give(key, method.forecast(key, step))
