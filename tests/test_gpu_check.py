"""`make gpu-check`: it refuses to run without a GPU, in seconds, and its whole code path dry-runs on the CPU at
tiny sizes (eager and compiled, the paper's ratios beside ours, a block over the time budget listed as not run)."""

import argparse
import os
import subprocess
import sys
import time

from foca_bench import REPO_DIR


def test_gpu_check_refuses_without_a_gpu_in_seconds():
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "foca_bench.gpu_check"], cwd=REPO_DIR, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode != 0 and "no CUDA GPU is visible" in proc.stderr and "--device cpu" in proc.stderr
    assert time.perf_counter() - started < 60  # importing torch; no model, no wheel is touched


def test_gpu_check_dry_run_on_the_cpu_writes_the_table_with_the_papers_ratios(tmp_path):
    """Tiny DiT-XL/2 and FLUX, 3 steps, eager and compiled (aot_eager): the whole check's code path."""
    from foca_bench.gpu_check import run_check

    args = argparse.Namespace(device="cpu", size="tiny", steps=3, frames=5, backend="aot_eager", mode=None,
                              repeats=1, budget=600.0, only=None, out=tmp_path / "out", copy_to=tmp_path / "copy")
    blocks = [("dit_xl_2", "eager", 0, [("none", {}), ("foca", {"N": 3})]),
              ("dit_xl_2", "compiled", 0, [("none", {}), ("foca", {"N": 3})]),
              ("flux", "eager", 10**6, [("none", {}), ("foca", {"N": 5})])]  # beyond the budget: listed as not run
    path = run_check(args, blocks)
    text = path.read_text()
    assert (tmp_path / "copy" / path.name).is_file() and path.with_suffix(".json").is_file()
    foca = [line for line in text.splitlines() if "FoCa (N=3)" in line]
    assert len(foca) == 2 and all("0.62" in line for line in foca)  # the paper's DiT ratio: (0.428/0.250)/2.77
    assert "Not run (time budget): flux:eager" in text
