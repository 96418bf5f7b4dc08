"""`foca_bench.readings` (`make readings`): open-loop errors on synthetic traces against closed forms, the verdict
rule, TaylorSeer's official start in its rows, and (slow) the whole command on a tiny model."""

import json

import pytest
import torch

from foca_bench import readings
from methods import replay

T = 20


def linear_trace(sites=2, batch=3):
    """Per site (T, batch, 4 tokens, 2 channels): F = a + b t, with a far from zero so no norm vanishes."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(T, dtype=torch.float64).view(T, 1, 1, 1)
    trace = {f"s{k}/default": 10 + torch.rand(batch, 4, 2, generator=g) + t * torch.randn(batch, 4, 2, generator=g)
             for k in range(sites)}
    return {**trace, "times": torch.linspace(999, 0, T, dtype=torch.float64), "full": torch.ones(T, dtype=torch.bool)}


def test_open_loop_on_a_line_exact_methods_score_zero_and_fora_its_closed_form():
    trace = linear_trace()
    errors = readings.open_loop(trace)
    for row in ("FoCa ours, slope=local", "FoCa ours, slope=full", "TaylorSeer O=1", "TaylorSeer O=2"):
        assert all(v < 1e-12 for v in errors[row].values()), row  # exact on lines once two full steps exist
    for row in ("FoCa cachedit", "FoCa lab", "FORA"):
        assert all(v > 1e-3 for v in errors[row].values()), row
    # FORA, warmup=1, N=5: every skipped step i reuses the last full step b; mean of |F_b - F_i| / |F_i|
    full = [i < 1 or (i - 1) % 5 == 0 for i in range(T)]
    per_site = []
    for site in ("s0/default", "s1/default"):
        F = trace[site]
        rel = [((F[max(j for j in range(i) if full[j])] - F[i]).flatten(1).norm(dim=1) / F[i].flatten(1).norm(dim=1))
               for i in range(T) if not full[i]]
        per_site.append(torch.stack(rel).mean())
    assert errors["FORA"]["w1/N5"] == pytest.approx(float(torch.stack(per_site).mean()), rel=1e-12)


def test_verdict_needs_a_lower_error_at_n5_and_n7_and_a_falling_ratio():
    base = {f"w1/N{N}": 1.0 for N in readings.NS}
    errors = {row: dict(base) for row in readings.ROWS}
    errors["TaylorSeer O=1"] = {"w1/N3": 1.0, "w1/N5": 2.0, "w1/N7": 4.0}  # the better TaylorSeer is O=2 (1.0)
    errors["FoCa lab"] = {"w1/N3": 1.1, "w1/N5": 0.9, "w1/N7": 0.8}  # falls below: reproduces
    errors["FoCa cachedit"] = {"w1/N3": 0.5, "w1/N5": 0.9, "w1/N7": 0.95}  # below, but the gap closes with N
    v = readings.verdict(errors, 1)
    assert v["FoCa lab"] == {"ratios": pytest.approx([1.1, 0.9, 0.8]), "reproduces": True}
    assert not v["FoCa cachedit"]["reproduces"] and not v["FoCa ours, slope=local"]["reproduces"]


def test_taylorseer_rows_use_the_official_derivative_start():
    """F = t^2, full at 0, 1, 2, 7 (warmup=2, N=5), O=2, as `open_loop` replays the row. Official start (factors
    from step `warmup` on): factors at step 2 are [F_2, F_2 - F_1], so step 3 gets 4 + 3 = 7 and step 4 gets
    4 + 3 * 2; forming them from the second full step (`first_enhance=1`) gives 4 + 3 + 2/2 = 8 at step 3."""
    method, knobs = readings.ROWS["TaylorSeer O=2"]
    values = torch.tensor([[float(i * i)] for i in range(8)], dtype=torch.float64)
    full = torch.tensor([i < 3 or i == 7 for i in range(8)])
    times = torch.arange(8, dtype=torch.float64)
    out = replay(method, values, times, full, N=5, warmup=2, time="step", **knobs)
    assert out[3, 0].item() == pytest.approx(7.0, abs=1e-12) and out[4, 0].item() == pytest.approx(10.0, abs=1e-12)
    former = replay(method, values, times, full, N=5, warmup=2, time="step", first_enhance=1, **knobs)
    assert former[3, 0].item() == pytest.approx(8.0, abs=1e-12)


@pytest.mark.slow
def test_make_readings_end_to_end_on_a_tiny_model(tmp_path):
    """The whole command on a 2-block random DiT, 10 steps, 10 samples per closed-loop run: every row and setting
    gets a record, and the table, numbers and figure are written."""
    result = readings.main(["+readings.samples=1", "+readings.trace_samples=2", "model.size=tiny", "sampler.steps=10",
                            "profile.baseline_steps=null", f"results_dir={tmp_path}"])
    out = tmp_path / "readings"
    assert {p.name for p in out.iterdir()} >= {"readings.md", "readings.json", "readings.png", "traces"}
    saved = json.loads((out / "readings.json").read_text())
    assert saved["closed_loop"] == result["closed_loop"]
    for row in readings.ROWS:
        assert set(result["open_loop"][row]) == set(result["closed_loop"][row]) == {
            f"w{w}/N{N}" for w in readings.WARMUPS for N in readings.NS}
        for cell in result["closed_loop"][row].values():
            record = json.loads(open(cell["record"]).read())
            assert cell["rel_l2"] > 0 and record["samples"]["count"] == 10
            assert cell["rel_l2_interval"] == record["metrics"]["rel_l2"]["interval"]
    text = (out / "readings.md").read_text()
    assert all(row in text for row in readings.ROWS)
    cell = result["closed_loop"]["FORA"]["w1/N3"]
    lo, hi = cell["rel_l2_interval"]
    assert lo <= cell["rel_l2"] <= hi and f"{cell['rel_l2']:.4f} ± {(hi - lo) / 2:.4f}" in text
