"""The caching engine: one generic forward hook that connects adapter cache sites to a caching method.

As diffusers' `ModelHook`/`HookRegistry` do, each site module's `forward` is replaced by a wrapper for the
engine's lifetime. At each denoising step the runner opens `engine.step(index, t)`; the method's plan decides
whether the sites are computed (their outputs are handed to the method) or skipped (the module's forward is NOT
run and the method's forecast is returned). The engine passes the step explicitly rather than counting forward
calls. CFG branches computed in separate passes get named contexts (`with engine.context("uncond")`); a
batched-CFG forward such as DiT's is one context.

Three kinds of site: a module whose output is cached (attention, MLP, the whole model); a residual stack of
blocks whose residual is cached (`Site.residual`: TeaCache's whole stack, Δ-DiT's single blocks); and, for
external methods (`diffusers_*`, cache-dit's `dbcache`, `cachedit_*`), no site at all: the other project's hooks go
on the model (`foca_bench.external`). Which sites compute at a step is the plan's (`CacheMethod.computes`, per
site) or, for adaptive methods, `decide` on a signal the adapter derives from the site's input. At a delta
method's DELTA step (Chipmunk), the sites whose attention core or MLP the adapter exposes (`Site.attention_core`,
`Site.ffn`) run with that part computed by the method (`CacheMethod.attend`, `CacheMethod.feed_forward`), and the
other sites run as usual.
"""

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods._numerics import token_index
from methods.base import CacheMethod, FeedForward, Plan, SiteInfo, SiteKey, Step, TokenLayout, Tokens, resolve


def _identity(x: Any) -> Any:
    return x


def hidden_states(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a block was called with (first positional argument or `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class FeedForwardParts:
    """An MLP site as `down(act(up(x)))`, which a delta method may compute column by column (`Site.ffn`).

    Attributes:
        up: the input projection (`nn.Linear`, D -> F).
        act: the activation, elementwise.
        down: the output projection (`nn.Linear`); its input columns from `head` on are the MLP's hidden units.
        head: 0 when the site's module is the whole MLP, called with x. Else the site's module is `down` itself, a
            fused projection of [attention output (`head` columns); hidden units] (a single-stream block's
            `proj_out`): at a DELTA step the engine takes x from `up`'s call and hands the block an empty hidden
            part in its place, then computes `down`'s attention part densely and adds the method's MLP output.
    """

    up: nn.Module
    act: Callable[[Tensor], Tensor]
    down: nn.Module
    head: int = 0


class _FeedForwardOps(FeedForward):
    """`FeedForward` over an adapter's `FeedForwardParts`: a column-restricted projection gathers the selected
    weight rows per block of tokens and multiplies blocks by them (one batched matmul), so what runs, and what
    `FlopCounterMode` counts, is the sparse work."""

    def __init__(self, parts: FeedForwardParts) -> None:
        self.parts = parts
        self.bias = None if parts.head else parts.down.bias

    def up(self, x: Tensor, columns: Optional[Tensor] = None) -> Tensor:
        weight, bias = self.parts.up.weight, self.parts.up.bias  # (F, D), (F,)
        if columns is None:
            return F.linear(x, weight, bias)
        out = x @ weight[columns].transpose(-1, -2)  # (B, n, m, D) @ (B, n, D, k) -> (B, n, m, k)
        return out if bias is None else out + bias[columns].unsqueeze(-2)

    def act(self, hidden: Tensor) -> Tensor:
        return self.parts.act(hidden)

    def down(self, hidden: Tensor, columns: Optional[Tensor] = None, bias: bool = False) -> Tensor:
        weight = self.parts.down.weight[:, self.parts.head:]  # (D_out, F)
        if columns is None:
            return F.linear(hidden, weight, self.bias if bias else None)
        return hidden @ weight.t()[columns]  # (B, n, m, k) @ (B, n, k, D_out) -> (B, n, m, D_out)


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
            DiT block's attention), with a cheap stand-in for their output. On a forecast step, and on a
            partial step for a site that is not token-wise, their result is dead, so the engine returns the
            stand-in instead of running them, as the official caching codes do by not computing a skipped
            branch's input. Results are bit-identical (tested).
        residual: the site is a residual stack of blocks (roles `blocks`, `block`): `module` is its first block
            and `span` the blocks after it. The cached value is the stack's residual (output minus input state,
            `unpack(output) - read(args, kwargs)`); on a forecast step the first block returns
            `pack(input + residual)` and the others pass their input through (`pack(read(...))`) without running.
            For a method with `stack_output` the cached value is the stack's output, which a forecast step
            returns whatever the input (DuCa's aggressive step).
        span: the blocks after `module` in a residual stack.
        read: a residual block's `(args, kwargs) -> state`; by default the hidden states it was called with
            (`block(hidden_states, ...) -> hidden_states`). A two-stream block reads both streams as one tensor.
        signal: `(args, kwargs) of the first block -> Tensor`, the cheap indicator an adaptive method decides
            from (TeaCache: the first block's modulated input).
        layer: (block index, number of blocks), for methods whose settings vary with depth (ToCa).
        tokenwise: the module maps each token of its (B, tokens, ...) hidden states on its own (an MLP), so a
            token-wise method can recompute a subset of tokens at a partial step.
        attention_probe: attention sites: `(forward, args, kwargs) -> (output, (B, tokens) attention each token
            received)`, run at full steps when a token-wise method scores tokens by attention.
        scored_by: the name of the attention site whose probe scores this site's tokens.
        score_tokens: selects this site's tokens from the scoring probe's (B, tokens) vector, when the attention
            runs over more tokens than the site (a two-stream block's joint attention over text and image).
        attention_core: attention sites: `(forward, args, kwargs, core) -> output`, the module's forward with its
            attention core softmax(q k^T / sqrt(d) + mask) v replaced by `core(q, k, v, mask)` on (B, heads, S, d)
            tensors; a delta method computes it at DELTA steps.
        ffn: MLP sites: the MLP's parts, which a delta method computes column by column at DELTA steps.
        layout: where the text and image tokens are in the sequence the site's attention core or MLP sees.
    """

    name: str
    role: str
    module: nn.Module
    unpack: Callable[[Any], Tensor] = _identity
    pack: Callable[[Tensor], Any] = _identity
    feeders: tuple[tuple[nn.Module, Callable[..., Any]], ...] = ()
    residual: bool = False
    span: tuple[nn.Module, ...] = ()
    read: Callable[[tuple, dict], Tensor] = hidden_states
    signal: Optional[Callable[[tuple, dict], Tensor]] = None
    layer: tuple[int, int] = (0, 1)
    tokenwise: bool = False
    attention_probe: Optional[Callable[[Callable[..., Any], tuple, dict], tuple[Any, Tensor]]] = None
    scored_by: Optional[str] = None
    score_tokens: Callable[[Tensor], Tensor] = _identity
    attention_core: Optional[Callable[[Callable[..., Any], tuple, dict, Callable[..., Tensor]], Any]] = None
    ffn: Optional[FeedForwardParts] = None
    layout: Optional[TokenLayout] = None


def first_token(*args: Any, **kwargs: Any) -> Tensor:
    """A feeder stand-in (`Site.feeders`): the (B, 1, D) first token of the hidden states the module was called
    with, which broadcasts through a modulation and costs nothing (a LayerNorm or attention feeding only a
    skipped site)."""
    return hidden_states(args, kwargs)[:, :1]


def with_hidden_states(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


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
        measure_cache: after every step, measure the bytes the method's cache holds (`cache_bytes_peak`, the
            maximum over the engine's lifetime); off for latency runs.
    """

    def __init__(self, method: CacheMethod, sites: list[Site], trace: bool = False,
                 elide_feeders: bool = True, measure_cache: bool = False) -> None:
        self.method = method
        self.measure_cache = measure_cache
        self.cache_bytes_peak = 0
        self.elide_feeders = elide_feeders
        # a method that caches nothing (`none`) still has its attention/MLP trajectories traced when asked
        roles = method.roles or (("attn", "mlp", "fused") if trace else ())
        self.sites = [s for s in sites if s.role in roles]
        if method.roles and not self.sites:
            raise ValueError(f"method={method.name} caches sites with roles {', '.join(method.roles)}, and this "
                             f"model's adapter offers none (it offers {', '.join(sorted({s.role for s in sites}))}).")
        method.bind({s.name: SiteInfo(s.role, s.layer) for s in self.sites})
        # diffusers' own hooks (`diffusers_*` methods) go on the whole model
        self._model = next((s.module for s in sites if s.role == "model"), None) if method.external else None
        # the modules our attention/MLP/fused sites cache, for diffusers' TaylorSeer hook to cache the same ones
        self._feature_modules = [s.module for s in sites if s.role in ("attn", "mlp", "fused")]
        self.external: Optional[Any] = None  # the other project's hooks (`foca_bench.external.attach`)
        self.trace: Optional[Trace] = Trace() if trace else None
        self.branch = "default"
        self._step: Optional[Step] = None
        self._plan: Optional[Plan] = None
        self.full_steps = 0
        self.total_steps = 0
        self._installed: list[tuple[nn.Module, Optional[Callable[..., Any]]]] = []
        self._span_input: dict[SiteKey, Optional[Tensor]] = {}  # per (stack, branch) at this step; None: skipped
        self._decided_full: Optional[bool] = None  # adaptive methods: whether any site computed at this step
        self._received: dict[SiteKey, Tensor] = {}  # attention each token received, per attention site, last full step
        self._ffn_inputs: dict[SiteKey, Tensor] = {}  # a fused projection's MLP input at this step (`_wrap_ffn_up`)
        self._ffn_ops = {s.name: _FeedForwardOps(s.ffn) for s in self.sites if s.ffn is not None and method.delta}
        self.batched_cfg = False

    def __enter__(self) -> "CacheEngine":
        try:
            if self._model is not None:
                from foca_bench import external

                self.external = external.attach(self.method.cfg, self._model, lambda: self._step.t,
                                                self._feature_modules)
            for site in self.sites:
                if site.residual:
                    self._install(site.module, self._wrap_span_head(site, site.module.forward), site.name)
                    for j, block in enumerate(site.span):
                        last = j == len(site.span) - 1
                        self._install(block, self._wrap_span_tail(site, block.forward, last), f"{site.name}.{j + 1}")
                    continue
                self._install(site.module, self._wrap(site, site.module.forward), site.name)
                if site.name in self._ffn_ops and site.ffn.head:  # a delta method takes a fused MLP's input
                    self._install(site.ffn.up, self._wrap_ffn_up(site, site.ffn.up.forward), f"{site.name} MLP input")
                # a delta method's plans compute every site (FULL or DELTA), so its sites' feeders always run
                for feeder, stand_in in site.feeders if self.elide_feeders and not self.method.delta else ():
                    self._install(feeder, self._wrap_feeder(site, feeder.forward, stand_in), f"{site.name} feeder")
        except BaseException:
            self.__exit__()  # leave no half-installed hooks behind
            raise
        return self

    def _install(self, module: nn.Module, forward: Callable[..., Any], what: str) -> None:
        previous = module.__dict__.get("forward")
        # a compiled forward (`compile_sites`) or accelerate's offload hook (`model.offload`) is wrapped, not refused
        if previous is not None and not getattr(previous, "foca_compiled", False) and not hasattr(module, "_hf_hook"):
            raise RuntimeError(f"{what} is already hooked; detach the other engine first.")
        module.forward = forward
        self._installed.append((module, previous))

    def __exit__(self, *exc: Any) -> None:
        for module, previous in reversed(self._installed):
            if previous is None:
                del module.forward  # the class's forward is visible again
            else:
                module.forward = previous  # the compiled forward (`compile_sites`)
        self._installed.clear()
        if self.external is not None:
            self.external.detach()
            self.external = None

    def reset(self, batched_cfg: bool = False) -> None:
        """Called at the start of every generation: forgets the method's state and the counters.

        Args:
            batched_cfg: the generation's forwards hold [cond; uncond] halves of the same samples.
        """
        self.method.reset()
        self.batched_cfg = batched_cfg
        self._received.clear()
        self._ffn_inputs.clear()
        if self.external is not None:
            self.external.reset(batched_cfg)
        self.branch = "default"
        self._step = self._plan = None
        self._span_input.clear()
        self.full_steps = self.total_steps = 0
        if self.trace is not None:
            self.trace = Trace()

    @contextmanager
    def step(self, index: int, t: float, total: Optional[int] = None) -> Iterator[Plan]:
        """Opens denoising step `index` (of `total`) at scheduler time `t`; yields the method's plan.

        For an adaptive method the plan is provisional: each site decides with `method.decide`, and the step
        counts as full when any site computed."""
        self._step = Step(index, float(t), total)
        self._plan = self.method.plan(self._step)
        self._decided_full = None
        self.total_steps += 1
        try:
            yield self._plan
        finally:
            full = self._plan.full if self._decided_full is None else self._decided_full
            self.full_steps += int(full)
            if self.measure_cache:
                self.cache_bytes_peak = max(self.cache_bytes_peak, self.method.cache_bytes())
            if self.trace is not None:
                self.trace.times.append(float(t))
                self.trace.full.append(full)
            self._step = self._plan = None
            self._span_input.clear()

    @contextmanager
    def context(self, branch: str) -> Iterator[None]:
        """Names the CFG branch of the forwards inside (separate cond/uncond passes keep separate caches)."""
        previous, self.branch = self.branch, branch
        if self.external is not None:
            self.external.set_context(branch)
        try:
            yield
        finally:
            self.branch = previous
            if self.external is not None:
                self.external.set_context(previous)

    def _wrap(self, site: Site, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._step is None:  # outside a denoising step (e.g. a probe call): plain forward
                return original(*args, **kwargs)
            key = SiteKey(site.name, self.branch)
            if self._plan.delta and (site.attention_core is not None or site.name in self._ffn_ops):
                return self._delta(site, key, original, args, kwargs)
            full = self._is_full(site, key, args, kwargs)
            compute = lambda: site.unpack(original(*args, **kwargs))  # noqa: E731
            if full and site.attention_probe is not None and self.method.wants_attention(self._step):
                compute = lambda: site.unpack(self._probe(site, key, original, args, kwargs))  # noqa: E731
            partial = None
            if not full and self._plan.partial and site.tokenwise:
                partial = self._partial(site, key, original, args, kwargs)
            value = resolve(self.method, key, self._step, full, compute, partial)
            self._record(key, value)
            return site.pack(value)

        return forward

    def _probe(self, site: Site, key: SiteKey, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out, received = site.attention_probe(original, args, kwargs)
        self._received[key] = received
        return out

    def _partial(self, site: Site, key: SiteKey, original: Callable[..., Any], args: tuple,
                 kwargs: dict) -> tuple[Tokens, Callable[[Tensor], Tensor]]:
        """A token-wise site at a partial step: what the method may know of its tokens, and how to compute some."""
        hidden = hidden_states(args, kwargs)  # (B, tokens, D)
        attention = self._received.get(SiteKey(site.scored_by, key.branch)) if site.scored_by else None
        attention = None if attention is None else site.score_tokens(attention)
        tokens = Tokens(site.role, *site.layer, batch=hidden.shape[0], count=hidden.shape[1], attention=attention,
                        paired=self.batched_cfg)

        def compute_tokens(indices: Tensor) -> Tensor:
            fresh = hidden.gather(1, token_index(indices, hidden.shape))  # (B, k, D)
            a, kw = with_hidden_states(args, kwargs, fresh)
            return site.unpack(original(*a, **kw))

        return tokens, compute_tokens

    def _tokens(self, site: Site, batch: int, count: int) -> Tokens:
        return Tokens(site.role, *site.layer, batch=batch, count=count, paired=self.batched_cfg, layout=site.layout)

    def _delta(self, site: Site, key: SiteKey, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A site at a DELTA step: its attention core or its MLP computed by the delta method."""
        step, method = self._step, self.method
        if site.attention_core is not None:
            def core(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:  # (B, heads, S, d)
                return method.attend(key, step, self._tokens(site, q.shape[0], q.shape[2]), q, k, v, mask)

            out = site.attention_core(original, args, kwargs, core)
            self._record(key, site.unpack(out))
            return out
        ops = self._ffn_ops[site.name]
        if site.ffn.head:  # a fused projection: the MLP input came from `up`; the attention part is computed here
            x = self._ffn_inputs.pop(key)
            attention = hidden_states(args, kwargs)  # (B, S, head): `up` handed the block an empty hidden part
            value = F.linear(attention, site.ffn.down.weight[:, :site.ffn.head], site.ffn.down.bias)
            value = value + method.feed_forward(key, step, self._tokens(site, x.shape[0], x.shape[1]), x, ops)
        else:
            x = hidden_states(args, kwargs)  # (B, S, D)
            value = method.feed_forward(key, step, self._tokens(site, x.shape[0], x.shape[1]), x, ops)
        self._record(key, value)
        return site.pack(value)

    def _wrap_ffn_up(self, site: Site, original: Callable[..., Any]) -> Callable[..., Any]:
        """A fused projection's MLP input projection: at a DELTA step it keeps its input for the delta method and
        returns an empty (B, S, 0) hidden part, so the activation and the concatenation in front of the fused
        projection cost nothing; otherwise it runs."""

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._plan is not None and self._plan.delta:
                self._ffn_inputs[SiteKey(site.name, self.branch)] = x
                return x.new_empty(*x.shape[:-1], 0)
            return original(x, *args, **kwargs)

        return forward

    def _is_full(self, site: Site, key: SiteKey, args: tuple, kwargs: dict) -> bool:
        if not self.method.adaptive:
            return self.method.computes(key, self._step, self._plan)
        full = self.method.decide(key, self._step, site.signal(args, kwargs))
        self._decided_full = bool(self._decided_full) or full
        return full

    def _record(self, key: SiteKey, value: Tensor) -> None:
        if self.trace is not None:
            self.trace.values[key].append(value.detach().to("cpu", copy=True))

    def _wrap_span_head(self, site: Site, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._step is None:
                return original(*args, **kwargs)
            key = SiteKey(site.name, self.branch)
            state = site.read(args, kwargs)
            if self._is_full(site, key, args, kwargs):
                out = original(*args, **kwargs)
                if site.span:
                    self._span_input[key] = state
                    return out
                return self._span_done(site, key, state, out)
            self._span_input[key] = None
            value = self.method.give(key, self.method.forecast(key, self._step))
            self._record(key, value)
            return site.pack(value if self.method.stack_output else state + value)

        return forward

    def _wrap_span_tail(self, site: Site, original: Callable[..., Any], last: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._step is None:
                return original(*args, **kwargs)
            key = SiteKey(site.name, self.branch)
            hidden_in = self._span_input.get(key)
            if hidden_in is None:  # the stack is forecast at this step: pass through
                return site.pack(site.read(args, kwargs))
            out = original(*args, **kwargs)
            return self._span_done(site, key, hidden_in, out) if last else out

        return forward

    def _span_done(self, site: Site, key: SiteKey, hidden_in: Tensor, out: Any) -> Any:
        """A computed stack's last block returned `out`: hands the residual (or, with `stack_output`, the output)
        to the method; returns the stack's output (with `stack_output`, the value the method gives back)."""
        if not self.method.stack_output:
            residual = site.unpack(out) - hidden_in
            self.method.update(key, self._step, self.method.keep(key, residual))
            self._record(key, residual)
            return out
        self.method.update(key, self._step, self.method.keep(key, site.unpack(out)))
        value = self.method.give(key, self.method.forecast(key, self._step))
        self._record(key, value)
        return site.pack(value)

    def _wrap_feeder(self, site: Site, original: Callable[..., Any],
                     stand_in: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            plan = self._plan
            # its only consumer is not computed at this step: a forecast step, or a partial step at which only
            # token-wise sites recompute tokens (a single block's attention and MLP input feed a fused output
            # that a partial step reuses whole), unless the method computes this site at this step anyway
            if plan is not None and not plan.full and not (plan.partial and site.tokenwise) \
                    and not self.method.computes(SiteKey(site.name, self.branch), self._step, plan):
                return stand_in(*args, **kwargs)
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


def compile_sites(sites: list[Site], backend: str = "inductor", mode: Optional[str] = None) -> int:
    """Compiles the computation of every site and feeder module with `torch.compile` (regional compilation), so
    the caching logic around it stays in eager Python: the engine's wrappers decide per step whether to call the
    compiled forward, and no step's decision, index or time reaches a graph, so nothing recompiles from step to
    step (tested). Every method, `none` included, runs the same compiled modules. Idempotent.

    Args:
        sites: the adapter's sites; the modules of attention, MLP and fused sites and their feeders are compiled,
            whatever the method (a block or the whole model would capture the hooks of the sites inside them; the
            block-skipping methods run the same compiled modules within their blocks).
        backend: `torch.compile` backend (`inductor`; `aot_eager` compiles without code generation).
        mode: `torch.compile` mode (inductor only; `foca_bench.fused.regional_mode` keeps CUDA graphs out).

    Returns:
        How many modules were compiled now.
    """
    import torch

    modules: dict[int, nn.Module] = {}
    for site in sites:
        if site.role not in ("attn", "mlp", "fused"):
            continue
        for module in (site.module, *(f for f, _ in site.feeders)):
            modules.setdefault(id(module), module)
    count = 0
    for module in modules.values():
        current = module.__dict__.get("forward")
        if current is not None:
            if getattr(current, "foca_compiled", False):
                continue
            raise RuntimeError("compile_sites runs before any engine hooks the model.")
        compiled = torch.compile(module.forward, backend=backend, mode=mode)
        compiled.foca_compiled = True
        module.forward = compiled
        count += 1
    return count
