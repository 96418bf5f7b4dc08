"""The memory plan of an Inf-DiT generation, said before generating: the feature cache, strip mode's key/value
memories and the working set, against the device's (and, when offloading, the host's) memory.

At 2048x2048 a cache site holds 262,144 tokens x 1280 (671 MB in bf16); 56 sites (attention and MLP of 28 blocks)
x FoCa's three tensors is ~113 GB, ~131 GB with the weights and working set: just inside one H200, and a larger
image, a wider cache dtype or a smaller card does not fit. What fits instead:
- `cache.dtype` narrower than the model's (a float32 model's cache in bfloat16);
- `model.mode=strips`: strips of `model.strip` full-width block rows, each denoised through all evaluations before
  the next, so the cache holds one strip (the engine starts afresh per strip); the price is the key/value memories
  of one block row at every (evaluation, layer) that computes attention;
- `model.offload=true`: the cache and the memories in host memory, moved to the device when used.

The cache's peak is not a per-method table: a fresh copy of the configured method is driven through the run's own
schedule and sites (`methods.base.resolve`, as live generation calls it) on meta tensors of the real sizes, by the
general plan's `foca_bench.memory.cache_peak_bytes`, whose units, budgets and error this module shares. The
memories' peak follows `StripMemory`'s bookkeeping. Both equal the bytes a
tiny run holds (tests/test_inf_dit.py); the working set (weights and the largest activations) is approximate.
`model.mode=auto` runs the first of whole image, then strips from the widest down, that fits: the image is the same.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from foca_bench import memory as general
from foca_bench.hooks import Site
from foca_bench.memory import GB, MemoryPlanError, budgets, size  # noqa: F401  (shared with the general plan)
from methods.base import CacheConfig, SiteKey, Step

ACTIVATION_WIDTHS = 24  # ~ live (tokens x hidden) tensors of a block's forward: qkv, 4 neighbours' k and v, MLP 4x


@dataclass(frozen=True)
class Setting:
    """One way to run: the knobs that change memory, as a user sets them."""

    mode: str  # whole | strips
    strip: int  # block rows per strip (strips)
    offload: bool
    cache_dtype: Optional[str]

    def overrides(self) -> str:
        parts = [f"model.mode={self.mode}"] + ([f"model.strip={self.strip}"] if self.mode == "strips" else [])
        parts.append(f"model.offload={str(self.offload).lower()}")
        if self.cache_dtype:
            parts.append(f"cache.dtype={self.cache_dtype}")
        return " ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """Bytes one setting needs: the method's feature cache, strip mode's key/value memories, the working set."""

    setting: Setting
    cache_bytes: int
    memory_bytes: int
    working_bytes: int

    def device_bytes(self) -> int:
        return self.working_bytes + (0 if self.setting.offload else self.cache_bytes + self.memory_bytes)

    def host_bytes(self) -> int:
        return self.cache_bytes + self.memory_bytes if self.setting.offload else 0


@dataclass(frozen=True)
class Generation:
    """What a generation's memory depends on besides the `Setting`."""

    cache: CacheConfig
    sites: tuple[Site, ...]  # the sites the engine hooks for the method
    widths: dict  # per-token elements of a site's tensor, by role (the model output's p*p*channels, else hidden)
    image_blocks: tuple[int, int]  # (rows, cols) of UniBA blocks
    block_tokens: int
    hidden: int
    layers: int
    batch: int
    evaluations: int
    dtype: torch.dtype
    weights_bytes: int


def cache_peak_bytes(gen: Generation, cache: CacheConfig, tokens: int) -> tuple[int, int]:
    """The method's peak cache bytes over one generation of `tokens` tokens per site (per strip in strip mode), and
    how many (evaluation, layer) pairs run self-attention: the general plan's `cache_peak_bytes` driven on meta
    tensors of (batch, tokens, width) per site."""
    values = {SiteKey(s.name): ((gen.batch, tokens, gen.widths[s.role]), gen.dtype) for s in gen.sites}
    shapes = general.Shapes({s.name: s for s in gen.sites}, values, {k: v[0] for k, v in values.items()}, 0)
    pairs = 0

    def count(step: Step, computed: dict[SiteKey, bool]) -> None:
        nonlocal pairs
        pairs += _attention_runs(gen, {k.site: full for k, full in computed.items()})

    return general.cache_peak_bytes(cache, shapes, gen.evaluations, on_step=count), pairs


def _attention_runs(gen: Generation, computed: dict[str, bool]) -> int:
    """Layers whose self-attention runs at an evaluation, as far as the method's sites tell."""
    for role in ("attn", "block"):
        sites = [s for s in gen.sites if s.role == role]
        if sites:
            return sum(computed[s.name] for s in sites)
    if gen.sites:  # a stack or model site: every layer runs exactly when it is computed
        return gen.layers * int(any(computed.values()))
    return gen.layers  # nothing cached: every layer runs


def memory_peak_bytes(image_rows: int, strip: int, row_bytes: int, pairs: int) -> int:
    """Strip mode's `StripMemory` peak: one block row's keys and values (`row_bytes`) per (evaluation, layer) pair
    that runs attention, once there is a strip below the first."""
    return row_bytes * pairs if strip < image_rows else 0


def estimate(setting: Setting, gen: Generation) -> Estimate:
    rows, cols = gen.image_blocks
    tokens = (min(setting.strip, rows) if setting.mode == "strips" else rows) * cols * gen.block_tokens
    cache_bytes, pairs = cache_peak_bytes(gen, replace(gen.cache, dtype=setting.cache_dtype), tokens)
    itemsize = torch.empty(0, dtype=gen.dtype).element_size()
    memory = 0
    if setting.mode == "strips":
        row_bytes = 2 * gen.batch * cols * gen.block_tokens * gen.hidden * itemsize
        memory = memory_peak_bytes(rows, setting.strip, row_bytes, pairs)
    working = gen.weights_bytes + ACTIVATION_WIDTHS * gen.batch * tokens * gen.hidden * itemsize
    return Estimate(setting, cache_bytes, memory, working)


def describe(e: Estimate) -> str:
    return (f"{e.setting.overrides()}: feature cache {size(e.cache_bytes)}, strip memories {size(e.memory_bytes)}, "
            f"working set ~{size(e.working_bytes)} -> device {size(e.device_bytes())}, host {size(e.host_bytes())}")


def strip_sizes(rows: int) -> list[int]:
    """Strip heights worth trying, widest first: the divisors of the image's block rows below it."""
    return [s for s in range(rows - 1, 0, -1) if rows % s == 0]


def alternatives(current: Setting, rows: int, narrower: Optional[str], strips_allowed: bool) -> list[Setting]:
    """The settings worth offering instead: strips of each height, offloading, a narrower cache dtype."""
    out = []
    for dtype in dict.fromkeys([current.cache_dtype, narrower or current.cache_dtype]):
        for offload in (False, True):
            out.append(Setting("whole", current.strip, offload, dtype))
            out += [Setting("strips", s, offload, dtype) for s in strip_sizes(rows) if strips_allowed]
    return [s for s in dict.fromkeys(out) if s != current]


def plan(current: Setting, gen: Generation, device: torch.device, budget_gb: Optional[float],
         narrower: Optional[str], strips_allowed: bool) -> Estimate:
    """The estimate of the setting to run: `current`, or for `mode=auto` the first of the whole image and strips
    from the widest down that fits (same image, same offload and cache dtype).

    Raises:
        MemoryPlanError: it does not fit; the message lists every setting that does (or says none does).
    """
    device_budget, host_budget = budgets(device, budget_gb)
    fits = lambda e: e.device_bytes() <= device_budget and e.host_bytes() <= host_budget  # noqa: E731
    candidates = [current]
    if current.mode == "auto":
        candidates = [replace(current, mode="whole")] + [replace(current, mode="strips", strip=s)
                                                          for s in strip_sizes(gen.image_blocks[0]) if strips_allowed]
    tried = []
    for setting in candidates:
        tried.append(estimate(setting, gen))
        if fits(tried[-1]):
            return tried[-1]
    options = [estimate(s, gen) for s in alternatives(candidates[0], gen.image_blocks[0], narrower, strips_allowed)
               if s not in candidates]
    ok = [describe(e) for e in options if fits(e)]
    advice = ("These fit:\n  " + "\n  ".join(ok)) if ok else (
        "No mode, strip height, cache dtype or offloading fits: lower the resolution or the batch, or use a device "
        "with more memory.")
    raise MemoryPlanError(
        f"<inf_dit> memory plan: {'; '.join(describe(e) for e in tried)}: more than the device's "
        f"{size(device_budget)} (host: {size(host_budget)} available; model.memory_budget_gb overrides the device "
        f"figure). Nothing was generated. {advice}")
