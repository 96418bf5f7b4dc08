"""Structured-config schemas, registered in Hydra's ConfigStore.

Composition against these dataclasses turns a typo (`sampler.stpes=5`), a wrong type (`sampler.steps=abc`) or
an unknown group option (`method=focaa`) into an error before any weights load. Method schemas are registered
by `methods.register` (group `schema/method`), benchmark schemas by `foca_bench.benchmarks.register_benchmark`
(group `benchmark`); `validate` runs the cross-field checks of each method's `__post_init__` and the cross-group
ones (a Taylor order the schedule cannot support, ...). Settings that depend on the model and the method together
(TeaCache's polynomial) are Hydra specializing configs, `conf/model_method/<model>_<method>.yaml`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import methods
from foca_bench.benchmarks import BenchmarkConfig
from methods.base import CacheConfig


@dataclass
class ModelConfig:
    """A model: where its weights are and the architecture/sampling settings of its paper setup.

    Attributes:
        name: registry key of the adapter, the same string as `conf/model/<name>.yaml`.
        hub_id: Hugging Face id of the weights (documentation and error messages; nothing is downloaded).
        path: local copy of the weights in diffusers' folder layout; null uses the bundled copy or the hub
            cache.
        weights: `pretrained` (load `path`/`hub_id`), `random` (same classes, random init) or `meta` (no
            memory, FLOP counting only).
        warmup: the model's default `cache.warmup`.
        lineage: the model's default `sampler.lineage`.
        text_tokens: prompt length in tokens of a text-conditioned model (FLUX's T5 `max_sequence_length`).
        size: `full` (the paper's architecture) or `tiny`: the same diffusers classes at a small width, with
            random weights (`weights=pretrained` becomes `random`), so the whole pipeline (VAE decode included)
            runs on a CPU in seconds.
        tiny: the model keys `size=tiny` replaces (nested: `arch` keys merge into `arch`), except those the
            command line sets (`model.size=tiny model.resolution=128` is a tiny model at 128 px).
        compile: a `torch.compile` backend (`inductor`; `aot_eager` captures without code generation); null:
            eager. Methods whose forecasts are linear combinations (FORA, TaylorSeer, FoCa) and `none` run every
            step as one compiled graph of the whole model, a skipped step's forecasts fused into its gates and
            residual adds (`foca_bench/fused.py`); the others get their sites' modules compiled regionally
            (`hooks.compile_sites`). Nothing recompiles per step or per generation.
        offload: `none` or `model` (diffusers' model CPU offload: the weights stay in host memory and each
            component moves to the device when it runs). The memory plan (`foca_bench/memory.py`) says what fits.
        memory_budget_gb: the device memory the run may use (its memory plan's budget); null: what is free.
        compile_mode: torch.compile's `mode` with `compile=inductor`: null (default), `reduce-overhead` (CUDA
            graphs of the compiled steps), `max-autotune`, `max-autotune-no-cudagraphs`.
        precompute_conditioning: evaluate the per-step conditioning embeddings (timestep and class or text
            pooled embeddings) once per generation instead of once per block and step; same FLOPs, less per-step
            overhead for full and skipped steps alike, values equal up to float32 rounding (the batched matmul
            rounds differently, ~1e-7 relative; docs/methods.md). `false` computes them step by step.
    """

    name: str = MISSING
    hub_id: Optional[str] = None
    path: Optional[str] = None
    vae: Optional[str] = None
    weights: str = "pretrained"
    resolution: int = MISSING
    num_classes: int = 0
    guidance_scale: float = 1.0
    warmup: int = 1
    lineage: str = "diffusers"
    dtype: str = "float32"
    arch: Dict[str, Any] = field(default_factory=dict)
    scheduler: Dict[str, Any] = field(default_factory=dict)
    precompute_conditioning: bool = True
    text_tokens: int = 0
    size: str = "full"
    tiny: Dict[str, Any] = field(default_factory=dict)
    compile: Optional[str] = None
    compile_mode: Optional[str] = None
    offload: Any = "none"  # Inf-DiT's is a bool of its own (InfDiTModelConfig)
    memory_budget_gb: Optional[float] = None


@dataclass
class VideoModelConfig(ModelConfig):
    """A text-to-video model (`resolution` is the frame height).

    Attributes:
        width: frame width in pixels.
        frames: video length in frames (the VAE compresses `(frames - 1) / 4 + 1` latent frames).
        true_cfg_scale: real classifier-free guidance on top of the embedded one; above 1 each step runs a
            separate unconditional pass (with `negative_prompt`) in its own cache context, as HunyuanVideoPipeline
            does. 1 (the default) runs the conditional pass only.
        negative_prompt: the unconditional pass's prompt when `true_cfg_scale > 1`.
    """

    width: int = MISSING
    frames: int = MISSING
    true_cfg_scale: float = 1.0
    negative_prompt: str = ""


@dataclass
class InfDiTModelConfig(ModelConfig):
    """Inf-DiT (`model=inf_dit`; `resolution` is the output side, `scheduler` the EDM sigmas).

    Attributes:
        clip_path: an OpenCLIP ViT-L-14 checkpoint, used when the Inf-DiT checkpoint carries no CLIP tower.
        mode: `whole` (the image at each evaluation), `strips` (`strip` full-width block rows through all
            evaluations, then the next strip: the same image, a cache of one strip) or `auto` (whole if the memory
            plan fits, else the widest strips that do).
        strip: block rows per strip in strip mode.
        offload: keep the feature cache and strip mode's memories in host memory (Inf-DiT's own meaning).
    """

    clip_path: Optional[str] = None
    mode: str = "auto"
    strip: int = 4
    offload: bool = False


@dataclass
class SamplerConfig:
    """Attributes:
    steps: number of denoising steps (the paper's "DDIM-k steps" rows are `method=none sampler.steps=k`).
    guidance_scale: classifier-free guidance; null takes `model.guidance_scale`.
    lineage: whose sampling loop runs the model: `diffusers` (the diffusers pipeline's scheduler and guidance) or,
        for DiT models, `dit` (the original DiT repository's respaced DDIM and 3-channel guidance, which the code
        behind the paper's DiT-XL/2 rows builds on; `foca_bench/adapters/dit_sampler.py`); null takes
        `model.lineage`.
    guided_channels: how many leading latent channels classifier-free guidance applies to (the others follow the
        conditional branch); null: the lineage's (`diffusers`: every channel, as DiTPipeline; `dit`: the first
        three, as DiT's `forward_with_cfg`).
    """

    steps: int = 50
    guidance_scale: Optional[float] = None
    lineage: Optional[str] = None
    guided_channels: Optional[int] = None


@dataclass
class ProfileConfig:
    """Attributes:
    flops: count FLOPs over one sample's whole generation with `FlopCounterMode`.
    latency: median wall time of one batch of `batch_size` after `warmup` runs, over `repeats` runs.
    benchmark: run the benchmark's generation and metrics.
    baseline_steps: the step count of the full-compute baseline every speed-up is measured against (the paper's
        tables compare with the 50-step original, so `method=none sampler.steps=25` is a 2x row); null: the
        run's own `sampler.steps`.
    meta: build the model on the meta device with no weights (FLOP counting of any model config).
    tune_malloc: on a CPU with glibc, keep freed tensor memory in the process (`profiling.tune_cpu_allocator`)
        so full steps do not page-fault their intermediates anew; the settings go into the record.
    """

    name: str = "default"
    flops: bool = True
    latency: bool = True
    benchmark: bool = True
    meta: bool = False
    batch_size: int = 16
    warmup: int = 1
    repeats: int = 3
    baseline_steps: Optional[int] = 50
    tune_malloc: bool = True


@dataclass
class LoggerConfig:
    """Experiment tracking; not part of a run's identity.

    Attributes:
        name: `none` (records only) or `wandb`.
        project, entity, group, tags: the wandb run's place (group defaults to the Hydra sweep directory).
        mode: `offline` (no network; `wandb sync <dir>` later), `online` or `disabled`.
        dir: where wandb writes its run directories (`<dir>/wandb/offline-run-*`).
    """

    name: str = "none"
    project: str = "foca-bench"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: str = "offline"
    dir: str = "results"


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    cache: CacheConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    profile: ProfileConfig = MISSING
    logger: LoggerConfig = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"
    trace: bool = False
    results_dir: str = "results"
    force: bool = False
    claim_timeout_s: float = 600.0


def register_resolvers() -> None:
    """`${div:a,b}`: integer division in YAML (a latent side from `model.resolution`)."""
    OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="model", name="video_model_schema", node=VideoModelConfig)
    cs.store(group="model", name="inf_dit_model_schema", node=InfDiTModelConfig)
    cs.store(group="profile", name="profile_schema", node=ProfileConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


register_resolvers()
register_schemas()


def compose(*overrides: str) -> DictConfig:
    """Composes `conf/config.yaml` with command-line style overrides, outside `run.py` (tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from foca_bench import REPO_DIR

    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def split_knobs(argv: list[str], prefix: str, knobs: dict[str, Any]) -> list[str]:
    """Command-line arguments `[+]<prefix>.<knob>=<value>` set `knobs` in place, as the type of the knob's default
    (an unknown knob exits with the valid ones); returns the other arguments, the Hydra overrides (e.g. of
    `python -m foca_bench.calibrate_teacache`)."""
    overrides = []
    for arg in argv:
        key = arg.lstrip("+")
        if not key.startswith(f"{prefix}."):
            overrides.append(arg)
            continue
        name, value = key[len(prefix) + 1:].split("=", 1)
        if name not in knobs:
            raise SystemExit(f"unknown knob {prefix}.{name}; choose from {sorted(knobs)}")
        knobs[name] = type(knobs[name])(value)
    return overrides


def schedule_full_steps(cache: CacheConfig, steps: int) -> int:
    """How many of `steps` steps the method's schedule (`CacheMethod.is_full`) computes in full."""
    is_full = methods.get(cache.name)(cache).is_full
    return sum(1 for i in range(steps) if is_full(i, steps))


def command_line_keys(prefix: str) -> Optional[set[str]]:
    """The keys under `prefix.` that this Hydra job's command line (or sweep cell) sets, e.g. {"resolution",
    "arch.num_layers"} for `model.resolution=128 model.arch.num_layers=3`; None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return None
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {o.key_or_group[len(prefix) + 1:] for o in overrides if o.key_or_group.startswith(f"{prefix}.")}


def sized(model: DictConfig, explicit: Optional[set[str]] = None) -> DictConfig:
    """The model config with its `tiny` block merged in when `size=tiny` (idempotent); the keys the command line
    sets (`explicit`, default `command_line_keys("model")`) keep their values, so `model.size=tiny
    model.resolution=128` is a tiny model at 128 px."""
    if model.size not in ("full", "tiny"):
        raise ValueError(f"model.size={model.size!r}: choose full (the paper's architecture) or tiny (the same "
                         "classes at small width, random weights).")
    if model.size == "full":
        return model
    if not model.tiny:
        raise ValueError(f"model.size=tiny: model `{model.name}` has no `tiny` block in its YAML.")
    explicit = command_line_keys("model") if explicit is None else explicit
    merged = OmegaConf.merge(model, model.tiny)
    for key in explicit or ():
        if OmegaConf.select(model.tiny, key, default=None) is not None:
            OmegaConf.update(merged, key, OmegaConf.select(model, key), merge=False)
    if merged.weights == "pretrained":  # no checkpoint has the tiny shapes; meta (FLOP counting) stays meta
        merged.weights = "random"
    return merged


def unknown_keys(cfg: DictConfig) -> None:
    """Refuses keys that no schema has, which `+group.key=value` adds without a word (Hydra's own hint for a
    typo): each structured node's keys are checked against its dataclass (`cache` against its method's)."""
    from dataclasses import fields, is_dataclass

    def check(node: Any, schema: Any, where: str) -> None:
        known = {f.name: f for f in fields(schema)}
        for key in node:
            if key not in known:
                what = f"method `{node.name}`" if where == "cache" else f"`{where}`"
                raise ValueError(f"{where}.{key}: {what} has no key {key!r}; its keys are {sorted(known)}.")
            child = node._get_node(key)
            if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
                check(child, OmegaConf.get_type(child), f"{where}.{key}")

    for key in cfg:
        if key not in {f.name for f in fields(RunConfig)}:
            raise ValueError(f"{key}: no such key; the top-level keys are {sorted(f.name for f in fields(RunConfig))}.")
    for key in ("model", "benchmark", "profile", "logger", "sampler"):
        check(cfg[key], OmegaConf.get_type(cfg[key]), key)
    check(cfg.cache, methods.get(cfg.cache.name).config_class, "cache")


def validate(cfg: DictConfig) -> CacheConfig:
    """Runs every cross-field check and fills defaults that depend on other groups.

    Returns:
        The method's config dataclass, with `warmup` resolved from the model when null.

    Raises:
        ValueError: with a message that says how to fix the configuration.
    """
    unknown_keys(cfg)
    cfg.model = sized(cfg.model)
    if cfg.cache.warmup is None:
        cfg.cache.warmup = cfg.model.warmup
    if "steps" in cfg.cache and cfg.cache.steps is None:  # methods whose hooks must know T (diffusers_magcache)
        cfg.cache.steps = cfg.sampler.steps
    if cfg.profile.meta:  # FLOP counting on the meta device never needs weights
        cfg.model.weights = "meta"
    if cfg.sampler.guidance_scale is None:
        cfg.sampler.guidance_scale = cfg.model.guidance_scale
    if cfg.sampler.lineage is None:
        cfg.sampler.lineage = cfg.model.lineage
    from foca_bench.adapters import ADAPTERS  # cheap: adapters import diffusers only when they load a model

    lineages = ADAPTERS[cfg.model.name].lineages if cfg.model.name in ADAPTERS else ("diffusers",)
    if cfg.sampler.lineage not in lineages:
        raise ValueError(f"sampler.lineage={cfg.sampler.lineage}: model `{cfg.model.name}` runs "
                         f"{' or '.join(lineages)} (`dit`, the DiT repository's sampler, is for DiT models).")
    cache = OmegaConf.to_object(cfg.cache)  # runs the method's __post_init__ checks
    method_cls = methods.get(cache.name)
    from foca_bench.adapters import ADAPTERS  # a model's own refusals and engine steps

    adapter_cls = ADAPTERS.get(cfg.model.name)
    refusal = adapter_cls.refuse(cfg.model, cache) if adapter_cls else None
    if refusal:
        raise ValueError(refusal)
    if (method_cls.adaptive or method_cls.decides_from_features) and cfg.model.weights == "meta":
        raise ValueError(f"method={cache.name} decides each step from feature values, which the meta device does "
                         "not have: count its FLOPs with model.weights=random (and profile.latency=false) instead "
                         "of profile=flops_only.")
    for key in method_cls.model_specific:
        if getattr(cache, key) in (None, [], (), {}):
            raise ValueError(f"cache.{key} is unset and there is no conf/model_method/{cfg.model.name}_{cache.name}"
                             f".yaml setting it: set one of them; {method_cls.how_to_set}.")
    if cfg.sampler.steps < 1:
        raise ValueError(f"sampler.steps={cfg.sampler.steps} must be >= 1.")
    for key in ("model.guidance_scale", "sampler.guidance_scale", "model.true_cfg_scale"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < 0:
            raise ValueError(f"{key}={value}: a guidance scale must be >= 0 (1 or below runs without guidance on "
                             "CFG models; FLUX and HunyuanVideo embed it as a conditioning value).")
    if cfg.claim_timeout_s <= 0:
        raise ValueError(f"claim_timeout_s={cfg.claim_timeout_s}: the seconds without a heartbeat after which a "
                         "claim is taken over must be > 0.")
    if cfg.model.weights not in ("pretrained", "random", "meta"):
        raise ValueError(f"model.weights={cfg.model.weights!r}: choose pretrained, random or meta.")
    offloads = adapter_cls.offloads if adapter_cls else ("none",)
    if cfg.model.offload not in offloads or type(cfg.model.offload) is not type(offloads[0]):
        raise ValueError(f"model.offload={cfg.model.offload}: model `{cfg.model.name}` takes "
                         f"{' or '.join(map(str, offloads))} (model: diffusers' model CPU offload).")
    if cfg.model.get("compile_mode") is not None and cfg.model.compile != "inductor":
        raise ValueError(f"model.compile_mode={cfg.model.compile_mode} needs model.compile=inductor (it is "
                         f"{cfg.model.compile}): torch.compile's modes are inductor's.")
    order = getattr(cache, "O", None)
    if order is not None and not method_cls.schedule_free:
        engine_steps = adapter_cls.engine_steps(cfg.sampler.steps) if adapter_cls else cfg.sampler.steps
        full = schedule_full_steps(cache, engine_steps)
        if order + 1 > full:
            raise ValueError(f"cache.O={order} needs at least {order + 1} full steps, but sampler.steps="
                             f"{cfg.sampler.steps}, cache.N={cache.N}, cache.warmup={cache.warmup} compute only "
                             f"{full}: lower cache.O or cache.N, or raise sampler.steps.")
    if cfg.profile.baseline_steps is not None and cfg.profile.baseline_steps < 1:
        raise ValueError(f"profile.baseline_steps={cfg.profile.baseline_steps} must be >= 1 (or null: the run's "
                         "own sampler.steps).")
    for key in ("batch_size", "repeats"):
        if cfg.profile[key] < 1:
            raise ValueError(f"profile.{key}={cfg.profile[key]} must be >= 1.")
    if cfg.logger.name not in ("none", "wandb") or cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger={cfg.logger.name} logger.mode={cfg.logger.mode}: choose logger=none or "
                         "logger=wandb with logger.mode=offline|online|disabled.")
    if cfg.benchmark.samples_per_class < 1 or cfg.benchmark.batch_size < 1:
        raise ValueError("benchmark.samples_per_class and benchmark.batch_size must be >= 1.")
    if cfg.benchmark.get("limit") is not None and cfg.benchmark.limit < 1:
        raise ValueError(f"benchmark.limit={cfg.benchmark.limit} must be >= 1 (or null: every sample).")
    if cfg.benchmark.get("num_shards") is not None and not 0 <= (cfg.benchmark.shard or 0) < cfg.benchmark.num_shards:
        raise ValueError(f"benchmark.shard={cfg.benchmark.shard} must lie in [0, benchmark.num_shards="
                         f"{cfg.benchmark.num_shards}).")
    return cache
