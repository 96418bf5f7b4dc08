"""FORA (arXiv:2407.01425) against independent emulations of the official codes' schedules and reuse rule.

Sources (read, not copied; the emulations below restate their logic):
- prathebaselva/FORA@acde628eb1c9605015542c91040c401919369487, the authors' DiT code:
  src/diffusion/gaussian_diffusion.py:517 `indices = list(range(self.num_timesteps))[::-1]` and :538-551, which
  pass the countdown index as `current_step`; src/models.py:139-152, where a block computes (and caches) its
  attention and MLP when `step == int(numstep-1) or step % int(cache_threshold) == 0` and otherwise adds the
  cached `cache[-1][layer]['attn' / 'mlp']` of the last computed step.
- Shenyi-Z/ToCa@e84096ffd85af4540a6a1f64e3334e428e1b7377, DiT-ToCa in FORA mode (fresh_ratio 0), the code behind
  the paper's DiT rows: cache_functions/cal_type.py:6,13 (full at `step == num_steps - 1` or
  `step % fresh_interval == 0`), force_scheduler.py:6-15 (interval round(N / 1) and no [0.2T, 0.4T) rule when
  fresh_ratio == 0), diffusion/gaussian_diffusion.py:680,694 (`current['step'] = i`, counting down).
- Shenyi-Z/TaylorSeer@288776dfd0cbb6e201c654c31cd22139f848a6cf, TaylorSeer-FLUX in FORA mode (fresh_ratio 0, no
  Taylor cache), the code behind the paper's FLUX rows: src/flux/modules/cache_functions/cal_type.py:7-9,21-24
  (first step only `step == 0`, then full when `cache_counter == fresh_interval - 1`), force_scheduler.py:3-15
  (interval round(N / 1)), src/flux/ideas/cache_denoise.py:22,41 (`current['step']` counts up from 0).
  TaylorSeer-HunyuanVideo/hyvideo/modules/cache_functions/cal_type.py:7-9 is the same rule.
"""

import dataclasses

import pytest
import torch

import methods
from foca_bench import REPO_DIR
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from tests.conftest import conditions, make_cfg


def official_dit(T: int, N: int) -> list[bool]:
    """FORA's DiT code (and DiT-ToCa's FORA mode): the loop runs `step` = T-1, ..., 0."""
    return [step == T - 1 or step % N == 0 for step in reversed(range(T))]


def official_flux(T: int, N: int) -> list[bool]:
    """TaylorSeer-FLUX's FORA mode: a counter of cached steps since the last full one, reset at each full step."""
    full, counter = [], 0
    for step in range(T):
        if step == 0 or counter == N - 1:
            full.append(True)
            counter = 0
        else:
            full.append(False)
            counter += 1
    return full


def composed(*overrides: str):
    cfg = make_cfg("method=fora", *overrides)
    return validate(cfg)


@pytest.fixture(scope="module")
def defaults():
    """FORA's config as each model composes it (conf/model_method/ included)."""
    return {model: composed(f"model={model}") for model in ("toy_dit", "dit_xl_2", "flux", "hunyuan_video")}


@pytest.mark.parametrize("T", [50, 20, 7, 250])
def test_full_step_sets_equal_the_official_codes(defaults, T):
    """Every model's default FORA computes exactly the official code's steps, T=50 and others, N=2..8."""
    official = {"toy_dit": official_dit, "dit_xl_2": official_dit, "flux": official_flux,
                "hunyuan_video": official_flux}
    for model, cache in defaults.items():
        for N in range(2, 9):
            method = methods.build(dataclasses.replace(cache, N=N))
            ours = [method.is_full(i, T) for i in range(T)]
            assert ours == official[model](T, N), (model, N)
    assert (defaults["dit_xl_2"].anchor, defaults["dit_xl_2"].warmup) == ("last", 1)
    assert (defaults["flux"].anchor, defaults["flux"].warmup) == ("first", 0)


def test_the_dit_countdown_always_computes_the_last_step_and_moves_full_steps_at_n5_and_n7(defaults):
    """At T=50 the countdown and the shared schedule (warmup=1) compute as many steps; they put them elsewhere
    exactly when 49 is not 1 mod N, i.e. at N=5 and N=7 among 2..8."""
    T, moved = 50, set()
    for N in range(2, 9):
        ours = official_dit(T, N)
        shared = [i < 1 or (i - 1) % N == 0 for i in range(T)]
        assert ours[-1] and sum(ours) == sum(shared)
        if ours != shared:
            moved.add(N)
    assert moved == {5, 7}
    assert [i for i, f in enumerate(official_dit(T, 5)) if f] == [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]


def test_anchor_first_is_the_shared_schedule_and_reuse_keeps_it():
    """`cache.anchor=first` (the deviation kept as an option) and `reuse` (no official code) use
    i < warmup or (i - warmup) % N == 0."""
    for warmup in (0, 1, 2):
        shared = [i < warmup or (i - warmup) % 5 == 0 for i in range(50)]
        fora = methods.build({"name": "fora", "N": 5, "warmup": warmup, "anchor": "first"})
        reuse = methods.build({"name": "reuse", "N": 5, "warmup": warmup})
        assert [fora.is_full(i, 50) for i in range(50)] == shared == [reuse.is_full(i, 50) for i in range(50)]
    assert "anchor" not in {f.name for f in dataclasses.fields(methods.get("reuse").config_class)}


def test_warmup_adds_leading_full_steps_to_the_countdown():
    method = methods.build({"name": "fora", "N": 7, "warmup": 3})
    assert [i for i in range(20) if method.is_full(i, 20)] == [0, 1, 2, 5, 12, 19]


def test_bad_anchor_and_missing_total_are_refused():
    with pytest.raises(ValueError, match="choose `last`"):
        composed("cache.anchor=end")
    with pytest.raises(ValueError, match="pass `total`"):
        methods.build({"name": "fora", "N": 3}).is_full(4)


@pytest.mark.parametrize("T,N", [(50, 5), (50, 7), (23, 4)])
def test_replayed_values_are_the_last_full_steps_on_random_trajectories(T, N):
    """Values: on a skipped step the official code adds `cache[-1][layer]` of the last computed step unchanged."""
    g = torch.Generator().manual_seed(T * N)
    values = torch.randn(T, 3, 5, generator=g, dtype=torch.float64)
    full = official_dit(T, N)
    expected, last = [], None
    for i in range(T):
        last = values[i] if full[i] else last
        expected.append(last)
    out = methods.replay("fora", values, torch.linspace(1, 0, T, dtype=torch.float64), torch.tensor(full), N=N)
    assert torch.equal(out, torch.stack(expected))


def test_live_generation_computes_the_official_steps(adapter):
    """The engine asks FORA with the step count, so a live run computes the countdown's steps (T=10, N=3: 0, 3, 6,
    9, where the shared schedule would compute 0, 1, 4, 7)."""
    with CacheEngine(methods.build({"name": "fora", "N": 3, "warmup": 1}), adapter.sites(), trace=True) as engine:
        adapter.generate(engine, adapter.make_noise([0, 1]), 10, 3.0, **conditions(adapter, [1, 7]))
    assert engine.trace_tensors()["full"].tolist() == official_dit(10, 3)


def test_model_method_files_name_a_model_and_a_method():
    """conf/model_method/<model>_<method>.yaml is optional in the defaults list, so a misnamed file would be
    ignored silently: each must split into a conf/model and a conf/method name."""
    models = {p.stem for p in (REPO_DIR / "conf/model").glob("*.yaml")}
    names = {p.stem for p in (REPO_DIR / "conf/method").glob("*.yaml")}
    files = sorted((REPO_DIR / "conf/model_method").glob("*.yaml"))
    assert files
    for path in files:
        splits = [(path.stem[:i], path.stem[i + 1:]) for i, c in enumerate(path.stem) if c == "_"]
        assert any(m in models and n in names for m, n in splits), path.name
    assert composed("model=flux", "cache.warmup=2").warmup == 2  # the command line still wins

