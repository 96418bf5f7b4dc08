"""Tables and figures from records: the paper's reference data, row matching, LaTeX, and the figure analyses
checked against closed forms."""

import math

import pytest
import torch

from foca_bench.figures import ten_step_errors, forecast_errors, stiffness, write_figures
from foca_bench.records import atomic_write_json, record_path
from foca_bench.tables import (Table, build_paper_table, load_paper_tables, matches, to_latex, to_markdown,
                               write_tables)

PAPER = load_paper_tables()


def test_paper_reference_data_is_complete_and_self_consistent():
    """Every transcribed row has every column; the paper's speed-ups agree with its own FLOPs and latencies
    (an independent check of the transcription, to the paper's two decimals), except where the paper itself
    disagrees with its columns: those cells are listed under the row's `inconsistent` with the arithmetic."""
    assert set(PAPER) == {"flux", "hunyuan_video", "dit_xl_2", "inf_dit"}
    for model, table in PAPER.items():
        base = table["rows"][0]["paper"]
        original = {"method": "none", "sampler.steps": 20 if model == "inf_dit" else 50}  # Inf-DiT: 20 Heun steps
        assert table["rows"][0]["match"] == original
        for row in table["rows"]:
            values = row["paper"]
            assert set(values) == set(table["columns"]), (model, row["label"])
            derived = {"flops_speedup": base["flops_T"] / values["flops_T"]}
            if "latency_speedup" in values:
                derived["latency_speedup"] = base["latency_s"] / values["latency_s"]
            for key, value in derived.items():
                agrees = values[key] == pytest.approx(value, abs=0.011)
                assert agrees != (key in row.get("inconsistent", {})), (model, row["label"], key, value)


def test_step_reduction_rows_are_the_fraction_of_steps_they_name():
    for table in PAPER.values():
        for row in table["rows"]:
            if row["match"] and row["match"]["method"] == "none":
                ratio = row["match"]["sampler.steps"] / table["rows"][0]["match"]["sampler.steps"]
                assert row["paper"]["flops_T"] == pytest.approx(table["rows"][0]["paper"]["flops_T"] * ratio,
                                                                rel=0.001), row["label"]


def _record(tmp_path, method, cache, steps=50, flops=1e12, metrics=None, model="dit_xl_2", name="r"):
    config = {"cache": {"name": method, **cache}, "sampler": {"steps": steps}, "model": {"name": model, "warmup": 1}}
    rec = {"run_id": f"{name}", "benchmark": "flops", "model": model, "method": method, "config": config,
           "profile": {"flops": flops, "flops_speedup": 23.74e12 / flops}, "samples": {"steps": steps},
           "metrics": metrics or {}}
    path = record_path(tmp_path, "flops", model, method, name)
    atomic_write_json(path, rec)
    return path, rec


def test_records_take_the_paper_row_they_reproduce_and_others_are_listed_as_ours_only(tmp_path):
    foca = _record(tmp_path, "foca", {"N": 5, "warmup": 1, "slope": "full", "corrector": "heun", "time": "step"},
                   flops=5.266e12, name="foca5")
    local = _record(tmp_path, "foca", {"N": 5, "warmup": 1, "slope": "local", "corrector": "heun", "time": "step"},
                    flops=5.266e12, name="foca5local")
    none25 = _record(tmp_path, "none", {}, steps=25, flops=11.867e12, name="ddim25")
    assert matches(foca[1], {"method": "foca", "sampler.steps": 50, "cache.N": 5})
    assert not matches(local[1], {"method": "foca", "sampler.steps": 50, "cache.N": 5})  # a non-default knob
    assert not matches(foca[1], {"method": "foca", "sampler.steps": 50, "cache.N": 3})

    table = build_paper_table(PAPER["dit_xl_2"], [foca, local, none25], "t")
    rows = {r[0]: r for r in table.rows}
    col = table.header.index("FLOPs(T) ↓ (ours)")
    assert table.header[col + 1] == "FLOPs(T) ↓ (paper)"
    assert rows["FoCa (N=5)"][col] == f"5.2660 ({100 * (5.266 - 5.24) / 5.24:+.2f}%)"
    assert rows["FoCa (N=5)"][col + 1] == "5.2400" and rows["FoCa (N=5)"][-1] == "`foca5`"
    assert rows["DDIM-25 steps"][col].startswith("11.8670") and rows["DDIM-25 steps"][-1] == "`ddim25`"
    assert rows["FoCa (N=3)"][col] == "—" and rows["FoCa (N=3)"][-1] == "paper only"
    assert rows["L2C (NFE=30)"][-1] == "paper only"
    assert rows["FoCa (N=5, slope=local) (ours only)"][-1] == "`foca5local`"
    assert [r[0] for r in table.rows][:3] == ["DDIM-50 steps", "DDIM-25 steps", "L2C (NFE=30)"]  # paper order


def test_markdown_and_latex_carry_the_same_cells(tmp_path):
    table = Table("FoCa & friends_1", ["Method", "FLOPs(T) ↓", "Speed ↑"], [["FoCa (N=5)", "5.24", "4.53×"]],
                  ["100% from records"])
    md, tex = to_markdown(table), to_latex(table)
    assert "| FoCa (N=5) | 5.24 | 4.53× |" in md
    assert r"FoCa (N=5) & 5.24 & 4.53$\times$ \\" in tex
    assert r"\caption{FoCa \& friends\_1}" in tex and r"\toprule" in tex and r"% 100\% from records" in tex
    assert tex.count(r"\\") == 2  # header + one row


def test_write_tables_writes_markdown_and_latex_for_each_group(tmp_path):
    _record(tmp_path, "none", {}, flops=23.733e12, name="ddim50")
    (md,) = write_tables(tmp_path, tmp_path / "tables")
    assert md.name == "flops_dit_xl_2.md" and md.with_suffix(".tex").is_file()
    text = md.read_text()
    assert "23.7330 (-0.03%)" in text and "paper table3_dit" in text and "results/paper/table3_dit.yaml" in text


# -- figure analyses: closed forms ---------------------------------------------------------------------------------
T = 50


def _trace(f):
    """A two-site trace whose features follow f(t) (t = step index)."""
    t = torch.arange(T, dtype=torch.float64)
    site = torch.stack([f(x) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) for x in t])  # (T, 3)
    return {"blocks.0.attn/default": site, "blocks.0.mlp/default": 3 * site, "times": t, "full": torch.ones(T).bool()}


def test_stiffness_of_an_exponential_matches_its_closed_form():
    lam = -0.1
    lte, index = stiffness(_trace(lambda t: math.exp(lam * float(t))))
    q = math.exp(lam)
    torch.testing.assert_close(index, torch.full((T - 2,), abs(q - 1), dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(lte, torch.full((T - 2,), abs(q - 2 + 1 / q), dtype=torch.float64), rtol=1e-9, atol=0)


def test_linear_trajectory_has_zero_truncation_error_and_is_forecast_exactly_by_foca_and_taylorseer():
    trace = _trace(lambda t: 2.0 - 0.3 * float(t))
    lte, index = stiffness(trace)
    assert lte.abs().max() < 1e-12 and index.abs().max() < 1e-12
    errors = forecast_errors(trace, N=5)
    full = [i < 1 or (i - 1) % 5 == 0 for i in range(T)]
    assert all(bool(e.isnan()[i]) == full[i] for e in errors.values() for i in range(T))  # full steps not drawn
    assert errors["FoCa"][3:].nan_to_num().max() < 1e-12 and errors["TaylorSeer"][7:].nan_to_num().max() < 1e-12
    assert errors["FORA"].nan_to_num().max() > 1e-3  # reuse lags a moving trajectory


def test_ten_step_errors_start_at_the_named_timesteps():
    """Linear trajectory: both forecasts are exact; quadratic: the error grows with the horizon."""
    exact = ten_step_errors(_trace(lambda t: 2.0 - 0.3 * float(t)))
    assert set(exact) == {f"{m}, from timestep {k}" for m in ("TaylorSeer", "FoCa") for k in (30, 20, 10)}
    lengths = {int(k.split()[-1]): len(e) for k, e in exact.items()}
    assert lengths == {30: 10, 20: 10, 10: 9}  # from step 40 of 50 only 9 steps remain
    assert max(e.max() for e in exact.values()) < 1e-12
    curved = ten_step_errors(_trace(lambda t: 1.0 + 0.1 * float(t) - 0.02 * float(t) ** 2))
    for errors in curved.values():
        assert errors[0] > 0 and bool((errors[1:] > errors[:-1]).all())


def test_write_figures_from_a_traced_sweep(tmp_path):
    """End to end on the tiny model: records with metrics and a full-compute trace -> PNG + PDF + sources."""
    from foca_bench.runner import run
    from tests.conftest import TINY, make_cfg

    quick = (*TINY, "sampler.steps=12", "benchmark.samples_per_class=1", "benchmark.batch_size=10",
             "profile.latency=false", "profile.baseline_steps=null", f"results_dir={tmp_path}")
    records = [run(make_cfg(*quick, "method=none", "trace=true"))]
    for corrector in ("heun", "none"):
        records.append(run(make_cfg(*quick, "method=foca", "cache.N=3", f"cache.corrector={corrector}")))
    written = write_figures(tmp_path, tmp_path / "figures")
    names = {p.stem for p in written}
    assert names == {"frontier_toy_fid_toy_dit", "heun_ablation_toy_fid_toy_dit", "forecast_error_toy_dit",
                     "stiffness_toy_dit", "ten_step_error_toy_dit"}
    assert all(p.stat().st_size > 1000 for p in written) and {p.suffix for p in written} == {".png", ".pdf"}
    sources = (tmp_path / "figures" / "heun_ablation_toy_fid_toy_dit.sources.txt").read_text()
    assert all(r["run_id"] in sources for r in records[1:])
    assert records[0]["trace"] in (tmp_path / "figures" / "stiffness_toy_dit.sources.txt").read_text()
