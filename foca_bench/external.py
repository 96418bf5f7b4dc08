"""Applies diffusers' own caching hooks for the `diffusers_*` methods (methods/diffusers_hooks.py).

The only place that hands a model to another project's caching code: `attach(cfg, model, now)` applies the hook
matching `cfg.name` and returns a `detach()` that removes it; `reset(model)` clears its state between
generations. Batched-CFG models run in one cache context (`cond_uncond`); separate cond/uncond passes switch
diffusers' cache context with the engine's (`set_context`), as diffusers' pipelines do with `cache_context`.
"""

import re
from typing import Callable, Sequence

from torch import nn

BATCHED = "cond_uncond"  # the one context of a batched-CFG forward, and of an engine's `default` branch


def _identifiers(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Exact-name regexes of `modules` inside `model`: diffusers' TaylorSeer hook caches what our sites cache."""
    wanted = {id(m) for m in modules}
    return [f"^{re.escape(name)}$" for name, m in model.named_modules() if id(m) in wanted]


def _hook_names(name: str) -> list[str]:
    from diffusers.hooks import first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {
        "diffusers_magcache": [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK],
        "diffusers_taylorseer": [taylorseer_cache._TAYLORSEER_CACHE_HOOK],
        "diffusers_fbcache": [first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK],
        "diffusers_pab": [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK],
    }[name]


def attach(cfg, model: nn.Module, now: Callable[[], float], features: Sequence[nn.Module]) -> Callable[[], None]:
    """Applies the diffusers hook for `cfg` (a `diffusers_*` method config) to `model`.

    Args:
        cfg: the method's config.
        model: the transformer.
        now: the current scheduler timestep (PAB's active range).
        features: the modules the adapter's attention/MLP/fused sites cache (diffusers' TaylorSeer caches them).
    """
    import torch
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    if cfg.name == "diffusers_taylorseer":
        from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=cfg.N, disable_cache_before_step=max(cfg.warmup or 0, 1), max_order=cfg.O,
            taylor_factors_dtype=getattr(torch, cfg.dtype or "float32"),
            cache_identifiers=_identifiers(model, features)))
    elif cfg.name == "diffusers_fbcache":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=cfg.threshold))
    elif cfg.name == "diffusers_pab":
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=cfg.N, spatial_attention_timestep_skip_range=(cfg.low, cfg.high),
            spatial_attention_block_identifiers=(r"transformer_blocks\.\d+",), current_timestep_callback=now))
    elif cfg.name == "diffusers_magcache":
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if cfg.steps is None:
            raise ValueError("diffusers_magcache needs cache.steps (the run's sampler.steps; `validate` fills it).")
        apply_mag_cache(model, MagCacheConfig(
            threshold=cfg.threshold, max_skip_steps=cfg.max_skip_steps, retention_ratio=cfg.retention_ratio,
            num_inference_steps=cfg.steps, mag_ratios=list(cfg.mag_ratios)))
    else:
        raise ValueError(f"no diffusers hook for method {cfg.name!r}")
    _invalidate(model)  # the registry caches its children: make it see the hooks just added
    _set_cache_context(model, CacheContext(BATCHED))

    def detach() -> None:
        _set_cache_context(model, None)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in _hook_names(cfg.name):
            registry.remove_hook(name, recurse=True)
        _invalidate(model)
        for module in model.modules():  # diffusers restores `forward` as an instance attribute: drop it
            bound = module.__dict__.get("forward")
            if getattr(bound, "__self__", None) is module and bound.__func__ is type(module).forward:
                del module.forward

    return detach


def _invalidate(model: nn.Module) -> None:
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def reset(model: nn.Module) -> None:
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    _set_cache_context(model, CacheContext(BATCHED))


def set_context(model: nn.Module, branch: str) -> None:
    """Points diffusers' hooks at the state of CFG branch `branch` (the engine's `default` is the batched one)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(BATCHED if branch == "default" else branch))
