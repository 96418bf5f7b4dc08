"""Inf-DiT (arXiv:2405.04312), our implementation: against the original code's numbers, the checkpoint key map,
strip mode against the whole image, every interval method on it, the step axis, and the memory plan against the bytes
a tiny run holds.

The original's numbers are `tests/golden/inf_dit_tiny.safetensors`: a seeded tiny instance (inputs and weights from
tests/build_inf_dit_golden.py) that THUDM/Inf-DiT@e710c3f's own code ran once on CPU in float32 (flash_attn replaced
by torch's SDPA; docs/models.md has the recipe)."""

import re

import pytest
import torch
from safetensors.torch import load_file

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import MissingWeightsError
from foca_bench.config import schedule_full_steps, validate
from foca_bench.hooks import CacheEngine
from foca_bench.inf_dit import memory as memory_plan
from foca_bench.inf_dit.checkpoint import UNUSED, CheckpointKeyError, load_into, map_state, original_names
from foca_bench.inf_dit.model import ClipImageEmbedding, InfDiT, Strip
from foca_bench.inf_dit.sampler import denoiser, edm_sigmas, evaluations, heun
from foca_bench.generation import generate, generate_examples
from tests import build_inf_dit_golden as golden_build
from tests.conftest import REPORTED, make_cfg

TINY = ("model=inf_dit", "model.size=tiny", "benchmark=div8k")
STEPS = 4  # 7 evaluations
INTERVAL_METHODS = sorted(m for m, cls in methods.METHODS.items()
                          if not cls.external and cls.name not in ("none", "l2c"))  # L2C: DiT only (refused)
# SmoothCache's calibration is per step count: 4 Heun steps are 7 evaluations, so 6 and 5 errors per lookahead
KNOBS = {"teacache": ("cache.coefficients=[1.0,0.0]",), "toca": ("cache.score=random",),
         "duca": ("cache.score=random",),
         "smoothcache": ("cache.alpha=0.2", "+cache.errors.attn=[[0.1,0.1,0.1,0.1,0.1,0.1],[0.1,0.1,0.1,0.1,0.1]]")}


@pytest.fixture(scope="module")
def golden():
    return load_file(str(golden_build.GOLDEN))


@pytest.fixture(scope="module")
def adapters():
    built = {}

    def get(cfg):
        key = repr(cfg.model)
        if key not in built:
            built[key] = build_adapter(cfg.model, "cpu")
        return built[key]

    return get


_RUNS: dict = {}


def _run(adapters, *overrides, measure_cache=False):
    """Two samples of the tiny model (memoised per overrides: generation is deterministic)."""
    key = (overrides, measure_cache)
    if key not in _RUNS:
        cfg = make_cfg(*TINY, f"sampler.steps={STEPS}", *overrides)
        cache = validate(cfg)
        adapter = adapters(cfg)
        stats: dict = {}
        images, = generate(adapter, cache, cfg.sampler, [([0, 1], adapter.example_conditions(2))], stats,
                           measure_cache=measure_cache)
        _RUNS[key] = images, stats, adapter, cfg, cache, adapter.memory_plan, adapter.memory_peak_bytes
    return _RUNS[key]


# -- the original's numbers ------------------------------------------------------------------------------------
def _ours_from_golden(golden):
    arch = golden_build.ARCH
    weights = {k[len("weights/"):]: v for k, v in golden.items() if k.startswith("weights/")}
    ours, visual = map_state(weights, arch.num_layers)  # the real key map on the original's names
    model = InfDiT(arch).eval()
    clip = ClipImageEmbedding(arch.clip["embed_dim"], arch.clip["vision_cfg"]).eval()
    load_into(model, ours, "golden")
    load_into(clip.visual, visual, "golden CLIP")
    return model, clip


@torch.no_grad()
def test_forward_and_sampler_equal_the_original_code(golden):
    model, clip = _ours_from_golden(golden)
    lr = golden["inputs/low_res"]
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    lr_up = TF.resize(lr, [4 * lr.shape[2], 4 * lr.shape[3]], interpolation=InterpolationMode.BICUBIC,
                      antialias=True).clamp(-1, 1)
    vector = clip(lr)
    rows, cols = lr_up.shape[2] // 16, lr_up.shape[3] // 16  # 4 x 6 blocks: a non-square image
    strip = Strip(0, rows, cols, rows)
    windows = model.lr_windows(lr, rows, cols)
    denoise = denoiser(lambda images, c_noise: model(images, c_noise, vector, windows, strip), lr_up)
    one = denoise(golden["inputs/x"], torch.tensor([golden_build.SIGMA]))
    sigmas = edm_sigmas(golden_build.STEPS)
    sample = heun(lambda x, s, e: denoise(x, s), lr_up + golden["original/noise"] * sigmas[0], sigmas)
    report = {}
    for name, ours in (("lr_up", lr_up), ("vector", vector), ("denoised", one), ("sample", sample)):
        theirs = golden[f"original/{name}"]
        report[name] = (ours - theirs).abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    REPORTED.setdefault("Inf-DiT: max |ours - original| on the golden tiny instance (test_inf_dit)", {}).update(
        {k: f"{v:.3e}" for k, v in report.items()})


def test_golden_inputs_are_the_repo_scripts():
    """The golden file's weights and inputs are what tests/build_inf_dit_golden.py writes (only numbers came from the
    original)."""
    stored = load_file(str(golden_build.GOLDEN))
    model, clip = golden_build.tiny_model()
    expected = {f"weights/{k}": v for k, v in original_names(model.state_dict(), 2).items()}
    expected.update({f"weights/image_encoder.model.visual.{k}": v for k, v in clip.visual.state_dict().items()})
    expected.update(golden_build.inputs())
    assert set(expected) == {k for k in stored if not k.startswith("original/")}
    for k, v in expected.items():
        assert torch.equal(v, stored[k]), k


# -- the checkpoint key map ------------------------------------------------------------------------------------
def _synthetic_checkpoint(golden, path, rename=None, drop=None, clip=True):
    """A DeepSpeed-style file with the original's names and shapes: the golden tiny weights plus the entries the
    original stores but never uses (`clip=False`: without the CLIP tower)."""
    module = {k[len("weights/"):]: v for k, v in golden.items() if k.startswith("weights/")}
    if not clip:
        module = {k: v for k, v in module.items() if not k.startswith("image_encoder.")}
    extra = {"transformer.position_embeddings.weight": torch.zeros(1, 64),
             "mixins.adaln_layer.k_layer_norm.0.weight": torch.ones(16),
             "mixins.adaln_layer.rope.freqs_cos": torch.zeros(32, 32, 16),
             "image_encoder.model.logit_scale": torch.zeros(())}
    assert all(any(re.fullmatch(p, k) for p in UNUSED) for k in extra)
    module.update(extra)
    if rename:
        module[rename[1]] = module.pop(rename[0])
    if drop:
        module.pop(drop)
    torch.save({"module": module, "ds_version": "0.0"}, path)
    return path


def _golden_arch_overrides(path):
    a = golden_build.ARCH
    return ("model=inf_dit", "benchmark=div8k", f"model.path={path}", "model.dtype=float32", "model.resolution=64",
            f"model.arch.hidden_size={a.hidden_size}", f"model.arch.num_layers={a.num_layers}",
            f"model.arch.num_heads={a.num_heads}", f"model.arch.block_size={a.block_size}",
            f"model.arch.vector_dim={a.vector_dim}", f"model.arch.rope_grid={a.rope_grid}",
            "model.arch.clip.embed_dim=16", "model.arch.clip.vision_cfg={image_size: 28, layers: 1, width: 32, "
            "head_width: 16, patch_size: 14}")


def test_loader_maps_the_original_names_and_names_what_it_cannot(golden, tmp_path):
    cfg = make_cfg(*_golden_arch_overrides(_synthetic_checkpoint(golden, tmp_path / "ok.pt")))
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")  # the real loader, from the file
    model, clip = _ours_from_golden(golden)
    for name, value in model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[name], value), name
    assert torch.equal(adapter.clip.visual.conv1.weight, clip.visual.conv1.weight)
    assert "image_encoder.model.visual" in adapter.clip_source

    renamed = ("transformer.layers.1.mlp.dense_h_to_4h.weight", "transformer.layers.1.mlp.fc1")
    bad = _synthetic_checkpoint(golden, tmp_path / "renamed.pt", rename=renamed)
    with pytest.raises(CheckpointKeyError, match=r"not in the Inf-DiT key map.*transformer\.layers\.1\.mlp\.fc1"):
        build_adapter(make_cfg(*_golden_arch_overrides(bad)).model, "cpu")
    missing = _synthetic_checkpoint(golden, tmp_path / "missing.pt", drop="mixins.final_layer.linear.bias")
    with pytest.raises(CheckpointKeyError, match=r"missing final\.linear\.bias"):
        build_adapter(make_cfg(*_golden_arch_overrides(missing)).model, "cpu")


def test_clip_tower_from_model_clip_path_or_a_clear_error(golden, tmp_path):
    """A checkpoint without `image_encoder.model.visual.*` takes the tower from an OpenCLIP file; without one, the
    error names model.clip_path."""
    bare = _synthetic_checkpoint(golden, tmp_path / "bare.pt", clip=False)
    with pytest.raises(MissingWeightsError, match=r"carries no CLIP tower.*model\.clip_path is not set"):
        build_adapter(make_cfg(*_golden_arch_overrides(bare)).model, "cpu")
    visual = {f"visual.{k[len('weights/image_encoder.model.visual.'):]}": v for k, v in golden.items()
              if k.startswith("weights/image_encoder.model.visual.")}
    torch.save({"state_dict": visual}, tmp_path / "open_clip.bin")
    adapter = build_adapter(make_cfg(*_golden_arch_overrides(bare), f"model.clip_path={tmp_path / 'open_clip.bin'}")
                            .model, "cpu")
    _, clip = _ours_from_golden(golden)
    assert adapter.clip_source.endswith("open_clip.bin")
    assert torch.equal(adapter.clip.visual.proj, clip.visual.proj)


def test_missing_weights_fail_fast_naming_key_and_source(tmp_path):
    for path in (None, tmp_path / "nowhere"):
        cfg = make_cfg("model=inf_dit", "benchmark=div8k", *([f"model.path={path}"] if path else []))
        validate(cfg)
        with pytest.raises(MissingWeightsError, match=r"model\.path.*cloud\.tsinghua\.edu\.cn.*flops_only"):
            build_adapter(cfg.model, "cpu")


# -- sampling, modes, methods ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "foca", "abcache"])
def test_strips_equal_the_whole_image(adapters, method):
    """Strip mode (4 strips of one block row, each through all evaluations with its own cache) gives the
    whole-image pass's image."""
    whole, *_ = _run(adapters, f"method={method}", "cache.N=3", "model.mode=whole")
    strips, *_, memory_peak = _run(adapters, f"method={method}", "cache.N=3", "model.mode=strips")
    torch.testing.assert_close(strips, whole, rtol=0, atol=1e-6)
    assert memory_peak > 0


def test_offloading_keeps_the_image_and_moves_the_bytes_to_the_host(adapters):
    """model.offload=true: the cache and the strip memories live on the host (here the CPU is both)."""
    whole, *_ = _run(adapters, "method=foca", "cache.N=3", "model.mode=whole")
    offloaded, *_, plan, memory_peak = _run(adapters, "method=foca", "cache.N=3", "model.mode=strips",
                                            "model.offload=true")
    torch.testing.assert_close(offloaded, whole, rtol=0, atol=1e-6)
    assert plan.host_bytes() == plan.cache_bytes + plan.memory_bytes > 0 and memory_peak == plan.memory_bytes


@pytest.mark.parametrize("method", INTERVAL_METHODS)
def test_every_method_runs_and_N1_is_the_uncached_model(adapters, method):
    images, *_ = _run(adapters, f"method={method}", *KNOBS.get(method, ()))
    reference, *_ = _run(adapters, "method=none")
    assert torch.isfinite(images).all() and images.shape == (2, 3, 64, 64)
    if not methods.get(method).schedule_free:
        every, *_ = _run(adapters, f"method={method}", "cache.N=1", *KNOBS.get(method, ()))
        assert torch.equal(every, reference), method
    rel = ((images - reference).norm() / reference.norm()).item()
    REPORTED.setdefault(f"inf_dit tiny: relative error against method=none, {STEPS} Heun steps (test_inf_dit)",
                        {})[method] = f"{rel:.4f}"
    assert rel < 0.5  # random weights, 4 Heun steps: a smoke bound (the toy model's are in test_model_zoo)


def test_step_axis_is_the_model_evaluation(adapters):
    """20 Heun steps are 39 evaluations (here 4 -> 7): one engine step each, times = their sigmas (repeated)."""
    cfg = make_cfg(*TINY, f"sampler.steps={STEPS}", "method=foca", "cache.N=2", "cache.warmup=0")
    cache = validate(cfg)
    adapter = adapters(cfg)
    with CacheEngine(methods.build(cache), adapter.sites(), trace=True) as engine:
        adapter.generate(engine, adapter.make_noise([0]), STEPS, 1.0, **adapter.example_conditions(1))
        trace = engine.trace_tensors()
    sigmas = edm_sigmas(STEPS).tolist()
    expected = [sigmas[0]] + [s for s in sigmas[1:-1] for _ in range(2)]
    assert evaluations(20) == 39 and engine.total_steps == 7 == len(expected)
    torch.testing.assert_close(trace["times"], torch.tensor(expected, dtype=torch.float64))
    assert trace["full"].tolist() == [i % 2 == 0 for i in range(7)]


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="cache.time=sigma.*twice at each intermediate sigma"):
        validate(make_cfg(*TINY, "method=foca", "cache.time=sigma"))
    with pytest.raises(ValueError, match="diffusers' hooks"):
        validate(make_cfg(*TINY, "method=diffusers_taylorseer"))
    with pytest.raises(ValueError, match="method=l2c: L2C's routers are learnt on DiT models"):
        validate(make_cfg(*TINY, "method=l2c"))
    with pytest.raises(ValueError, match="model.mode=strips with method=teacache"):
        validate(make_cfg(*TINY, "method=teacache", "model.mode=strips"))
    with pytest.raises(ValueError, match="model.mode=strips with method=foca_adaptive: each strip would decide"):
        validate(make_cfg(*TINY, "method=foca_adaptive", "model.mode=strips"))


# -- the memory plan -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,mode", [("foca", "whole"), ("foca", "strips"), ("taylorseer", "whole"),
                                         ("abcache", "strips"), ("fora", "whole"), ("none", "strips"),
                                         ("delta_dit", "strips")])
def test_memory_estimate_equals_the_bytes_a_tiny_run_holds(adapters, method, mode):
    _, stats, *_, plan, memory_peak = _run(adapters, f"method={method}", f"model.mode={mode}", "cache.N=2",
                                           measure_cache=True)
    assert plan.cache_bytes == stats["cache_bytes_peak"] > 0 or method == "none"
    assert plan.memory_bytes == memory_peak and (plan.memory_bytes > 0) == (mode == "strips")


def test_memory_plan_picks_strips_or_refuses_with_the_settings_that_fit(adapters):
    whole = _run(adapters, "method=foca", "model.mode=whole")[5]
    budget = (whole.device_bytes() - 1) / 1e9  # the whole image no longer fits
    auto = _run(adapters, "method=foca", f"model.memory_budget_gb={budget}")[5]
    assert auto.setting.mode == "strips" and auto.device_bytes() < whole.device_bytes()
    with pytest.raises(memory_plan.MemoryPlanError, match=r"(?s)more than the device.*These fit:.*model\.mode=strips"):
        _run(adapters, "method=foca", "model.mode=whole", f"model.memory_budget_gb={budget}")
    with pytest.raises(memory_plan.MemoryPlanError, match="Nothing was generated. No mode"):
        _run(adapters, "method=foca", "model.memory_budget_gb=0.000001")


def test_memory_at_2048_the_issue_figures():
    """At 2048x2048 (meta device, no weights): a site tensor is 262,144 x 1280 (671 MB in bf16); FoCa's whole-image
    cache is 56 sites x 3 tensors (~113 GB); strips of 4 block rows hold a quarter of it plus one block row's keys
    and values per (full evaluation, layer)."""
    cfg = make_cfg("model=inf_dit", "profile=flops_only", "benchmark=div8k", "method=foca", "cache.N=5")
    cache = validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    engine_sites = [s for s in adapter.sites() if s.role in methods.get("foca").roles]
    widths = dict.fromkeys(("attn", "mlp", "block", "blocks"), 1280) | {"model": 48}
    gen = memory_plan.Generation(cache, tuple(engine_sites), widths, (16, 16), 1024, 1280, 28, 1, 39, torch.bfloat16,
                                 0)
    whole = memory_plan.estimate(memory_plan.Setting("whole", 4, False, None), gen)
    strips = memory_plan.estimate(memory_plan.Setting("strips", 4, False, None), gen)
    site = 262_144 * 1280 * 2
    assert site == 671_088_640 and whole.cache_bytes == 56 * 3 * site  # 112.7 GB
    full = schedule_full_steps(cache, 39)
    assert strips.cache_bytes == whole.cache_bytes // 4 and strips.memory_bytes == full * 28 * 2 * site // 16
    REPORTED.setdefault("Inf-DiT memory plan at 2048x2048, FoCa N=5, bf16 (test_inf_dit)", {}).update({
        "whole": memory_plan.describe(whole), "strips of 4 block rows": memory_plan.describe(strips),
        "full evaluations of 39": str(full)})


@pytest.mark.slow
def test_flops_at_2048_per_evaluation():
    """The counts docs/models.md quotes (meta device, 2048x2048): a full evaluation 451.33 T, a skipped one (attention
    and MLP forecast) 8.77 T, the CLIP embedding 0.16 T once; 20 steps = 17,601.9 T. About a minute on 2 cores."""
    from foca_bench.profiling import count_flops

    def count(*overrides):
        cfg = make_cfg("model=inf_dit", "profile=flops_only", *overrides)
        cache = validate(cfg)
        adapter = build_adapter(cfg.model, "cpu")
        return count_flops(lambda: generate_examples(adapter, cache, cfg.sampler, 1)) / 1e12

    one, three = count("method=none", "sampler.steps=1"), count("method=none", "sampler.steps=2")
    forecast = count("method=foca", "cache.N=99", "cache.warmup=0", "sampler.steps=2")
    full, skipped = (three - one) / 2, (forecast - one) / 2
    assert full == pytest.approx(451.33, abs=0.01) and skipped == pytest.approx(8.77, abs=0.01)
    assert one - full == pytest.approx(0.16, abs=0.01) and 39 * full + one - full == pytest.approx(17601.9, abs=0.5)
