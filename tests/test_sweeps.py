"""Sweeps and tracking: Hydra's submitit launcher end to end, resumable cells, concurrent claims, wandb offline."""

import json
import os
import subprocess
import sys

import pytest

from foca_bench import REPO_DIR
from foca_bench.records import record_files, record_path
from foca_bench.runner import run
from tests.conftest import TINY, make_cfg
from tests.wandb_log import logged

QUICK = (*TINY, "sampler.steps=6", "benchmark.samples_per_class=1", "benchmark.batch_size=10",
         "profile.batch_size=2", "profile.repeats=1", "profile.warmup=0", "profile.baseline_steps=null")


def _multirun(tmp_path, *overrides):
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_dir={tmp_path}", *QUICK, *overrides]
    proc = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO_DIR)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_submitit_local_multirun_records_every_cell_and_a_rerun_skips_them(tmp_path):
    cells = "method=none,fora,taylorseer,foca"
    _multirun(tmp_path, cells, "cache.N=2")
    records = {r["method"]: (p, r) for p in record_files(tmp_path) for r in [json.loads(p.read_text())]}
    assert set(records) == {"none", "fora", "taylorseer", "foca"}
    for method, (path, rec) in records.items():  # every job wrote a complete record of its own cell
        assert rec["config"]["cache"]["name"] == method and "fid" in rec["metrics"] and rec["profile"]["flops"] > 0
    mtimes = {m: p.stat().st_mtime_ns for m, (p, _) in records.items()}
    _multirun(tmp_path, cells, "cache.N=2")
    assert {m: p.stat().st_mtime_ns for m, (p, _) in records.items()} == mtimes
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("*.log"))
    assert logs.count("Record exists, skipping") == 4
    assert len(record_files(tmp_path)) == 4


FLOPS_ONLY = (*TINY, "sampler.steps=4", "profile.benchmark=false", "profile.latency=false", "method=foca")


@pytest.mark.parametrize("launcher", ["basic", pytest.param("local", marks=pytest.mark.slow)])
def test_a_sweep_runs_every_cell_and_lists_the_failed_ones(tmp_path, launcher):
    """Cells N=2, 0 (invalid), 3 (its record corrupt on disk), 4: the sweep records N=2 and N=4, exits 1 and lists
    N=0 and N=3 with their reasons. `local` (submitit, a process per cell; slow) notes outcomes from its workers."""
    from foca_bench.runner import prepare

    corrupt = prepare(make_cfg(*FLOPS_ONLY, "cache.N=3", f"results_dir={tmp_path}")).record
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"run_id": "trunc')
    launch = ["hydra/launcher=local", "hydra.launcher.cpus_per_task=1"] if launcher == "local" else []
    proc = subprocess.run([sys.executable, "run.py", "-m", *launch, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           f"results_dir={tmp_path}", *FLOPS_ONLY, "cache.N=2,0,3,4"], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_DIR)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    recorded = {json.loads(p.read_text())["config"]["cache"]["N"] for p in corrupt.parent.glob("*.json") if p != corrupt}
    assert recorded == {2, 4}
    report = proc.stderr[proc.stderr.index("Sweep: 4 cells"):]
    assert "2 done, 2 failed" in report
    assert "failed #1" in report and "cache.N=0" in report and "must be >= 1" in report
    assert "failed #2" in report and "cache.N=3" in report and str(corrupt) in report and "force=true" in report
    assert "cache.N=2" not in report and "cache.N=4" not in report


def test_a_cell_claimed_by_a_live_job_is_skipped_and_a_dead_jobs_claim_is_taken_over(tmp_path):
    cfg = make_cfg(*QUICK, f"results_dir={tmp_path}", "method=foca", "cache.N=2", "profile.latency=false")
    first = run(cfg)  # learn the record's path, then remove it
    path = record_path(tmp_path, "toy_fid", "toy_dit", "foca", first["run_id"])
    path.unlink()
    lock = path.with_name(f".{path.stem}.lock")
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))  # alive: us
    skipped = run(cfg)
    assert skipped["skipped"] and not path.exists() and lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0}))
    again = run(cfg)
    assert path.is_file() and not lock.exists() and again["metrics"] == first["metrics"]


def test_wandb_offline_run_directory_holds_the_metrics_and_the_table(tmp_path):
    record = run(make_cfg(*QUICK, f"results_dir={tmp_path}", "method=foca", "cache.N=2", "logger=wandb",
                          "logger.mode=offline"))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    history = logged(run_file)["history"]
    assert float(history["metrics/fid"]) == pytest.approx(record["metrics"]["fid"]["value"])
    assert float(history["profile/flops_speedup"]) == pytest.approx(record["profile"]["flops_speedup"])
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in run_dir.glob("files/media/table/*.json")}
    assert set(tables) == {"row", "table"}
    assert tables["table"]["data"][0][-1] == f"`{record['run_id']}`" and "FID ↓" in tables["table"]["columns"]
    assert list(run_dir.glob("files/media/images/*.png"))  # the sample grid
    from foca_bench.identity import run_id

    assert run_id(record["config"]) == record["run_id"] == run_id({**record["config"], "logger": {"name": "none"}})
