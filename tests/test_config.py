"""Hydra composition: every model x method pair composes; bad input fails early with a useful message."""

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import methods
from foca_bench import REPO_DIR
from foca_bench.adapters import ADAPTERS
from foca_bench.adapters import build_adapter
from foca_bench.benchmarks import BENCHMARKS
from foca_bench.config import validate
from foca_bench.names import model_method_settings

METHOD_FILES = sorted(p.stem for p in (REPO_DIR / "conf/method").glob("*.yaml"))
MODEL_FILES = sorted(p.stem for p in (REPO_DIR / "conf/model").glob("*.yaml"))
BENCHMARK_FILES = sorted(p.stem for p in (REPO_DIR / "conf/benchmark").glob("*.yaml"))
MODEL_METHOD_FILES = sorted(p.stem for p in (REPO_DIR / "conf/model_method").glob("*.yaml"))


def test_registries_match_config_groups():
    assert sorted(methods.METHODS) == METHOD_FILES
    assert sorted(ADAPTERS) == MODEL_FILES
    assert sorted(BENCHMARKS) == BENCHMARK_FILES
    for name, cls in methods.METHODS.items():
        assert cls.name == name and cls.config_class().name == name
    for name, cls in BENCHMARKS.items():
        assert cls.name == name


@pytest.mark.parametrize("pair", MODEL_METHOD_FILES)
def test_model_method_files_set_their_methods_knobs(cfg_factory, pair):
    """`conf/model_method/<model>_<method>.yaml` is picked up for exactly that pair and wins over the method's
    YAML; a command-line override wins over it."""
    model, method = next((m, pair[len(m) + 1:]) for m in MODEL_FILES if pair.startswith(f"{m}_"))
    assert method in METHOD_FILES
    values = OmegaConf.load(REPO_DIR / "conf/model_method" / f"{pair}.yaml")
    cfg = cfg_factory(f"model={model}", f"method={method}")
    assert all(cfg.cache[k] == v for k, v in values.items())
    knob, value = next(((k, v) for k, v in values.items() if isinstance(v, (int, float)) or OmegaConf.is_list(v)
                        or k.endswith("_path")), (None, None))  # a list, a number or a file
    if knob is None:  # SmoothCache's errors: a mapping of lists
        return
    other = [1.0, 2.0] if OmegaConf.is_list(value) else "elsewhere.pt" if isinstance(value, str) else value + 1
    override = f"cache.{knob}=[1.0,2.0]" if isinstance(other, list) else f"cache.{knob}={other}"
    assert cfg_factory(f"model={model}", f"method={method}", override).cache[knob] == other


@pytest.mark.parametrize("model", MODEL_FILES)
@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_pair_composes_with_override(cfg_factory, model, method):
    cfg = cfg_factory(f"model={model}", f"method={method}", "cache.N=7")
    assert cfg.cache.N == 7
    assert cfg.cache.name == method and cfg.model.name == model
    cls = methods.get(method)
    refusal = ADAPTERS[model].refuse(cfg.model, OmegaConf.to_object(cfg.cache))
    if refusal:  # e.g. diffusers' hooks on Inf-DiT, which is not a diffusers model
        with pytest.raises(ValueError, match=re.escape(refusal)):
            validate(cfg)
        return
    if cls.model_specific and f"{model}_{method}" not in MODEL_METHOD_FILES:
        with pytest.raises(ValueError, match=f"conf/model_method/{model}_{method}.yaml"):  # TeaCache on DiT-XL/2
            validate(cfg)
        return
    cache = validate(cfg)
    # per-model default filled in (a conf/model_method file may set the method's own on that model)
    assert cache.warmup == model_method_settings(model, method).get("warmup", cfg.model.warmup)
    assert type(cache) is methods.get(method).config_class


def test_cli_example_from_the_issue(cfg_factory):
    cfg = cfg_factory("model=toy_dit", "method=foca", "cache.N=5")
    assert (cfg.cache.N, cfg.cache.slope, cfg.cache.corrector) == (5, "full", "heun")


def test_unknown_key_fails(cfg_factory):
    with pytest.raises(ConfigCompositionException, match="n"):
        cfg_factory("method=foca", "cache.n=3")


def test_wrong_type_fails(cfg_factory):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        cfg_factory("method=foca", "cache.N=abc")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        cfg_factory("sampler.steps=many")


def test_unknown_option_lists_the_choices(cfg_factory):
    with pytest.raises(ConfigCompositionException) as err:
        cfg_factory("method=focaa")
    message = str(err.value)
    for name in ("foca", "fora", "taylorseer", "reuse", "none"):
        assert name in message


@pytest.mark.parametrize("overrides,fix", [
    (("method=foca", "cache.N=0"), "must be >= 1"),
    (("method=foca", "cache.slope=global"), "choose `local`"),
    (("method=foca", "cache.corrector=rk4"), "choose `heun`"),
    (("method=foca", "cache.time=seconds"), "choose `step`"),
    (("method=foca", "cache.warmup=-1"), ">= 0"),
    (("method=taylorseer", "cache.O=7"), "0..4"),
    (("method=taylorseer", "cache.O=3", "cache.N=20", "sampler.steps=30", "cache.warmup=0"), "lower cache.O"),
    (("sampler.steps=0",), "sampler.steps"),
    (("method=toca", "cache.fresh_ratio=0"), "must be in (0, 1]"),
    (("method=toca", "cache.fresh_ratio=1.5"), "must be in (0, 1]"),
    (("method=toca", "cache.score=norm"), "choose one of attention, random"),
    (("method=duca", "cache.pattern=CX"), "string of C"),
    (("method=duca", "cache.soft_fresh_weight=-1"), "must be >= 0"),
    (("method=foca", "+cache.n=3"), "cache.n: method `foca` has no key 'n'; its keys are ['N', "),
    (("+model.foo=1",), "model.foo: `model` has no key 'foo'"),
    (("+sampler.stpes=1",), "sampler.stpes: `sampler` has no key"),
    (("+seed=1",), "seed: no such key"),
    (("sampler.guidance_scale=-1",), "sampler.guidance_scale=-1.0: a guidance scale must be >= 0"),
    (("model.guidance_scale=-2",), "model.guidance_scale=-2.0"),
    (("model=hunyuan_video", "model.true_cfg_scale=-1"), "model.true_cfg_scale=-1.0"),
    (("claim_timeout_s=0",), "claim_timeout_s=0"),
    (("model=flux", "model.resolution=70"), "takes multiples of 16; the nearest are 64 or 80"),
    (("model=dit_xl_2", "model.resolution=500"), "takes multiples of 16; the nearest are 496 or 512"),
    (("model=dit_xl_2", "model.arch.sample_size=64"), "set model.resolution alone"),
    (("model.resolution=17",), "the nearest are 16 or 18"),
    (("model=hunyuan_video", "model.width=100"), "model.width=100"),
    (("model=hunyuan_video", "model.frames=64"), "1 + 4k frames; the nearest are 61 or 65"),
])
def test_cross_field_checks_say_how_to_fix(cfg_factory, overrides, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        validate(cfg_factory(*overrides))


def test_dit_xl_2_at_512_is_the_512_architecture(cfg_factory):
    from tests.conftest import flops_of

    cfg = cfg_factory("model=dit_xl_2", "model.resolution=512", "profile=flops_only")
    validate(cfg)
    assert cfg.model.arch.sample_size == 64  # facebook/DiT-XL-2-512's
    flops = {}
    for side in (32, 64):  # tiny DiT-XL/2 at 32 and 64 px: 16 and 64 tokens
        cfg = cfg_factory("model=dit_xl_2", "model.size=tiny", f"model.tiny.resolution={side}", "profile=flops_only")
        validate(cfg)
        adapter = build_adapter(cfg.model, "cpu")
        assert adapter.make_noise([0]).shape[-1] == side // 8
        flops[side] = flops_of(adapter, {"name": "none"}, 1)
    assert flops[64] > 3 * flops[32]  # 4x the tokens (the conditioning embeddings do not grow)


def test_command_line_values_win_over_the_tiny_block():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from foca_bench import REPO_DIR
    from foca_bench.config import sized

    with initialize_config_dir(config_dir=str(REPO_DIR / "conf"), version_base=None):
        full = hydra_compose("config", ["model=flux", "model.size=tiny", "model.resolution=128",
                                        "model.arch.num_layers=3"], return_hydra_config=True)
    HydraConfig.instance().set_config(full)  # what run.py's job sees
    try:
        model = sized(full.model)
        assert (model.resolution, model.arch.num_layers, model.arch.num_single_layers) == (128, 3, 2)
        assert sized(model) == model  # idempotent
    finally:
        HydraConfig.instance().cfg = None
    assert sized(full.model).resolution == 64  # outside a Hydra job nothing is explicit: the tiny block's


def test_flops_only_needs_no_weights(cfg_factory):
    cfg = cfg_factory("model=dit_xl_2", "profile=flops_only")
    validate(cfg)
    assert cfg.model.weights == "meta"


def test_method_yaml_files_only_set_values():
    """Every conf/method file starts from its schema and places itself at package `cache`."""
    for name in METHOD_FILES:
        text = Path(REPO_DIR / f"conf/method/{name}.yaml").read_text()
        assert text.startswith("# @package cache")
        assert f"/schema/method/{name}@_here_" in text


ROWS = sorted(p.relative_to(REPO_DIR / "conf/row").with_suffix("").as_posix()
              for p in (REPO_DIR / "conf/row").glob("*/*.yaml"))


@pytest.mark.parametrize("row", ROWS)
def test_every_table_row_composes_to_the_command_it_names(cfg_factory, row):
    """A row file (`conf/row/<table>/<row>.yaml`) equals the plain overrides its comment spells out."""
    import re

    table, name = row.split("/")
    text = (REPO_DIR / f"conf/row/{row}.yaml").read_text()
    command = f"python run.py experiment={table} +row/{table}={name}"
    assert command in text
    plain = re.search(re.escape(command) + r"\s+\(= (.*)\)", text).group(1).split()
    via_row = cfg_factory(f"experiment={table}", f"+row/{table}={name}")
    via_plain = cfg_factory(f"experiment={table}", *plain)
    for cfg in (via_row, via_plain):
        try:
            validate(cfg)
        except ValueError as err:  # a calibration or a trained router for the model, which needs its weights to make
            how_to_set = methods.get(cfg.cache.name).how_to_set
            assert how_to_set and how_to_set in str(err), err
    for key in ("model", "cache", "sampler", "benchmark", "profile", "trace"):
        assert via_row[key] == via_plain[key], key


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO_DIR / "conf/experiment").glob("*.yaml")))
def test_every_experiment_sweeps_its_rows(cfg_factory, experiment):
    text = (REPO_DIR / f"conf/experiment/{experiment}.yaml").read_text()
    assert f"python run.py -m experiment={experiment}" in text and f"+row/{experiment}: glob(*" in text
    assert any(r.startswith(f"{experiment}/") for r in ROWS)
    validate(cfg_factory(f"experiment={experiment}"))
