"""Display names: what tables and figures call methods, models and metrics, and each record's row label.

Registry keys (`foca`, `dit_xl_2`, `fid`) are the names everywhere else; only tables, figures and experiment
tracking show these.
"""

import dataclasses
from functools import lru_cache

from omegaconf import OmegaConf

import methods
from foca_bench import REPO_DIR

METHOD_NAMES = {"none": "DDIM", "reuse": "Reuse", "fora": "FORA", "taylorseer": "TaylorSeer", "foca": "FoCa",
                "teacache": "TeaCache", "delta_dit": "Δ-DiT", "diffusers_taylorseer": "diffusers TaylorSeer",
                "diffusers_fbcache": "diffusers FBCache", "diffusers_pab": "diffusers PAB", "toca": "ToCa",
                "duca": "DuCa", "diffusers_magcache": "diffusers MagCache", "dbcache": "DBCache",
                "cachedit_taylorseer": "cache-dit TaylorSeer", "cachedit_foca": "cache-dit FoCa",
                "diffusers_fastercache": "diffusers FasterCache", "chipmunk": "Chipmunk", "smoothcache": "SmoothCache",
                "l2c": "L2C", "abcache": "AB-Cache", "foca_adaptive": "Adaptive FoCa"}
ALWAYS_SHOWN = {"taylorseer": ("O",), "teacache": ("l",), "diffusers_taylorseer": ("O",),  # as the paper's labels do
                "diffusers_fbcache": ("threshold",), "diffusers_magcache": ("threshold",),
                **{name: ("Fn", "Bn") for name in ("dbcache", "cachedit_taylorseer", "cachedit_foca")},
                "smoothcache": ("alpha",), "l2c": ("threshold",), "foca_adaptive": ("tol",)}
MODEL_NAMES = {
    "toy_dit": "toy_dit: 1.4M-parameter DiT on scikit-learn digits (16x16). TOY MODEL, not the paper's benchmark",
    "dit_xl_2": "DiT-XL/2 256x256",
    "flux": "FLUX.1-dev 1024x1024",
    "hunyuan_video": "HunyuanVideo 480x640, 65 frames",
    "inf_dit": "Inf-DiT 512→2048 (EDM Heun, 39 evaluations)",
}
METRIC_NAMES = {"fid": "FID", "is": "IS", "class_acc": "Acc", "psnr": "PSNR", "ssim": "SSIM", "rel_l2": "RelL2",
                "image_reward": "ImageReward", "clip_score": "CLIP", "vbench": "VBench(%)"}


def label(record: dict) -> str:
    """The row name: the paper's naming, plus every knob that differs from the method's defaults."""
    method, cache = record["method"], cache_knobs(record)
    steps = record["config"]["sampler"]["steps"]
    if method == "none":
        return f"DDIM-{steps} steps"
    name = METHOD_NAMES.get(method, method)
    knobs = [f"N={cache['N']}"] if "N" in cache else []  # schedule-free methods have no N in their identity
    if method == "foca" and cache.get("corrector") == "none":
        name = "BDF2-only"
    for key in non_default_knobs(record, show_order=True):
        if key != "corrector":
            knobs.append(f"{key}={cache[key]}")
    suffix = "" if steps == 50 else f", {steps} steps"
    return f"{name} ({', '.join(knobs)}{suffix})"


@lru_cache(maxsize=None)
def model_method_settings(model: str, method: str) -> dict:
    """The knobs `conf/model_method/<model>_<method>.yaml` sets: the model's own defaults for the method."""
    path = REPO_DIR / "conf" / "model_method" / f"{model}_{method}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}


def cache_knobs(record: dict) -> dict:
    """A record's cache knobs, with the values its identity leaves out (`CacheConfig.omit_from_identity`)."""
    return {**methods.get(record["method"]).config_class.omit_from_identity, **record["config"]["cache"]}


def non_default_knobs(record: dict, show_order: bool = False) -> list[str]:
    """Cache knobs of a record beyond N that differ from the method's defaults (`show_order`: also the knobs the
    paper always names, e.g. TaylorSeer's order). Model-specific knobs (TeaCache's polynomial) are not knobs of
    a row, nor is a knob at the model's own default (`conf/model_method/`, e.g. TaylorSeer's first_enhance or
    FORA's FLUX schedule; a record from before those files also carries them as `model.method_defaults`)."""
    cache = cache_knobs(record)
    cls = methods.get(record["method"])
    specialized = model_method_settings(record["config"]["model"]["name"], record["method"])  # as the config says
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # list-valued knobs
                for f in dataclasses.fields(cls.config_class)}
    legacy = record["config"]["model"].get("method_defaults") or {}  # a record from before conf/model_method
    defaults.update(legacy.get(record["method"]) or {})
    defaults.update(specialized)
    always = ALWAYS_SHOWN.get(record["method"], ()) if show_order else ()
    knobs = [k for k, v in cache.items() if k not in ("name", "N", "warmup", "steps", *cls.model_specific)
             and (v != defaults.get(k) or k in always)]
    if "warmup" in cache and cache["warmup"] != specialized.get("warmup", record["config"]["model"]["warmup"]):
        knobs.append("warmup")
    return knobs
