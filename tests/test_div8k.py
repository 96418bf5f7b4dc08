"""benchmark=div8k: the crop/downsample protocol and PSNR/SSIM through the benchmark's own evaluation, against
closed forms (an exact output; a known uniform error) and a perturbation that must lower both; missing files."""

import math

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
