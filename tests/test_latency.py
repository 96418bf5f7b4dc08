"""Latency you can trust: measurements repeat until their samples agree or a time cap passes and keep every sample;
`latency_mark` marks a noisy cell (†) and a speed-up beyond the FLOPs one (§), from synthetic timings; tables carry
the marks."""

import pytest

from foca_bench import profiling
from foca_bench.profiling import BEYOND_FLOPS, NOISY, latency_mark, measure_interleaved, spread
from foca_bench.records import atomic_write_json, record_path
from foca_bench.results import frame
from foca_bench.tables import build_table

# the cases: a loaded machine's FoCa N=5 at 6.90x against a 4.35x FLOPs speed-up, and DDIM-50 at 11.3 s
# beside FORA N=3 at 11.7 s with a 1.68x "speed-up" (samples that disagree)
IMPOSSIBLE = dict(mine_s=[1.60, 1.62, 1.58], base_s=[11.05, 11.2, 10.9], flops_speedup=4.35)
WIDE = dict(mine_s=[11.7, 6.1, 6.4], base_s=[11.3, 11.2, 16.0], flops_speedup=2.82)
CLEAN = dict(mine_s=[4.00, 4.02, 3.98, 4.01], base_s=[11.1, 11.0, 11.2, 11.05], flops_speedup=2.82)


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([5.0]) == 0.0
    assert spread([1.0, 2.0, 3.0]) == pytest.approx((2.5 - 1.5) / 2.0)
    assert spread([1.0, 1.0, 1.0, 1.0, 9.0]) == 0.0  # one load spike among five samples is not noise of the median


@pytest.mark.parametrize("case,expected", [(IMPOSSIBLE, BEYOND_FLOPS), (WIDE, NOISY), (CLEAN, "")])
def test_latency_mark_on_synthetic_timings(case, expected):
    assert latency_mark(**case) == expected


def test_latency_mark_cases_at_their_edges():
    both = dict(mine_s=[1.6, 1.0, 1.62], base_s=[11.0, 11.1, 10.9], flops_speedup=4.35)  # beyond FLOPs and wide
    assert latency_mark(**both) == NOISY + BEYOND_FLOPS
    straddling = dict(mine_s=[2.4, 2.6, 2.5], base_s=[11.0, 11.0, 11.0], flops_speedup=4.35)  # 4.2-4.6x vs 4.35x
    assert latency_mark(**straddling) == ""
    same = [2.0, 2.01, 1.99]
    assert latency_mark(same, same, 1.0) == ""  # the baseline row itself
    assert latency_mark(IMPOSSIBLE["mine_s"], IMPOSSIBLE["base_s"]) == ""  # no FLOPs speed-up: only noise is marked


def _scripted(monkeypatch, script):
    """time_once returns each function's next scripted time (functions are named by what they return)."""
    queues = {name: list(times) for name, times in script.items()}
    monkeypatch.setattr(profiling, "time_once", lambda fn, device: queues[fn()].pop(0))
    return {name: (lambda name=name: name) for name in script}


def test_measurements_repeat_until_their_samples_agree_and_keep_every_sample(monkeypatch):
    fns = _scripted(monkeypatch, {"none": [10, 14, 10, 10.1, 10, 9.9, 10], "foca": [3, 3, 3, 3.05, 3, 3, 3]})
    stats = measure_interleaved(fns, "cpu", warmup=1, repeats=3, max_spread=0.05, time_cap_s=60)
    # 3 rounds leave none's [10, 14, 10] at spread 0.2, 4 at 0.107; the fifth settles it (0.01), outlier kept
    assert stats["none"]["samples_s"] == [10, 14, 10, 10.1, 10] and stats["foca"]["samples_s"] == [3, 3, 3, 3.05, 3]
    assert stats["none"]["median_s"] == 10 and stats["none"]["repeats"] == 5


def test_measurements_stop_at_the_time_cap(monkeypatch):
    fns = _scripted(monkeypatch, {"a": [1, 2] * 50, "b": [1] * 100})
    t = iter(range(0, 1000, 10))
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: float(next(t)))
    stats = measure_interleaved(fns, "cpu", warmup=0, repeats=2, max_spread=0.05, time_cap_s=35)
    # the clock reads 0 at the start, then 10, 20, 30, 40 at each check from the second round on
    assert stats["a"]["repeats"] == 5 and latency_mark(stats["a"]["samples_s"], stats["b"]["samples_s"]) == NOISY


def _latency_record(tmp_path, method, N, mine_s, base_s, flops_speedup):
    mine, base = mine_s, base_s
    config = {"cache": {"name": method, "N": N, "warmup": 1}, "sampler": {"steps": 50},
              "model": {"name": "toy_dit", "warmup": 1}}
    median = sorted(mine)[len(mine) // 2]
    profile = {"flops": 1e12 / flops_speedup, "flops_speedup": flops_speedup, "latency_s": median,
               "latency_speedup": sorted(base)[len(base) // 2] / median,
               "latency_detail": {"samples_s": mine, "none": {"samples_s": base}}}
    rec = {"run_id": f"{method}{N}", "benchmark": "toy_fid", "model": "toy_dit", "method": method, "config": config,
           "profile": profile, "samples": {"steps": 50, "full_steps": 11}, "metrics": {}}
    path = record_path(tmp_path, "toy_fid", "toy_dit", method, rec["run_id"])
    atomic_write_json(path, rec)
    return path, rec


def test_tables_mark_the_latency_cells_and_say_what_the_marks_mean(tmp_path):
    records = [_latency_record(tmp_path, "foca", 5, **IMPOSSIBLE), _latency_record(tmp_path, "fora", 3, **WIDE),
               _latency_record(tmp_path, "taylorseer", 3, **CLEAN)]
    table = build_table(frame(records), "t")
    rows = {r[0].split(" ")[0]: r for r in table.frame.itertuples(index=False)}
    header = list(table.frame.columns)
    latency, speedup = header.index("Latency(s) ↓"), header.index("Latency speed ↑")
    assert rows["FoCa"][latency].endswith(BEYOND_FLOPS) and rows["FoCa"][speedup].endswith(BEYOND_FLOPS)
    assert rows["FORA"][speedup].endswith(NOISY) and not rows["FORA"][speedup].endswith(BEYOND_FLOPS)
    assert rows["TaylorSeer"][speedup].endswith("×")
    assert any(NOISY in note and BEYOND_FLOPS in note for note in table.notes)


def test_bench_counts_every_method_s_skipped_step_from_a_schedule_with_skipped_steps():
    """`make bench`'s FLOPs per skipped step: the uncached work (patch embedding, final layer; ~1% of a full step
    on toy_dit), the same for every forecasting method. FORA's official countdown computes the last step, so a
    2-step probe had no skipped step and reported a skipped step as a full one (FLOPs speed-up 1.00x)."""
    import argparse

    from foca_bench.bench_latency import MODELS, Bench, full_steps, cache_cfg

    assert full_steps(cache_cfg("fora", 99, 0, 2), 3) == 2  # i = 0 and i = T - 1: one skipped step of 3
    bench = Bench(MODELS["toy_dit"], argparse.Namespace(device="cpu", order=2, mode=None))
    flops = bench.flops(["fora", "taylorseer", "foca"])
    share = {name: skipped / flops["full"] for name, skipped in flops["skipped"].items()}
    assert 0 < share["foca"] < 0.05 and share["fora"] == pytest.approx(share["foca"]) == share["taylorseer"]


def test_bench_rows_project_from_steady_steps_and_bound_by_the_held_tensors_read():
    """`make bench`'s arithmetic on synthetic step times: the projection counts each run's first full step once
    and every other step at its steady time; the bound is a method whose full steps cost `none`'s and whose
    skipped steps only read its held tensors; the target lines read those figures off the rows."""
    import argparse

    from foca_bench import bench_latency as bl

    bench = argparse.Namespace(model=bl.MODELS["toy_dit"], warmup=1, args=argparse.Namespace(N=5, order=2))
    flops = {"full": 100.0, "skipped": {"foca": 1.0}}
    steps = {"none": {"first": [0.012], "full": [0.010, 0.010, 0.011]},
             "foca": {"first": [0.020], "full": [0.011], "skipped": [0.001], "floor": [0.0002, 0.0002, 0.0003]}}
    none, foca = bl.rows_of(bench, "eager", ["foca"], flops, steps, None)
    n_full = bl.full_steps(bl.cache_cfg("foca", 5, 1, 2), bl.STEPS)
    assert n_full == 11 and none["full_ms"] == pytest.approx(10.0) and none["first_ms"] == pytest.approx(12.0)
    flops_up = 50 * 100.0 / (11 * 100.0 + 39 * 1.0)
    assert foca["flops_speedup"] == pytest.approx(flops_up)
    assert foca["projected"] == pytest.approx((0.012 + 49 * 0.010) / (0.020 + 10 * 0.011 + 39 * 0.001))
    assert foca["bound"] == pytest.approx(50 * 0.010 / (11 * 0.010 + 39 * 0.0002) / flops_up)
    text = bl.table([none, foca], bench.args)
    assert "| toy_dit | FoCa | N=5 | eager | 11.0 (20.0) | 1.00 (0%) |" in text
    assert f"({foca['projected'] / flops_up:.2f}) |" in text  # a projection below the FLOPs speed-up: no mark
    beyond = dict(foca, projected=1.1 * flops_up)  # full-step times of different probes disagreeing
    assert f"({1.1:.2f}){BEYOND_FLOPS} |" in bl.table([none, beyond], bench.args)
    (line,) = bl.targets([none, foca], 5)
    assert line == (f"FoCa N=5 on toy_dit, eager: latency/FLOPs {foca['projected'] / flops_up:.2f} (projected); "
                    f"bound by its held tensors' read time {foca['bound']:.2f}")
