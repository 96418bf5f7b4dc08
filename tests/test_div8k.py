"""benchmark=div8k: the crop/downsample protocol and PSNR/SSIM through the benchmark's own evaluation, against
closed forms (an exact output; a known uniform error) and a perturbation that must lower both; missing files."""

import math

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foca_bench.benchmarks import MissingFileError, build_benchmark
from foca_bench.benchmarks.div8k import centre_crop, downsample
from foca_bench.config import validate
from foca_bench.runner import run
from foca_bench.samples import SampleStore
from tests.conftest import TINY, make_cfg


@pytest.fixture
def bench(tmp_path):
    rng = np.random.default_rng(0)
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in range(3):  # smooth images larger than the crop, of different sizes
        h, w = 80 + 8 * i, 72 + 4 * i
        yy, xx = np.mgrid[0:h, 0:w]
        img = 127 + 60 * np.sin(xx / (5 + i))[..., None] * np.cos(yy / 7)[..., None] + rng.normal(0, 3, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(gt / f"{i:04d}.png")
    cfg = make_cfg(*TINY, "benchmark=div8k", f"benchmark.gt_path={gt}", "benchmark.hr_size=64", "benchmark.scale=4",
                   f"results_dir={tmp_path}")
    validate(cfg)
    return build_benchmark(cfg.benchmark, cfg.model)


def _score(bench, tmp_path, name, outputs):
    store = SampleStore(tmp_path / name, bench.samples())
    store.write(range(len(outputs)), np.stack(outputs))
    return {k: v["value"] for k, v in bench.score(store, None, "cpu").items()}


def test_protocol_crops_and_downsamples(bench):
    s = bench.samples()[1]
    hr = centre_crop(s.condition, 64)
    with Image.open(s.condition) as im:
        full = np.asarray(im)
    top, left = (full.shape[0] - 64) // 2, (full.shape[1] - 64) // 2
    assert np.array_equal(hr, full[top : top + 64, left : left + 64])
    assert bench.low_res(s).shape == (16, 16, 3) and downsample(hr, 4).dtype == np.uint8


def test_psnr_ssim_closed_forms_and_perturbation(bench, tmp_path):
    gts = [centre_crop(s.condition, 64) for s in bench.samples()]
    exact = _score(bench, tmp_path, "exact", gts)
    assert exact["psnr"] == 100.0 and exact["ssim"] == pytest.approx(1.0)
    # a uniform error of 5 grey levels (no clipping at these values): PSNR = 10 log10(1 / (5/255)^2)
    shifted = _score(bench, tmp_path, "shifted", [np.clip(g.astype(int) + 5, 0, 255).astype(np.uint8) for g in gts])
    assert all(g.max() <= 250 for g in gts) and shifted["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-5)
    # bicubic upsampling of the protocol's input, then the same with noise: noise must lower both scores
    up = [np.asarray(Image.fromarray(bench.low_res(s)).resize((64, 64), Image.BICUBIC)) for s in bench.samples()]
    rng = np.random.default_rng(1)
    noisy = [np.clip(u + rng.normal(0, 25, u.shape), 0, 255).astype(np.uint8) for u in up]
    clean_s, noisy_s = _score(bench, tmp_path, "bicubic", up), _score(bench, tmp_path, "noisy", noisy)
    assert 15 < clean_s["psnr"] < 100 and noisy_s["psnr"] < clean_s["psnr"] - 1 and noisy_s["ssim"] < clean_s["ssim"]


def test_missing_ground_truth_or_sr_model_stops_before_generation(bench, tmp_path):
    with pytest.raises(MissingFileError, match="DIV8K ground truth: benchmark.gt_path is not set"):
        run(make_cfg(*TINY, "benchmark=div8k", f"results_dir={tmp_path}"))
    with pytest.raises(ValueError, match="needs a super-resolution model.*inf_dit"):
        run(make_cfg(*TINY, "benchmark=div8k", f"benchmark.gt_path={tmp_path}/gt", "benchmark.hr_size=64",
                     f"results_dir={tmp_path}", "profile.latency=false", "profile.flops=false"))
    assert not list(tmp_path.glob("samples/**/*.png"))


# -- Inf-DiT end to end on images that ship with scikit-image ---------------------------------------------------
@pytest.fixture(scope="module")
def skimage_gt(tmp_path_factory):
    from skimage import data

    gt = tmp_path_factory.mktemp("div8k_gt")
    for name in ("astronaut", "chelsea", "coffee"):  # 512x512, 300x451, 400x600
        Image.fromarray(getattr(data, name)()).save(gt / f"{name}.png")
    return gt


def _inf_dit(gt, results, *extra):
    return make_cfg("model=inf_dit", "model.size=tiny", "benchmark=div8k", f"benchmark.gt_path={gt}",
                    "benchmark.hr_size=64", "sampler.steps=3", "profile.baseline_steps=3", "profile.repeats=1",
                    "profile.warmup=0", "profile.batch_size=1", f"results_dir={results}", *extra)


def test_inf_dit_super_resolves_div8k_end_to_end(skimage_gt, tmp_path):
    """model=inf_dit (tiny, random weights) x FoCa on bundled images: the record has PSNR/SSIM against the crops,
    FLOPs and latency against method=none, the cache's bytes; the samples are the model's 64x64 outputs."""
    record = run(_inf_dit(skimage_gt, tmp_path, "method=foca", "cache.N=2", "cache.warmup=0"))
    metrics, profile = record["metrics"], record["profile"]
    assert 0 < metrics["psnr"]["value"] < 60 and -1 < metrics["ssim"]["value"] < 1
    assert profile["flops_speedup"] > 1 and profile["latency_s"] > 0 and record["memory"]["cache_bytes_peak"] > 0
    assert record["samples"]["count"] == 3 and record["samples"]["full_steps"] == 3  # of 5 evaluations, N=2
    folder = Path(record["samples"]["folder"])  # results/samples/div8k/inf_dit/foca/<samples key>
    assert folder.parent == tmp_path / "samples" / "div8k" / "inf_dit" / "foca"
    with Image.open(folder / "000000.png") as im:
        assert im.size == (64, 64)


def test_inf_dit_shards_give_the_one_shard_record(skimage_gt, tmp_path):
    one = run(_inf_dit(skimage_gt, tmp_path / "one", "method=none", "profile.latency=false"))
    first = run(_inf_dit(skimage_gt, tmp_path / "two", "method=none", "profile.latency=false", "benchmark.shard=1",
                         "benchmark.num_shards=2"))
    assert first["pending"] == 2  # shard 1 of 2 has sample 1; samples 0 and 2 are shard 0's
    second = run(_inf_dit(skimage_gt, tmp_path / "two", "method=none", "profile.latency=false", "benchmark.shard=0",
                          "benchmark.num_shards=2"))
    assert second["metrics"] == one["metrics"] and second["world_size"] == 2


def test_resolution_must_match_the_crop(skimage_gt, tmp_path):
    with pytest.raises(ValueError, match="benchmark.hr_size=128 but model.resolution=64"):
        run(_inf_dit(skimage_gt, tmp_path, "method=none", "benchmark.hr_size=128", "profile.latency=false"))
