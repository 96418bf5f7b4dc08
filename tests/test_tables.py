"""Tables and figures from records: the paper's reference data, row matching, LaTeX, and the figure analyses
checked against closed forms."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from foca_bench import REPO_DIR
from foca_bench.config import validate
from foca_bench.figures import ten_step_errors, forecast_errors, stiffness, write_figures
from foca_bench.identity import identity
from foca_bench.records import atomic_write_json, record_path
from foca_bench.results import frame, load
from foca_bench.tables import (FAULT, Table, build_paper_table, load_paper_tables, matches, row_run, to_latex,
                               to_markdown, write_tables)
from tests.conftest import make_cfg

PAPER = load_paper_tables()


def test_paper_reference_data_is_complete_and_self_consistent():
    """Every transcribed row has every column; the paper's speed-ups agree with its own FLOPs and latencies
    (an independent check of the transcription, to the paper's two decimals), except where the paper itself
    disagrees with its columns: those cells are listed under the row's `inconsistent` with the arithmetic."""
    assert set(PAPER) == {"flux", "hunyuan_video", "dit_xl_2", "inf_dit"}
    for model, table in PAPER.items():
        base = table["rows"][0]["paper"]
        assert table["rows"][0]["row"] == "none"
        for row in table["rows"]:
            values = row["paper"]
            assert set(values) == set(table["columns"]), (model, row["label"])
            derived = {"flops_speedup": base["flops_T"] / values["flops_T"]}
            if "latency_speedup" in values:
                derived["latency_speedup"] = base["latency_s"] / values["latency_s"]
            for key, value in derived.items():
                agrees = values[key] == pytest.approx(value, abs=0.011)
                assert agrees != (key in row.get("inconsistent", {})), (model, row["label"], key, value)


def test_each_paper_row_is_defined_once_by_its_row_file():
    """A paper row names its run, `conf/row/<table>/<row>.yaml`, whose first comment names the paper's row; what
    the row runs is that file composed (no second description of the run in the paper's YAML)."""
    for table in PAPER.values():
        for row in table["rows"]:
            assert "match" not in row
            if row["row"] is None:
                continue
            path = REPO_DIR / "conf" / "row" / table["table"] / f"{row['row']}.yaml"
            assert path.is_file(), path
            assert path.read_text().splitlines()[1].startswith("# Row of"), path
    run = row_run("table3_dit", "toca_n3", "dit_xl_2")
    assert run["method"] == "toca" and run["steps"] == 50
    assert run["cache"]["N"] == 3 and run["cache"]["force_schedule"] == "interval"


def test_step_reduction_rows_are_the_fraction_of_steps_they_name():
    for table in PAPER.values():
        original = row_run(table["table"], table["rows"][0]["row"], table["model"])  # Inf-DiT: 20 Heun steps
        assert original["method"] == "none" and original["steps"] == (20 if table["model"] == "inf_dit" else 50)
        for row in table["rows"]:
            run = row_run(table["table"], row["row"], table["model"]) if (row["row"] or "").startswith("none") else None
            if run and run["method"] == "none":
                ratio = run["steps"] / original["steps"]
                assert row["paper"]["flops_T"] == pytest.approx(table["rows"][0]["paper"]["flops_T"] * ratio,
                                                                rel=0.001), row["label"]


def _record(tmp_path, *overrides, flops=1e12, metrics=None, model="dit_xl_2", name="r", faults=None):
    """A record of the run `overrides` describe (its real identity), with made-up numbers."""
    cfg = make_cfg(f"model={model}", "profile=flops_only", *overrides)
    cache = validate(cfg)
    rec = {"run_id": name, "benchmark": "flops", "model": model, "method": cache.name,
           "config": identity(cfg, cache), "profile": {"flops": flops, "flops_speedup": 23.74e12 / flops},
           "samples": {"steps": cfg.sampler.steps}, "metrics": metrics or {}}
    if faults:
        rec["faults"] = faults
    path = record_path(tmp_path, "flops", model, cache.name, name)
    atomic_write_json(path, rec)
    return path, rec


def _rows(table):
    return {r[0]: list(r) for r in table.frame.itertuples(index=False)}


def test_records_take_the_paper_row_they_reproduce_and_others_are_listed_as_ours_only(tmp_path):
    foca = _record(tmp_path, "method=foca", "cache.N=5", flops=5.266e12, name="foca5")
    local = _record(tmp_path, "method=foca", "cache.N=5", "cache.slope=local", flops=5.266e12, name="foca5local")
    none25 = _record(tmp_path, "method=none", "sampler.steps=25", flops=11.867e12, name="ddim25")
    df = frame([foca, local, none25])
    foca_row, local_row = df.iloc[0], df.iloc[1]
    assert matches(foca_row, row_run("table3_dit", "foca_n5", "dit_xl_2"))
    assert not matches(local_row, row_run("table3_dit", "foca_n5", "dit_xl_2"))  # a non-default knob
    assert not matches(foca_row, row_run("table3_dit", "foca_n3", "dit_xl_2"))

    table = build_paper_table(PAPER["dit_xl_2"], df, "t")
    rows = _rows(table)
    col = list(table.frame.columns).index("FLOPs(T) ↓ (ours)")
    assert table.frame.columns[col + 1] == "FLOPs(T) ↓ (paper)"
    assert rows["FoCa (N=5)"][col] == f"5.2660 ({100 * (5.266 - 5.24) / 5.24:+.2f}%)"
    assert rows["FoCa (N=5)"][col + 1] == "5.2400" and rows["FoCa (N=5)"][-1] == "`foca5`"
    assert rows["DDIM-25 steps"][col].startswith("11.8670") and rows["DDIM-25 steps"][-1] == "`ddim25`"
    assert rows["FoCa (N=3)"][col] == "—" and rows["FoCa (N=3)"][-1] == "paper only"
    assert rows["L2C (NFE=30)"][-1] == "paper only"
    assert rows["FoCa (N=5, slope=local) (ours only)"][-1] == "`foca5local`"
    assert list(rows)[:3] == ["DDIM-50 steps", "DDIM-25 steps", "L2C (NFE=30)"]  # paper order


def test_markdown_and_latex_carry_the_same_cells(tmp_path):
    table = Table("FoCa & friends_1", pd.DataFrame([["FoCa (N=5)", "5.24", "4.53×"]],
                                                   columns=["Method", "FLOPs(T) ↓", "Speed ↑"]), ["100% from records"])
    md, tex = to_markdown(table), to_latex(table)
    assert "| FoCa (N=5) | 5.24 | 4.53× |" in md
    assert r"FoCa (N=5) & 5.24 & 4.53$\times$ \\" in tex
    assert r"\caption{FoCa \& friends\_1}" in tex and r"\toprule" in tex and r"% 100\% from records" in tex
    assert tex.count(r"\\") == 2  # header + one row


def test_write_tables_writes_markdown_latex_and_every_record_as_csv(tmp_path):
    _record(tmp_path, "method=none", flops=23.733e12, name="ddim50")
    _record(tmp_path, "method=foca", "cache.N=5", flops=5.266e12, name="foca5")
    (md,) = write_tables(tmp_path, tmp_path / "tables")
    assert md.name == "flops_dit_xl_2.md" and md.with_suffix(".tex").is_file()
    text = md.read_text()
    assert "23.7330 (-0.03%)" in text and "paper table3_dit" in text and "results/paper/table3_dit.yaml" in text
    csv = pd.read_csv(tmp_path / "tables" / "records.csv")
    assert sorted(csv["run_id"]) == ["ddim50", "foca5"] and csv.loc[csv.run_id == "foca5", "config.cache.N"].item() == 5


def test_a_faulted_value_is_marked_and_an_unreadable_record_is_named_and_skipped(tmp_path):
    """A metric the record lists under `faults` (written as null) shows as non-finite; a truncated record and a
    JSON file that is no record are reported by path, and every other table still renders."""
    nan = {"fid": {"value": None, "higher_is_better": False}, "is": {"value": 200.0, "higher_is_better": True}}
    _record(tmp_path, "method=foca", "cache.N=5", name="foca5", metrics=nan,
            faults=[{"field": "metrics.fid.value", "value": "nan"}])
    _record(tmp_path, "method=none", name="ddim50", metrics={"fid": {"value": 2.3, "higher_is_better": False}})
    flux = _record(tmp_path, "method=none", model="flux", name="flux50")[0]
    truncated = record_path(tmp_path, "flops", "hunyuan_video", "none", "cut")
    truncated.parent.mkdir(parents=True)
    truncated.write_text(flux.read_text()[:100])
    stray = record_path(tmp_path, "flops", "hunyuan_video", "none", "stray")
    stray.write_text(json.dumps({"hello": 1}))
    with pytest.warns(UserWarning) as caught:
        written = write_tables(tmp_path, tmp_path / "tables")
    messages = " ".join(str(w.message) for w in caught)
    assert str(truncated) in messages and str(stray) in messages
    assert sorted(p.name for p in written) == ["flops_dit_xl_2.md", "flops_flux.md"]
    with pytest.warns(UserWarning):
        df = load(tmp_path)
    table = build_paper_table(PAPER["dit_xl_2"], df[df.model == "dit_xl_2"], "t")
    rows, header = _rows(table), list(table.frame.columns)
    fid, is_ = header.index("FID ↓ (ours)"), header.index("IS ↑ (ours)")
    assert rows["FoCa (N=5)"][fid] == FAULT and rows["FoCa (N=5)"][is_].startswith("200.000")
    assert rows["DDIM-50 steps"][fid].startswith("2.300")
    assert FAULT in (tmp_path / "tables" / "flops_dit_xl_2.md").read_text()


def test_paper_table_quality_cells_carry_their_interval_and_the_paired_verdict(tmp_path):
    """FLUX (Table 1): our ImageReward beside the paper's reads `value ± half-width`, with ≈ where the paired
    bootstrap cannot tell the row from the 50-step row on the same seeds (evaluation/uncertainty.py)."""
    from evaluation.uncertainty import summary
    from foca_bench.significance import SAME

    rng = np.random.default_rng(0)
    shared = rng.normal(1.0, 0.3, 40)  # per-prompt scores the rows share (same seeds)

    def metrics(values):
        return {"image_reward": {"value": float(np.mean(values)), **summary(values), "higher_is_better": True}}

    def record(name, *overrides, values):
        path, rec = _record(tmp_path, *overrides, model="flux", name=name, metrics=metrics(values))
        rec["samples"].update(count=40, seeds=[0, 39])
        atomic_write_json(path, rec)
        return path, rec

    record("flux50", "method=none", values=shared)
    record("foca5", "method=foca", "cache.N=5", values=shared + rng.normal(0, 1e-3, 40))
    record("foca7", "method=foca", "cache.N=7", values=shared - 0.3)
    table = build_paper_table(PAPER["flux"], load(tmp_path), "t")
    rows, header = _rows(table), list(table.frame.columns)
    col = header.index("ImageReward ↑ (ours)")
    half = (summary(shared)["interval"][1] - summary(shared)["interval"][0]) / 2
    assert rows["FLUX.1[dev]: 50 steps"][col].startswith(f"{shared.mean():.4f} ± {half:.4f} (Δ")
    assert SAME not in rows["FLUX.1[dev]: 50 steps"][col]  # the baseline is not compared with itself
    assert f"{SAME} (Δ" in rows["FoCa (N=5)"][col]
    assert " ± " in rows["FoCa (N=7)"][col] and SAME not in rows["FoCa (N=7)"][col]
    assert rows["FoCa (N=8)"][col] == "—"
    assert any("paired bootstrap" in note for note in table.notes)


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
