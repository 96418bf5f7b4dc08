"""One pipeline for every benchmark, honest records: a benchmark registered from this file alone runs through the
same `run` as the five shipped ones; run ids follow the contents of the input files, not their paths; a NaN is
null in strict JSON, named under `faults`, marked in the table and a non-zero exit; files get the user's umask;
record ids from before input hashing were pinned with that code and are found again by `foca_bench.migrate`."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.config_store import ConfigStore

import methods
from evaluation import metric
from foca_bench import REPO_DIR
from foca_bench.adapters import build_adapter
from foca_bench.benchmarks import BENCHMARKS, Benchmark, BenchmarkConfig, register_benchmark
from foca_bench.config import validate
from foca_bench.generation import generate
from foca_bench.migrate import legacy_run_id, legacy_run_ids, migrate
from foca_bench.names import METRIC_NAMES
from foca_bench.records import atomic_write_json, record_path
from foca_bench.results import load
from foca_bench.runner import prepare, run
from foca_bench.samples import Sample, to_uint8
from foca_bench.tables import FAULT, build_table
from tests.conftest import TINY, TINY_FLUX, make_cfg

QUICK = (*TINY, "sampler.steps=3", "profile.latency=false", "profile.baseline_steps=null")


@dataclass
class PixelsConfig(BenchmarkConfig):
    name: str = "pixels"
    samples_per_class: int = 2
    batch_size: int = 4
    poison: bool = False  # score NaN


@pytest.fixture
def pixels():
    """A sixth benchmark, defined and registered here only: 3 classes x K samples, scored by their mean pixel."""

    @register_benchmark("pixels", PixelsConfig)
    class Pixels(Benchmark):
        def all_samples(self):
            return [Sample(index=i, seed=self.cfg.seed + i, label=i % 3) for i in range(3 * self.cfg.samples_per_class)]

        def score(self, store, reference, device):
            with np.load(store.npz) as f:
                mean = float("nan") if self.cfg.poison else float(f["arr_0"].mean())
            return {"mean_pixel": metric(mean, higher_is_better=True)}

    ConfigStore.instance().store(group="benchmark", name="pixels", node=PixelsConfig)  # what its YAML would be
    yield Pixels
    del BENCHMARKS["pixels"]


def test_a_benchmark_registered_in_a_test_file_runs_through_the_one_pipeline(pixels, tmp_path):
    cfg = make_cfg(*QUICK, "benchmark=pixels", "method=fora", "cache.N=2", f"results_dir={tmp_path}")
    record = run(cfg)
    assert record["benchmark"] == "pixels" and record["samples"]["count"] == 6 and record["samples"]["full_steps"] == 2
    # the same samples generated directly: seeds `seed + i`, class i % 3, batches of 4 (conditions as arguments)
    c = make_cfg(*QUICK)
    validate(c)
    adapter = build_adapter(c.model, "cpu")
    batches = [([0, 1, 2, 3], {"class_labels": torch.tensor([0, 1, 2, 0])}),
               ([4, 5], {"class_labels": torch.tensor([1, 2])})]
    images = torch.cat(list(generate(adapter, methods.get("fora").config_class(N=2, warmup=1), c.sampler,
                                     batches)))
    expected = to_uint8(images)
    with np.load(record["samples"]["npz"]) as f:
        assert np.array_equal(f["arr_0"], expected) and f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert record["metrics"]["mean_pixel"]["value"] == pytest.approx(float(expected.mean()), abs=1e-9)
    assert run(cfg)["run_id"] == record["run_id"] and len(load(tmp_path)) == 1  # found, not rerun


def _strict(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_metric_is_null_in_strict_json_named_in_faults_and_marked_in_the_table(pixels, tmp_path, monkeypatch):
    record = run(make_cfg(*QUICK, "benchmark=pixels", "benchmark.poison=true", f"results_dir={tmp_path}",
                          "profile.flops=false"))
    (path,) = load(tmp_path)["record"]
    on_disk = _strict(Path(path).read_text())
    assert on_disk["metrics"]["mean_pixel"]["value"] is None
    assert on_disk["faults"] == record["faults"] == [{"field": "metrics.mean_pixel.value", "value": "nan"}]
    monkeypatch.setitem(METRIC_NAMES, "mean_pixel", "Mean pixel")  # tables show the metrics names.py names
    table = build_table(load(tmp_path))
    assert table.frame.loc[0, "Mean pixel ↑"] == FAULT


def test_non_finite_samples_exit_non_zero_with_a_strict_record(tmp_path):
    """Guidance 1e38 makes the tiny DiT's samples NaN: they are not scored, the record names them, run.py fails."""
    proc = subprocess.run([sys.executable, "run.py", *TINY, "sampler.guidance_scale=1e38", "sampler.steps=2",
                           "benchmark.samples_per_class=1", "benchmark.batch_size=10", "profile.flops=false",
                           "profile.latency=false", f"results_dir={tmp_path}"], cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3 and "non-finite" in proc.stderr
    (path,) = load(tmp_path)["record"]
    record = _strict(Path(path).read_text())
    assert record["faults"][0]["field"] == "samples" and record["faults"][0]["count"] == 10
    assert record["metrics"] == {}


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a").mkdir()
    files = {"csv": tmp_path / "a" / "db.csv", "clip": tmp_path / "a" / "clip.bin", "ref": tmp_path / "a" / "ref.npz",
             "inception": tmp_path / "a" / "inception.pth"}
    files["csv"].write_text("Prompts,Category\na red car,Colors\na cat,Animals\n")
    files["clip"].write_bytes(b"clip weights")
    np.savez(files["ref"], arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    files["inception"].write_bytes(b"inception weights")
    return files


def _drawbench(files, *overrides):
    return prepare(make_cfg(*TINY_FLUX, "benchmark=drawbench", "benchmark.metrics=[clip_score]",
                            f"benchmark.prompts_path={files['csv']}", f"benchmark.clip_path={files['clip']}", *overrides))


def _imagenet(files, *overrides):
    return prepare(make_cfg(*TINY, "benchmark=imagenet_fid", f"benchmark.reference_path={files['ref']}",
                            f"benchmark.inception_path={files['inception']}", *overrides))


def test_run_id_follows_the_contents_of_input_files_not_their_paths(inputs, tmp_path):
    draw, fid = _drawbench(inputs), _imagenet(inputs)
    assert draw.inputs["prompts"] == {"path": str(inputs["csv"]), "sha256": draw.identity["inputs"]["prompts"]}
    assert set(draw.inputs) == {"prompts", "clip"} and set(fid.inputs) == {"reference", "inception"}
    assert all(str(tmp_path) not in json.dumps(r.identity) for r in (draw, fid))  # paths stay out of the id
    (tmp_path / "b").mkdir()
    for key in inputs:  # the same bytes elsewhere: the same run
        (tmp_path / "b" / inputs[key].name).write_bytes(inputs[key].read_bytes())
    moved = {k: tmp_path / "b" / p.name for k, p in inputs.items()}
    assert _drawbench(moved).id == draw.id and _imagenet(moved).id == fid.id
    inputs["csv"].write_text("Prompts,Category\na red car,Colors\na dog,Animals\n")  # one prompt changed
    assert _drawbench(inputs).id != draw.id
    np.savez(inputs["ref"], arr_0=np.ones((2, 16, 16, 3), np.uint8))  # another reference batch
    changed = _imagenet(inputs)
    assert changed.id != fid.id and changed.samples != fid.samples  # and its samples' folder with it
    assert changed.inputs["reference"]["sha256"] != fid.inputs["reference"]["sha256"]


def test_files_are_written_atomically_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"ok": 1})
        os.umask(0o027)
        atomic_write_json(tmp_path / "s.json", {"ok": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "s.json"]  # no temporary file left
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "t.json", {"x": float("nan")})  # never a NaN on disk
    assert not (tmp_path / "t.json").exists()


# Run ids computed by the code before input hashing (main at 38a2d7b, `run_id(runner.identity(cfg, validate(cfg)))`)
LEGACY_IDS = {
    ("experiment=toy_dit", "+row/toy_dit=none"): "859b71962573",
    ("experiment=toy_dit", "+row/toy_dit=foca_n5"): "585bc0e9686f",
    ("experiment=toy_dit", "+row/toy_dit=bdf2_only_n3"): "0dc9d53b7546",
    ("experiment=toy_dit_zoo", "+row/toy_dit_zoo=teacache_l01"): "d4c0ed76c536",
    ("experiment=toy_dit_zoo", "+row/toy_dit_zoo=diffusers_magcache_t006"): "d4458166fb6e",
    ("experiment=table3_dit", "+row/table3_dit=foca_n5"): "564b4a7f131d",
    ("experiment=table3_dit", "+row/table3_dit=none_25"): "d43d4afd8cb6",
    ("experiment=table1_flux", "+row/table1_flux=taylorseer_n5"): "5b7e47881d79",
    ("experiment=table2_hunyuan", "+row/table2_hunyuan=toca_n5"): "bb3bec8951b0",
    ("model=flux", "method=teacache", "model.weights=random", "profile.benchmark=false"): "f94733d449f6",
    ("model=hunyuan_video", "method=teacache", "model.weights=random", "profile.benchmark=false",
     "model.size=tiny"): "6857b319ede8",
    ("model.size=tiny", "method=foca", "cache.N=3", "sampler.steps=8"): "47d244dd49df",
    ("method=none", "cache.N=5"): "e981c5f1ffc7",
}


def test_record_ids_of_before_input_hashing_are_reproduced(inputs):
    for overrides, old in LEGACY_IDS.items():  # the tables' experiments need their files only to run, not here
        cfg = make_cfg(*overrides)
        assert legacy_run_id(cfg, validate(cfg)) == old, overrides
    # benchmarks that read files: the old ids ignored them (and their paths)
    fid = _imagenet(inputs, "benchmark.samples_per_class=1", "method=fora", "cache.N=2")
    assert legacy_run_id(fid.cfg, fid.cache) == "81f91edc1abe"
    draw = _drawbench(inputs, "method=fora", "cache.N=2")
    assert legacy_run_id(draw.cfg, draw.cache) == "80ed38db3137"
    # the ids of main while they held model.offload=none and the memory budget (4a6176f) are the second candidate
    cfg = make_cfg("method=none")
    assert legacy_run_ids(cfg, validate(cfg)) == ["e981c5f1ffc7", "f740270fe407"]


def test_migrate_moves_a_finished_record_and_its_samples_to_the_new_id(tmp_path):
    overrides = ("model.size=tiny", "method=foca", "cache.N=3", "sampler.steps=8", f"results_dir={tmp_path}")
    old = record_path(tmp_path, "toy_fid", "toy_dit", "foca", "47d244dd49df")
    folder = tmp_path / "samples" / "toy_fid" / "toy_dit" / "foca" / "47d244dd49df"
    folder.mkdir(parents=True)
    (folder / "samples.npz").write_bytes(b"npz")
    atomic_write_json(old, {"run_id": "47d244dd49df", "benchmark": "toy_fid", "model": "toy_dit", "method": "foca",
                            "config": {}, "profile": {"flops": 1.0}, "metrics": {"fid": {"value": 3.0}},
                            "samples": {"folder": str(folder), "npz": str(folder / "samples.npz")}})
    message = migrate(make_cfg(*overrides))
    new = prepare(make_cfg(*overrides))
    assert message == f"moved {old} -> {new.record}" and not old.exists() and not folder.exists()
    record = run(make_cfg(*overrides))  # found: nothing is generated
    assert record["run_id"] == new.id != "47d244dd49df" and record["migrated_from"] == "47d244dd49df"
    assert record["config"] == new.identity and record["metrics"] == {"fid": {"value": 3.0}}
    assert Path(record["samples"]["npz"]).read_bytes() == b"npz" and Path(record["samples"]["folder"]) == new.samples
    assert migrate(make_cfg(*overrides)).endswith("already there")
