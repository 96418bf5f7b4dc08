"""Applies another project's caching hooks for the external methods: diffusers' hooks for `diffusers_*`
(methods/diffusers_hooks.py) and cache-dit's DBCache for `dbcache`, `cachedit_*` (methods/cachedit.py).

The only place that hands a model to another project's caching code: `attach(cfg, model, now, features)` applies
what `cfg.name` names and returns a handle whose `reset(batched_cfg)` clears its state before every generation,
`set_context(branch)` follows the engine's CFG branch and `detach()` removes it and leaves the model as it was.
diffusers: batched-CFG models run in one cache context (`cond_uncond`); separate cond/uncond passes switch diffusers'
cache context with the engine's, as diffusers' pipelines do with `cache_context`. cache-dit: see `CacheDiT`.
"""

import os
import re
from typing import Callable, Sequence

from torch import nn

BATCHED = "cond_uncond"  # the one context of a batched-CFG forward, and of an engine's `default` branch
CACHE_DIT = ("dbcache", "cachedit_taylorseer", "cachedit_foca")


def attach(cfg, model: nn.Module, now: Callable[[], float], features: Sequence[nn.Module]):
    """Applies the external method `cfg` to `model`.

    Args:
        cfg: the method's config.
        model: the transformer.
        now: the current scheduler timestep (PAB's and FasterCache's active ranges).
        features: the modules the adapter's attention/MLP/fused sites cache (diffusers' TaylorSeer caches them).

    Returns:
        The handle (`DiffusersHooks` or `CacheDiT`): `reset(batched_cfg)`, `set_context(branch)`, `detach()`.
    """
    if cfg.name in CACHE_DIT:
        return CacheDiT(cfg, model)
    return DiffusersHooks(cfg, model, now, features)


def _identifiers(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Exact-name regexes of `modules` inside `model`: diffusers' TaylorSeer hook caches what our sites cache."""
    wanted = {id(m) for m in modules}
    return [f"^{re.escape(name)}$" for name, m in model.named_modules() if id(m) in wanted]


def _hook_names(name: str) -> list[str]:
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast
    from diffusers.hooks import taylorseer_cache

    return {
        "diffusers_magcache": [mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK],
        "diffusers_taylorseer": [taylorseer_cache._TAYLORSEER_CACHE_HOOK],
        "diffusers_fbcache": [first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK],
        "diffusers_pab": [pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK],
        "diffusers_fastercache": [faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK],
    }[name]


class DiffusersHooks:
    """diffusers' own hook for a `diffusers_*` config on the whole model."""

    def __init__(self, cfg, model: nn.Module, now: Callable[[], float], features: Sequence[nn.Module]) -> None:
        import torch
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.cfg, self.model = cfg, model
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
        elif cfg.name == "diffusers_fastercache":
            self._apply_faster_cache(now)
        else:
            raise ValueError(f"no diffusers hook for method {cfg.name!r}")
        self._invalidate()  # the registry caches its children: make it see the hooks just added
        _set_cache_context(model, CacheContext(BATCHED))

    def _apply_faster_cache(self, now: Callable[[], float]) -> None:
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache
        from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

        cfg = self.cfg
        apply_faster_cache(self.model, FasterCacheConfig(
            spatial_attention_block_skip_range=cfg.N, spatial_attention_timestep_skip_range=tuple(cfg.attention_range),
            attention_weight_callback=lambda _: cfg.attention_weight,
            unconditional_batch_skip_range=cfg.uncond_N,
            unconditional_batch_timestep_skip_range=tuple(cfg.uncond_range),
            alpha_low_frequency=cfg.alpha_low_frequency, alpha_high_frequency=cfg.alpha_high_frequency,
            low_frequency_weight_update_timestep_range=tuple(cfg.low_frequency_range),
            high_frequency_weight_update_timestep_range=tuple(cfg.high_frequency_range),
            tensor_format="BCHW", current_timestep_callback=now,
            # DiT passes its labels as `class_labels`: they are halved with the rest when the uncond half is skipped
            _unconditional_conditional_input_kwargs_identifiers=[*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS,
                                                                 "class_labels"]))

    def _hooks(self, name: str) -> list:
        return [m._diffusers_hook.get_hook(name) for m in self.model.modules()
                if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(name) is not None]

    def reset(self, batched_cfg: bool = False) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        _set_cache_context(self.model, CacheContext(BATCHED))
        if self.cfg.name == "diffusers_fastercache":
            # without a CFG batch (a guidance-distilled model, or guidance 1) only the attention part applies
            for name in _hook_names(self.cfg.name):
                for hook in self._hooks(name):
                    hook.is_guidance_distilled = not batched_cfg

    def set_context(self, branch: str) -> None:
        """Points diffusers' hooks at the state of CFG branch `branch` (the engine's `default` is the batched one)."""
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        if self.cfg.name == "diffusers_fastercache" and branch == "uncond":
            raise ValueError("method=diffusers_fastercache keeps one state per attention module, so it cannot follow "
                             "separate cond/uncond passes (HunyuanVideo's model.true_cfg_scale > 1): use "
                             "model.true_cfg_scale=1.")
        _set_cache_context(self.model, CacheContext(BATCHED if branch == "default" else branch))

    def detach(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(self.model, None)
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        for name in _hook_names(self.cfg.name):
            registry.remove_hook(name, recurse=True)
        self._invalidate()
        for module in self.model.modules():  # diffusers restores `forward` as an instance attribute: drop it
            bound = module.__dict__.get("forward")
            if getattr(bound, "__self__", None) is module and bound.__func__ is type(module).forward:
                del module.forward

    def _invalidate(self) -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        if hasattr(registry, "invalidate_child_registries_cache"):
            registry.invalidate_child_registries_cache()


class CacheDiT:
    """cache-dit's DBCache (with its TaylorSeer or FoCa calibrator) on a transformer, in cache-dit's transformer-only
    mode (`cache_dit.enable_cache(transformer, ...)`, vipshop/cache-dit, PyPI `cache-dit` >= 1.5).

    - Reset: `cache_dit.refresh_context` re-creates every cache context (and its calibrators) before a generation.
    - Workaround for cache-dit's transformer-only mode: `enable_cache` sets `_is_cached` on the class of the
      placeholder pipeline it wraps every bare transformer in (`FakeDiffusionPipeline`, shared by all of them), and
      `disable_cache` never removes it; without the instance check PyPI's 1.5.3 adds (vipshop/cache-dit@f86744af
      lacks it) a second `enable_cache` in the process takes the fresh placeholder for already cached and fails in
      `collect_unified_blocks` (`assert hasattr(block_adapter.pipe, "_context_manager")`). The flag is dropped
      before every attach and after every detach.
    - cache-dit patches the transformer's `forward` (DiT, FLUX: its patch functor; `disable_cache` keeps the
      patched one) and adds attributes and a submodule (`_norm1_emb`): `detach` restores every module's instance
      `forward`, removes what was added and puts every module's children back as they were (objects and order: its
      `mock.patch` of FLUX's `single_transformer_blocks` re-inserts that list last), so a later engine finds the
      model as before.
    - CFG: cache-dit tells a separate uncond pass by the parity of its calls (`enable_separate_cfg`, cond first);
      an `uncond` branch without `cache.separate_cfg=true` is refused.
    """

    def __init__(self, cfg, model: nn.Module) -> None:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # its INFO lines would flood every run's log
        import cache_dit

        self.cfg, self.model = cfg, model
        self._before = {m: (m.__dict__.get("forward"), set(m.__dict__), list(m._modules.items()))
                        for m in model.modules()}
        calibrator = None
        if cfg.name == "cachedit_taylorseer":
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=cfg.O)
        elif cfg.name == "cachedit_foca":
            calibrator = cache_dit.FoCaCalibratorConfig()
        _forget_cached_placeholder()
        try:
            cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=cfg.Fn, Bn_compute_blocks=cfg.Bn, residual_diff_threshold=cfg.threshold,
                max_warmup_steps=cfg.max_warmup_steps, warmup_interval=cfg.warmup_interval,
                max_cached_steps=cfg.max_cached_steps, max_continuous_cached_steps=cfg.max_continuous_cached_steps,
                enable_separate_cfg=cfg.separate_cfg, num_inference_steps=cfg.steps), calibrator_config=calibrator)
        except BaseException:
            self.detach()
            raise

    def reset(self, batched_cfg: bool = False) -> None:
        import cache_dit

        cache_dit.refresh_context(self.model)

    def set_context(self, branch: str) -> None:
        if branch == "uncond" and not self.cfg.separate_cfg:
            raise ValueError(f"method={self.cfg.name}: this model runs separate cond/uncond passes; set "
                             "cache.separate_cfg=true so cache-dit keeps a state for each (cond first).")

    def cached_steps(self) -> dict[str, list[int]]:
        """The steps cache-dit cached in the last generation, per cache context (one per block stack)."""
        manager = self.model._context_manager
        return {name: manager.get_context(name).get_cached_steps() for name in self.model._context_names}

    def detach(self) -> None:
        import cache_dit

        if getattr(self.model, "_context_manager", None) is not None:
            cache_dit.disable_cache(self.model)
        _forget_cached_placeholder()
        for module, (forward, attrs, children) in self._before.items():
            for key in set(module.__dict__) - attrs:
                del module.__dict__[key]
            if list(module._modules.items()) != children:  # added, replaced or reordered children (cache-dit's
                module._modules.clear()                      # mock.patch of `single_transformer_blocks` moves it
                module._modules.update(children)             # to the end of FLUX's children, and FBCache's hooks
            if forward is not None:                          # then take the wrong head and tail blocks)
                module.forward = forward


def _forget_cached_placeholder() -> None:
    """Drops the `_is_cached` flag cache-dit leaves on its shared placeholder pipeline class (see `CacheDiT`)."""
    from cache_dit.caching.block_adapters import FakeDiffusionPipeline

    if "_is_cached" in vars(FakeDiffusionPipeline):
        del FakeDiffusionPipeline._is_cached
