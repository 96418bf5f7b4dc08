"""benchmark=drawbench end to end: prompts from a CSV, a tiny random FLUX (with its tiny random VAE), CLIP score
through open_clip's loader from a local checkpoint, ImageReward through its own environment (slow), missing files."""

import csv
import os
import subprocess

import numpy as np
import pytest

from foca_bench import REPO_DIR
from foca_bench.benchmarks import MissingFileError, build_benchmark
from foca_bench.config import validate
from foca_bench.runner import run
from foca_bench.samples import Sample, SampleStore
from tests.conftest import TINY_FLUX, make_cfg
from tests.random_nets import colour_images, save_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def write_csv(path, prompts, categories):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Prompts", "Category"])
        w.writerows(zip(prompts, categories))
    return path


def clip_overrides(clip, prompts_csv, results):
    name, config, checkpoint = clip
    return ("benchmark=drawbench", f"benchmark.prompts_path={prompts_csv}", "benchmark.metrics=[clip_score]",
            f"benchmark.clip_model={name}", f"benchmark.clip_path={checkpoint}",
            f"benchmark.clip_config_path={config}", f"results_dir={results}")


def test_drawbench_on_tiny_flux_end_to_end(clip, tmp_path):
    prompts = write_csv(tmp_path / "db.csv", ["a red car", "a green dog", "two cats", "a blue sign"],
                        ["Colors", "Colors", "Counting", "Text"])
    record = run(make_cfg(*TINY_FLUX, *clip_overrides(clip, prompts, tmp_path), "benchmark.batch_size=2",
                          "sampler.steps=3", "method=fora", "cache.N=2", "profile.latency=false"))
    m = record["metrics"]
    assert set(m) == {"clip_score", "clip_score@Colors", "clip_score@Counting", "clip_score@Text"}
    assert all(np.isfinite(v["value"]) and v["higher_is_better"] for v in m.values())
    with np.load(record["samples"]["npz"]) as f:
        assert f["arr_0"].shape == (4, 64, 64, 3)
    by_category = (2 * m["clip_score@Colors"]["value"] + m["clip_score@Counting"]["value"]
                   + m["clip_score@Text"]["value"]) / 4  # 2 + 1 + 1 samples
    assert m["clip_score"]["value"] == pytest.approx(by_category)


def _colour_store(tmp_path, prompts_csv, clip, shuffle):
    cfg = make_cfg(*TINY_FLUX, *clip_overrides(clip, prompts_csv, tmp_path))
    validate(cfg)
    bench = build_benchmark(cfg.benchmark, cfg.model)
    images, _ = colour_images(1, seed=3)
    store = SampleStore(tmp_path / ("shuffled" if shuffle else "matched"), bench.samples())
    order = np.roll(np.arange(4), 1) if shuffle else np.arange(4)
    store.write(range(4), images[order])
    return bench, store


def test_mismatched_images_lower_clip_score(clip, tmp_path):
    _, prompts = colour_images(1)
    csv_path = write_csv(tmp_path / "colours.csv", prompts, ["Colors"] * 4)
    bench, matched = _colour_store(tmp_path, csv_path, clip, shuffle=False)
    _, shuffled = _colour_store(tmp_path, csv_path, clip, shuffle=True)
    good = bench.score(matched, None, "cpu")["clip_score"]["value"]
    bad = bench.score(shuffled, None, "cpu")["clip_score"]["value"]
    assert good > bad + 10


def test_missing_prompts_clip_weights_or_reward_env_stop_before_generation(clip, tmp_path):
    prompts = write_csv(tmp_path / "db.csv", ["a red car"], ["Colors"])
    base = (*TINY_FLUX, *clip_overrides(clip, prompts, tmp_path))
    with pytest.raises(MissingFileError, match="DrawBench prompt CSV: benchmark.prompts_path is not set"):
        run(make_cfg(*base, "benchmark.prompts_path=null"))
    with pytest.raises(MissingFileError, match="CLIP weights.*nope.bin does not exist.*benchmark.clip_path="):
        run(make_cfg(*base, f"benchmark.clip_path={tmp_path}/nope.bin"))
    with pytest.raises(MissingFileError, match="ImageReward weights.*benchmark.image_reward_path"):
        run(make_cfg(*base, "benchmark.metrics=[image_reward]"))
    with pytest.raises(ValueError, match="choose from"):
        run(make_cfg(*base, "benchmark.metrics=[imagereward]"))
    assert not (tmp_path / "samples").exists()


IR_PYTHON = REPO_DIR / ".envs" / "imagereward" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not IR_PYTHON.is_file(), reason="needs the ImageReward environment: make env-imagereward")
def test_image_reward_scores_noise_lower_through_its_own_environment(clip, tmp_path, monkeypatch):
    built = tmp_path / "ir"
    proc = subprocess.run([str(IR_PYTHON), "tests/build_image_reward.py", str(built)], cwd=REPO_DIR,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("HF_HOME", str(built / "hf"))
    images, prompts = colour_images(2, size=64, seed=7)  # not the images the head was fitted on
    csv_path = write_csv(tmp_path / "colours.csv", prompts, ["Colors"] * len(prompts))
    cfg = make_cfg(*TINY_FLUX, *clip_overrides(clip, csv_path, tmp_path), "benchmark.metrics=[image_reward]",
                   f"benchmark.image_reward_path={built / 'ImageReward.pt'}",
                   f"benchmark.image_reward_med_config_path={built / 'med_config.json'}")
    validate(cfg)
    bench = build_benchmark(cfg.benchmark, cfg.model)
    noisy = np.clip(images + np.random.default_rng(8).normal(0, 80, images.shape), 0, 255).astype(np.uint8)
    scores = {}
    for name, arr in (("clean", images), ("noisy", noisy)):
        store = SampleStore(tmp_path / name, [Sample(i, i, label=i, prompt=p) for i, p in enumerate(prompts)])
        store.write(range(len(arr)), arr)
        scores[name] = bench.score(store, None, "cpu")["image_reward"]["value"]
    assert np.isfinite(scores["clean"]) and scores["clean"] > scores["noisy"] + 0.5
    # a file that is not an ImageReward checkpoint is refused, not silently half-loaded (strict=False upstream)
    import torch

    torch.save({"mlp.layers.0.weight": torch.zeros(1)}, tmp_path / "bogus.pt")
    bench.reward = tmp_path / "bogus.pt"
    with pytest.raises(RuntimeError, match="ImageReward worker failed"):
        bench.score(store, None, "cpu")
