"""benchmark=imagenet_fid end to end on a tiny random DiT, with torch-fidelity's Inception at random weights saved
in its real format: scores equal to torch-fidelity's, their intervals recomputed from the arrays beside the record,
paired comparisons of two rows, a perturbation that must worsen FID, sharding, kill-and-resume, missing files."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evaluation.inception_fid import Uint8Images, fid_is
from evaluation.uncertainty import set_interval, set_statistic
from foca_bench import REPO_DIR
from foca_bench.benchmarks import MissingFileError
from foca_bench.runner import prepare, run
from foca_bench.significance import compare, load_arrays
from tests.conftest import TINY, make_cfg
from tests.random_nets import save_random_inception


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_files")
    ref = root / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    return {"inception": save_random_inception(root / "inception.pth"), "reference": ref}


def fid_overrides(files, results, *extra):
    return (*TINY, "benchmark=imagenet_fid", f"benchmark.reference_path={files['reference']}",
            f"benchmark.inception_path={files['inception']}", "benchmark.samples_per_class=1", "benchmark.batch_size=2",
            "sampler.steps=4", "profile.latency=false", f"results_dir={results}", *extra)


def test_fid_is_end_to_end_and_noise_worsens_fid(files, tmp_path):
    record = run(make_cfg(*fid_overrides(files, tmp_path, "method=fora", "cache.N=2")))
    store_npz = record["samples"]["npz"]
    with np.load(store_npz) as f:
        samples, labels = f["arr_0"], f["labels"]
    assert samples.shape == (10, 16, 16, 1) and labels.tolist() == list(range(10))  # sample i is class i % 10
    assert all(np.isfinite(m["value"]) for m in record["metrics"].values())
    assert (tmp_path / "samples" / "imagenet_fid").is_dir() and record["samples"]["shards"][0]["generated"] == 10
    assert Path(record["sample_grid"]).is_file()  # the first samples as a picture beside the record
    # against a reference batch of the samples themselves FID is 0 (same statistics); noise must raise it
    inception = files["inception"]
    same = fid_is(samples, np.repeat(samples, 3, axis=-1), inception, isc_splits=2, verbose=False)["fid"]["value"]
    noise = np.random.default_rng(1).normal(0, 60, samples.shape)
    noisy = np.clip(samples + noise, 0, 255).astype(np.uint8)
    worse = fid_is(noisy, np.repeat(samples, 3, axis=-1), inception, isc_splits=2, verbose=False)["fid"]["value"]
    assert abs(same) < 1e-3 and worse > 1.0  # sqrtm of a rank-deficient covariance: ~1e-5, not exactly 0


def test_fid_is_are_torch_fidelitys_and_recompute_from_the_kept_arrays(files):
    """One Inception pass gives torch-fidelity's own FID/IS (its `calculate_metrics` as the independent value), and
    the kept features/logits recompute both, and their intervals, exactly as `significance.compare` will."""
    import torch_fidelity

    rng = np.random.default_rng(2)
    samples = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    with np.load(files["reference"]) as f:
        reference = f["arr_0"]
    out = fid_is(samples, reference, files["inception"], isc_splits=4, verbose=False)  # 6 / 4: uneven splits
    tf = torch_fidelity.calculate_metrics(
        input1=Uint8Images(samples), input2=Uint8Images(reference), fid=True, isc=True, isc_splits=4, cuda=False,
        feature_extractor_weights_path=str(files["inception"]), cache=False, verbose=False, save_cpu_ram=True)
    assert out["fid"]["value"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    assert out["is"]["value"] == pytest.approx(tf["inception_score_mean"], rel=1e-9)
    assert out["is_std"]["value"] == pytest.approx(tf["inception_score_std"], rel=1e-9)
    fid, is_ = out["fid"], out["is"]
    assert fid["arrays"]["features"].shape == (6, 2048) and fid["arrays"]["real_sigma"].shape == (2048, 2048)
    assert is_["arrays"]["logits"].shape == (6, 1008) and is_["statistic"] == "torch_fidelity_is/4"
    for m, reported in ((fid, tf["frechet_inception_distance"]), (is_, tf["inception_score_mean"])):
        fn, rows = set_statistic(m["statistic"], m["arrays"])
        estimate = fn(rows)  # ours, from the kept arrays
        assert estimate == pytest.approx(reported, abs=1e-3, rel=1e-6)
        assert set_interval(rows, fn) == tuple(m["interval"])
        assert m["interval"][0] <= estimate <= m["interval"][1]


@pytest.mark.slow
def test_two_rows_compare_paired_from_their_records(files, tmp_path):
    """Two tiny runs on the same seeds: `significance.compare` recomputes each row's FID/IS from the arrays file beside
    its record and the difference is the records' difference; a row against itself is indistinguishable. (slow: two
    more end-to-end ImageNet runs, 134 s at load 5; the paired numerics and the arrays files are checked in the
    default suite by tests/test_uncertainty.py and test_fid_is_are_torch_fidelitys_and_recompute_from_the_kept_arrays)"""
    rows = {}
    for method in (("method=none",), ("method=fora", "cache.N=2")):
        path = prepare(make_cfg(*fid_overrides(files, tmp_path, *method))).record
        record = run(make_cfg(*fid_overrides(files, tmp_path, *method)))
        rows[record["method"]] = (path, record)
        assert record["metrics"]["fid"]["arrays"] == path.with_suffix(".arrays.npz").name
        assert load_arrays(path, "fid")["features"].shape == (10, 2048)
    (_, none), (_, fora) = rows["none"], rows["fora"]
    for name in ("fid", "is"):
        verdict = compare(rows["fora"], rows["none"], name)
        difference = fora["metrics"][name]["value"] - none["metrics"][name]["value"]
        assert verdict["difference"] == pytest.approx(difference, abs=1e-3, rel=1e-6)
        assert verdict["interval"][0] <= verdict["difference"] <= verdict["interval"][1]
        assert compare(rows["none"], rows["none"], name) == {"difference": 0.0, "interval": [0.0, 0.0], "p": 1.0,
                                                               "distinguishable": False}


def test_one_shard_or_two_give_the_same_samples_and_metrics(files, tmp_path):
    one = run(make_cfg(*fid_overrides(files, tmp_path / "one", "method=none")))
    first = run(make_cfg(*fid_overrides(files, tmp_path / "two", "method=none", "benchmark.shard=1",
                                        "benchmark.num_shards=2")))
    assert first["pending"] == 6  # shard 1 of 2 holds batches 1 and 3 of 5 (4 samples); shard 0 has not run
    second = run(make_cfg(*fid_overrides(files, tmp_path / "two", "method=none", "benchmark.shard=0",
                                         "benchmark.num_shards=2")))
    assert second["run_id"] == one["run_id"] and second["world_size"] == 2
    with np.load(one["samples"]["npz"]) as a, np.load(second["samples"]["npz"]) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert second["metrics"] == one["metrics"]


def _hashes(folder):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.glob("*.png"))}


def _run_py(*overrides):
    return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=REPO_DIR, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_killed_run_resumes_to_the_same_samples_and_metrics(files, tmp_path):
    slow = ("benchmark.samples_per_class=3", "benchmark.batch_size=1", "sampler.steps=40", "method=foca", "cache.N=3")
    whole = _run_py(*fid_overrides(files, tmp_path / "whole"), *slow)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    record_dir = prepare(make_cfg(*fid_overrides(files, tmp_path / "killed"), *slow)).samples.parent
    proc = _run_py(*fid_overrides(files, tmp_path / "killed"), *slow)
    deadline = time.time() + 120
    while time.time() < deadline and not list(record_dir.glob("*/0000[0-9][0-9].png")):
        time.sleep(0.005)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, as a preempted job
    proc.wait()
    (folder,) = record_dir.iterdir()
    before = _hashes(folder)
    assert 0 < len(before) < 30, f"the kill came too late to test a resume ({len(before)} of 30 samples)"
    assert not (folder / "DONE").exists()
    resumed = _run_py(*fid_overrides(files, tmp_path / "killed"), *slow)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    after = _hashes(folder)
    assert all(after[name] == before[name] for name in before)  # finished samples untouched (same bytes, mtime)
    (progress,) = folder.glob("shard-0-of-1.json")
    info = json.loads(progress.read_text())
    assert info["reused"] == len(before) and info["generated"] == 30 - len(before)
    (whole_folder,) = (tmp_path / "whole" / "samples" / "imagenet_fid").glob("*/foca/*")
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in _hashes(whole_folder).items()}
    records = [json.loads(p.read_text()) for d in ("whole", "killed")
               for p in (tmp_path / d / "imagenet_fid").glob("*/foca/*.json")]
    assert len(records) == 2
    assert records[0]["run_id"] == records[1]["run_id"] and records[0]["metrics"] == records[1]["metrics"]


def test_corrupt_sample_is_regenerated_not_used(files, tmp_path):
    record = run(make_cfg(*fid_overrides(files, tmp_path, "method=none")))
    folder = Path(record["samples"]["folder"])
    victim = folder / "000003.png"
    good = victim.read_bytes()
    victim.write_bytes(good[:40])
    (folder / "DONE").unlink()
    again = run(make_cfg(*fid_overrides(files, tmp_path, "method=none", "force=true")))
    assert victim.read_bytes() == good and again["metrics"] == record["metrics"]
    assert [p["generated"] for p in again["samples"]["shards"]] == [1]


def test_missing_reference_or_inception_stops_before_generation(files, tmp_path):
    with pytest.raises(MissingFileError, match="benchmark.reference_path is not set.*VIRTUAL_imagenet256"):
        run(make_cfg(*TINY, "benchmark=imagenet_fid", f"results_dir={tmp_path}", "profile.latency=false"))
    with pytest.raises(MissingFileError, match=r"Inception weights.*nope.pth does not exist.*benchmark.inception_path"):
        run(make_cfg(*fid_overrides(files, tmp_path), f"benchmark.inception_path={tmp_path}/nope.pth"))
    assert not (tmp_path / "samples").exists()
