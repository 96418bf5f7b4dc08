"""FLOP counting: whole-generation counts vs. an analytic per-step model, and the paper's Table 3 on DiT-XL/2."""

import pytest

import methods
from foca_bench.adapters import build_adapter
from foca_bench.config import schedule_full_steps, validate
from foca_bench.runner import run
from tests.conftest import TINY, flops_of, make_cfg, step_flops

# The paper's Table 3 (DiT-XL/2, 256x256, CFG, DDIM): reference data, in TFLOPs.
def _paper_table3() -> dict:
    """The paper's Table 3 FLOPs (results/paper/table3_dit.yaml) of the rows this issue reproduces."""
    out = {}
    for run, paper in _paper_runs("none", "foca"):
        out[("none" if run["method"] == "none" else f"foca{run['cache']['N']}", run["steps"])] = paper["flops_T"]
    return out


def _paper_runs(*methods_: str) -> list[tuple[dict, dict]]:
    """(what the row runs, the paper's numbers) of Table 3's rows of these methods (`tables.row_run`)."""
    from foca_bench.tables import load_paper_tables, row_run

    table = load_paper_tables()["dit_xl_2"]
    runs = [(row_run(table["table"], row["row"], table["model"]), row["paper"]) for row in table["rows"] if row["row"]]
    return [(run, paper) for run, paper in runs if run["method"] in methods_]


PAPER_TABLE3 = _paper_table3()
assert PAPER_TABLE3 == {("none", 50): 23.74, ("foca2", 50): 12.35, ("foca3", 50): 8.56, ("foca5", 50): 5.24,
                        ("none", 25): 11.87, ("none", 20): 9.49, ("none", 12): 5.70}  # the numbers


def analytic_site_flops(arch: dict, batch: int) -> int:
    """FLOPs of the attention and MLP sites of one DiT forward, from the architecture alone."""
    d = arch["num_attention_heads"] * arch["attention_head_dim"]
    tokens = (arch["sample_size"] // arch["patch_size"]) ** 2
    attn = 2 * tokens * d * 3 * d + 2 * tokens * d * d + 2 * 2 * tokens * tokens * d  # qkv, out, QK^T and AV
    mlp = 2 * 2 * tokens * d * 4 * d  # GELU MLP with ratio 4
    return batch * arch["num_layers"] * (attn + mlp)


@pytest.fixture(scope="module")
def tiny():
    cfg = make_cfg(*TINY)
    validate(cfg)
    return cfg, build_adapter(cfg.model, "cpu")


def test_skipped_step_saves_exactly_the_site_flops(tiny):
    cfg, adapter = tiny
    full_step = flops_of(adapter, {"name": "none"}, 1)
    step1_skipped = {"name": "fora", "N": 99, "warmup": 0, "anchor": "first"}  # step 0 full, step 1 skipped
    two_steps = flops_of(adapter, step1_skipped, 2)
    skipped_step = two_steps - full_step
    arch = dict(cfg.model.arch)
    assert full_step - skipped_step == analytic_site_flops(arch, batch=2)  # CFG doubles the batch


@pytest.mark.parametrize("cache", [{"name": "foca", "N": 3}, {"name": "foca", "N": 5}, {"name": "taylorseer", "N": 4},
                                   {"name": "fora", "N": 2}])
def test_whole_generation_count_equals_schedule_composition(tiny, cache):
    _, adapter = tiny
    steps = 12
    full_step = flops_of(adapter, {"name": "none"}, 1)
    skipped_step = flops_of(adapter, {"name": "fora", "N": 99, "warmup": 0, "anchor": "first"}, 2) - full_step
    config = methods.build({**cache, "warmup": 1}).cfg
    n_full = schedule_full_steps(config, steps)
    assert flops_of(adapter, {**cache, "warmup": 1}, steps) == n_full * full_step + (steps - n_full) * skipped_step


def test_reuse_skips_the_whole_model(tiny):
    _, adapter = tiny
    full_step = flops_of(adapter, {"name": "none"}, 1)
    assert flops_of(adapter, {"name": "reuse", "N": 3, "warmup": 1}, 7) == 3 * full_step  # steps 0, 1, 4


def test_meta_device_counts_match_cpu():
    cfg = make_cfg(*TINY)
    validate(cfg)
    cpu = build_adapter(cfg.model, "cpu")
    cfg.model.weights = "meta"
    meta = build_adapter(cfg.model, "cpu")
    assert flops_of(meta, {"name": "foca", "N": 3, "warmup": 1}, 5) == flops_of(cpu, {"name": "foca", "N": 3,
                                                                                      "warmup": 1}, 5)


@pytest.fixture(scope="module")
def dit_xl_2_steps():
    """Counted FLOPs of one full and one skipped DiT-XL/2 step (meta device, CFG batch of 2)."""
    return step_flops("dit_xl_2")


@pytest.mark.parametrize("row,paper", PAPER_TABLE3.items())
def test_dit_xl_2_step_counts_compose_to_table3(dit_xl_2_steps, row, paper):
    """Per-step counts composed over the schedule (the composition is checked exactly on the toy above)."""
    full_step, skipped_step = dit_xl_2_steps
    name, steps = row
    cache = {"name": "none"} if name == "none" else {"name": "foca", "N": int(name[-1]), "warmup": 1}
    n_full = steps if name == "none" else schedule_full_steps(methods.build(cache).cfg, steps)
    tflops = (n_full * full_step + (steps - n_full) * skipped_step) / 1e12
    assert tflops == pytest.approx(paper, rel=0.005)


def test_dit_xl_2_delta_dit_composes_to_table3(dit_xl_2_steps):
    """Delta-DiT with half of DiT-XL/2's 28 blocks cached reproduces the paper's Table 3 Delta-DiT FLOPs."""
    paper = {run["cache"]["N"]: values["flops_T"] for run, values in _paper_runs("delta_dit")}
    assert paper == {2: 18.04, 3: 16.14}
    cfg = make_cfg("model=dit_xl_2", "profile=flops_only")
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    full_step, _ = dit_xl_2_steps
    cached_step = flops_of(adapter, {"name": "delta_dit", "N": 99, "warmup": 0}, 2) - full_step
    assert cached_step == pytest.approx(full_step / 2, rel=0.01)  # 14 of 28 blocks, plus what runs anyway
    for N, tflops in paper.items():
        n_full = schedule_full_steps(methods.build({"name": "delta_dit", "N": N, "warmup": 1}).cfg, 50)
        assert (n_full * full_step + (50 - n_full) * cached_step) / 1e12 == pytest.approx(tflops, rel=0.005), N


@pytest.mark.slow
def test_dit_xl_2_flops_only_reproduces_table3(tmp_path):
    """The issue's acceptance check: `profile=flops_only` end to end, whole 50-step generations (~4 min)."""
    rows = {("none", 50): ["method=none"], ("foca2", 50): ["method=foca", "cache.N=2"],
            ("foca3", 50): ["method=foca", "cache.N=3"], ("foca5", 50): ["method=foca", "cache.N=5"],
            ("none", 25): ["method=none", "sampler.steps=25"], ("none", 20): ["method=none", "sampler.steps=20"],
            ("none", 12): ["method=none", "sampler.steps=12"]}
    for row, overrides in rows.items():
        record = run(make_cfg("model=dit_xl_2", "profile=flops_only", f"results_dir={tmp_path}", *overrides))
        assert record["profile"]["flops"] / 1e12 == pytest.approx(PAPER_TABLE3[row], rel=0.005), row
