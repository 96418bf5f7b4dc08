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
from foca_bench.benchmarks import BENCHMARKS
from foca_bench.config import validate

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
    knob = next(iter(values))
    assert cfg_factory(f"model={model}", f"method={method}", f"cache.{knob}=[1.0,2.0]").cache[knob] == [1.0, 2.0]


@pytest.mark.parametrize("model", MODEL_FILES)
@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_pair_composes_with_override(cfg_factory, model, method):
    cfg = cfg_factory(f"model={model}", f"method={method}", "cache.N=7")
    assert cfg.cache.N == 7
    assert cfg.cache.name == method and cfg.model.name == model
    cls = methods.get(method)
    if cls.model_specific and f"{model}_{method}" not in MODEL_METHOD_FILES:
        with pytest.raises(ValueError, match=f"conf/model_method/{model}_{method}.yaml"):  # TeaCache on DiT-XL/2
            validate(cfg)
        return
    cache = validate(cfg)
    assert cache.warmup == cfg.model.warmup  # per-model default filled in
    assert type(cache) is methods.get(method).config_class


def test_cli_example_from_the_issue(cfg_factory):
    cfg = cfg_factory("model=toy_dit", "method=foca", "cache.N=5")
    assert (cfg.cache.N, cfg.cache.slope, cfg.cache.corrector) == (5, "local", "heun")


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
])
def test_cross_field_checks_say_how_to_fix(cfg_factory, overrides, fix):
    with pytest.raises(ValueError, match=re.escape(fix)):
        validate(cfg_factory(*overrides))


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
    found = re.search(r"# Command: python run.py (.*) \+row/" + re.escape(f"{table}={name}") + r"\s+\(= (.*)\)", text)
    prefix, plain = found.group(1).split(), found.group(2).split()
    if not (REPO_DIR / "conf/experiment" / f"{table}.yaml").is_file():  # a table whose model is not built yet
        assert prefix[0] not in [f"model={m}" for m in MODEL_FILES], "a row of a built model needs its experiment"
        pytest.skip(f"{prefix[0]} is not built yet")
    assert prefix == [f"experiment={table}"]
    via_row = cfg_factory(*prefix, f"+row/{table}={name}")
    if methods.get(via_row.cache.name).adaptive and via_row.profile.meta:  # as the comment says: with weights
        assert "leaves this row out" in text
        prefix.append("profile=default")
        via_row = cfg_factory(*prefix, f"+row/{table}={name}")
    via_plain = cfg_factory(*prefix, *plain)
    validate(via_row), validate(via_plain)
    for key in ("model", "cache", "sampler", "benchmark", "profile", "trace"):
        assert via_row[key] == via_plain[key], key


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO_DIR / "conf/experiment").glob("*.yaml")))
def test_every_experiment_sweeps_its_rows(cfg_factory, experiment):
    text = (REPO_DIR / f"conf/experiment/{experiment}.yaml").read_text()
    assert f"python run.py -m experiment={experiment}" in text and f"+row/{experiment}: glob(*" in text
    assert any(r.startswith(f"{experiment}/") for r in ROWS)
    validate(cfg_factory(f"experiment={experiment}"))
