"""Applies diffusers' own caching hooks for the `diffusers_*` methods (methods/diffusers_hooks.py).

The only place that hands a model to another project's caching code: `attach(cfg, model, now)` applies the hook
matching `cfg.name` and returns a `detach()` that removes it; `reset(model)` clears its state between
generations. Batched-CFG models run in one cache context (`cond_uncond`).
"""

from typing import Callable

from torch import nn

# the module names our `attn`/`mlp` sites cache, as diffusers' regex identifiers (DiT / BasicTransformerBlock)
_ATTN_FF = [r"transformer_blocks\.\d+\.(attn1|ff)"]


def _hook_names(name: str) -> list[str]:
    from diffusers.hooks import first_block_cache, mag_cache, pyramid_attention_broadcast, taylorseer_cache

    return {
        "diffusers_magcache": [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK],
        "diffusers_taylorseer": [taylorseer_cache._TAYLORSEER_CACHE_HOOK],
        "diffusers_fbcache": [first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK],
        "diffusers_pab": [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK],
    }[name]


def attach(cfg, model: nn.Module, now: Callable[[], float]) -> Callable[[], None]:
    """Applies the diffusers hook for `cfg` (a `diffusers_*` method config) to `model`."""
    import torch
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    if cfg.name == "diffusers_taylorseer":
        from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=cfg.N, disable_cache_before_step=cfg.warmup or 0, max_order=cfg.O,
            taylor_factors_dtype=torch.float32, cache_identifiers=_ATTN_FF))
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
    _set_cache_context(model, CacheContext("cond_uncond"))

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
    _set_cache_context(model, CacheContext("cond_uncond"))
