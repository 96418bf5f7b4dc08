"""benchmark=vbench end to end: a tiny random HunyuanVideo writes the videos VBench expects, and the real vbench
package (in `.envs/vbench`) scores them on temporal flickering (no network) and background consistency (a random
CLIP saved in OpenAI's file format and opened by VBench's own `clip.load`); per-frame noise lowers both. The
records keep each video's score in sample order (temporal flickering recomputed from the frames) with bootstrap
intervals, and two runs on the same seeds compare paired. Plus the video store, the total-score formula against a
hand computation, the total's interval over videos, and the preflight errors."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from evaluation.uncertainty import interval, paired
from evaluation.vbench_score import (DIMENSIONS, NORMALIZE, QUALITY, SEMANTIC, env_python, package_file, per_video,
                                     run_vbench, total_score)
from foca_bench.benchmarks import MissingFileError
from foca_bench.benchmarks.vbench import summarize
from foca_bench.records import record_files
from foca_bench.runner import run
from foca_bench.significance import compare, externalize, load_arrays
from foca_bench.samples import Sample, VideoStore, prompt_stems, read_mp4, write_mp4
from tests.conftest import REPORTED, TINY_FLUX, TINY_HUNYUAN, make_cfg

REPO_DIR = Path(__file__).resolve().parent.parent

needs_env = pytest.mark.skipif(not env_python().is_file(), reason="needs `make env-vbench` (make test builds it)")
DIMS = ["temporal_flickering", "background_consistency"]


@pytest.fixture(scope="module")
def vbench_files(tmp_path_factory):
    """VBench's weight folder with the random CLIP, and a prompt list: the first two prompts of each dimension
    tested, as entries of VBench's own full-info file."""
    root = tmp_path_factory.mktemp("vbench")
    subprocess.run([str(env_python()), "-m", "tests.build_vbench_weights", str(root / "weights")], check=True,
                   cwd=REPO_DIR, capture_output=True)
    info = json.loads(package_file("VBench_full_info.json").read_text())
    subset = [e for d in DIMS for e in [e for e in info if e["dimension"] == [d] or d in e["dimension"]][:2]]
    (root / "prompts.json").write_text(json.dumps(subset))
    return root


def _overrides(files, tmp_path, *more, model=TINY_HUNYUAN):
    return (*model, "benchmark=vbench", f"benchmark.dimensions=[{','.join(DIMS)}]",
            f"benchmark.prompts_path={files / 'prompts.json'}", f"benchmark.vbench_cache_path={files / 'weights'}",
            "benchmark.videos_per_prompt=2", "benchmark.batch_size=2", "sampler.steps=6", "method=foca",
            "cache.N=2", "profile.latency=false", f"results_dir={tmp_path}", *more)


def _flickering(path: Path) -> float:
    """VBench's temporal flickering of one video, from its frames: 1 - mean |frame t+1 - frame t| / 255."""
    frames = read_mp4(path).astype(np.float64)  # (F, H, W, 3)
    return float((255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0)


@needs_env
def test_vbench_end_to_end_per_video_scores_pair_up_and_noise_lowers_both(vbench_files, tmp_path):
    run(make_cfg(*_overrides(vbench_files, tmp_path)))
    run(make_cfg(*_overrides(vbench_files, tmp_path, "method=none")))  # the baseline, on the same seeds
    rows = {r["method"]: (p, r) for p in record_files(tmp_path) for r in [json.loads(p.read_text())]}
    record = rows["foca"][1]
    m = record["metrics"]
    assert record["samples"]["count"] == 8 and record["samples"]["npz"] is None  # 4 prompts x 2 videos
    for d in DIMS:
        assert np.isfinite(m[d]["value"]) and 0 < m[d]["value"] <= 1, (d, m[d])
    assert m["vbench"]["value"] is None and "interval" not in m["vbench"]  # the total needs all 16 dimensions
    folder = Path(record["samples"]["folder"]) / "videos"
    videos = sorted(p.name for p in folder.glob("*.mp4"))
    assert videos[0].endswith("-0.mp4") and "In a still frame, a stop sign-1.mp4" in videos

    # each dimension's per-video values: its prompts' videos in sample order, their mean VBench's score
    info = json.loads((vbench_files / "prompts.json").read_text())
    prompts = list(dict.fromkeys(e["prompt_en"] for e in info))
    tagged = {d: [f"{p}-{k}.mp4" for p in prompts for k in range(2)
                  if any(d in e["dimension"] for e in info if e["prompt_en"] == p)] for d in DIMS}
    for d in DIMS:
        x = m[d]["per_sample"]
        assert len(x) == len(tagged[d]) == 4 and m[d]["statistic"] == "mean"
        assert np.mean(x) == pytest.approx(m[d]["value"], rel=1e-12, abs=1e-15)
        assert tuple(m[d]["interval"]) == interval(x) and m[d]["interval"][0] <= m[d]["value"] <= m[d]["interval"][1]
    flicker = [_flickering(folder / name) for name in tagged["temporal_flickering"]]
    assert m["temporal_flickering"]["per_sample"] == pytest.approx(flicker, rel=1e-5)
    for d in DIMS:  # row against the baseline: the paired difference of the same videos' scores
        verdict = compare(rows["foca"], rows["none"], d)
        base = rows["none"][1]["metrics"][d]
        assert verdict["difference"] == pytest.approx(m[d]["value"] - base["value"], abs=1e-12)
        assert verdict["interval"][0] <= verdict["difference"] <= verdict["interval"][1]
        REPORTED.setdefault("VBench on tiny random HunyuanVideo: FoCa N=2 minus DDIM, 6 steps, 8 videos, paired "
                            "95% interval (test_vbench)", {})[d] = (
            f"{verdict['difference']:+.2e} [{verdict['interval'][0]:+.2e}, {verdict['interval'][1]:+.2e}], "
            f"p={verdict['p']:.2f}")

    # the same videos with independent noise on every frame: more flicker, less frame-to-frame similarity
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(folder.glob("*.mp4")):
        video = read_mp4(path).astype(np.float32)
        write_mp4(noisy / path.name, np.clip(video + rng.normal(0, 40, video.shape), 0, 255).astype(np.uint8), 24)
    for entry in info:
        entry["video_list"] = [str(noisy / f"{entry['prompt_en']}-{k}.mp4") for k in range(2)]
    perturbed = run_vbench(info, DIMS, tmp_path / "work", vbench_files / "weights")
    for d in DIMS:
        assert perturbed[d]["score"] < m[d]["value"], (d, perturbed[d]["score"], m[d]["value"])
        REPORTED.setdefault("VBench on tiny random HunyuanVideo videos: clean -> per-frame noise (test_vbench)", {})[
            d] = f"{m[d]['value']:.4f} -> {perturbed[d]['score']:.4f}"
    noisy_flicker = [perturbed["temporal_flickering"]["videos"][str(noisy / name)]
                     for name in tagged["temporal_flickering"]]
    verdict = paired(noisy_flicker, m["temporal_flickering"]["per_sample"])
    assert verdict["distinguishable"] and verdict["interval"][1] < 0


@needs_env
def test_vbenchs_readers_decode_our_videos_to_the_exact_frames(tmp_path):
    video = np.random.default_rng(1).integers(0, 256, (9, 24, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "v.mp4", video, 24)
    np.save(tmp_path / "v.npy", video)
    code = ("import sys, numpy as np, cv2, decord; v = np.load(sys.argv[2]);"
            "a = decord.VideoReader(sys.argv[1]).get_batch(list(range(len(v)))).asnumpy();"
            "c = cv2.VideoCapture(sys.argv[1]); f = [c.read()[1][..., ::-1] for _ in range(len(v))];"
            "assert (a == v).all() and (np.stack(f) == v).all(); print('exact')")
    out = subprocess.run([str(env_python()), "-c", code, str(tmp_path / "v.mp4"), str(tmp_path / "v.npy")],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "exact", out.stderr[-2000:]
    assert np.array_equal(read_mp4(tmp_path / "v.mp4"), video)


def test_video_store_names_files_as_vbench_expects_and_catches_truncation(tmp_path):
    samples = [Sample(index=i, seed=i, label=i // 2, prompt=["a cat", "a dog"][i // 2]) for i in range(4)]
    store = VideoStore(tmp_path, samples, per_prompt=2, fps=8, shape=(3, 16, 16, 3))
    videos = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16, 3), dtype=np.uint8)
    assert store.write(range(4), videos) == 4
    assert [store.path(s).name for s in samples] == ["a cat-0.mp4", "a cat-1.mp4", "a dog-0.mp4", "a dog-1.mp4"]
    assert store.missing() == []
    data = store.path(samples[1]).read_bytes()
    store.path(samples[1]).write_bytes(data[: len(data) // 2])
    store.path(samples[2]).unlink()
    assert store.missing() == [1, 2]
    store.write(range(4), videos, only={1, 2})
    store.pack()
    assert store.complete() and not store.npz.exists() and json.loads(store.done.read_text())["count"] == 4


def test_file_names_keep_vbenchs_where_safe_and_rename_the_rest_inside_the_folder(tmp_path):
    long = "a prompt " * 34  # 306 characters
    odd = ["../../../tmp/x", "/tmp/x", "a/b", long, "a cat", ".hidden", "what? yes: <this>", "tab\there"]
    plain = ["A cat", "a dog", "In a still frame, a stop sign", "rock-carved façades (Petra), it's old."]
    stems = prompt_stems(plain + odd)
    assert [stems[p] for p in plain] == plain  # VBench's expected names
    renamed = [stems[p] for p in odd]
    assert len(set(renamed)) == len(odd) and all(s not in odd for s in renamed)
    assert stems == prompt_stems(plain + odd)  # deterministic
    for stem in renamed:  # one safe path component each, on every filesystem
        assert not set(stem) & set('/\\<>:"|?*') and stem.isprintable() and stem[0] not in ". "
        assert len(f"{stem}-4.mp4".encode()) <= 255 and Path(stem).name == stem
    assert stems["../../../tmp/x"].startswith("_.._.._tmp_x~") and stems[long].startswith("a prompt a prompt")
    samples = [Sample(index=i, seed=i, label=i, prompt=p) for i, p in enumerate(plain + odd)]
    store = VideoStore(tmp_path / "run", samples, per_prompt=1, fps=8, shape=(3, 16, 16, 3))
    store.write(range(len(samples)), np.zeros((len(samples), 3, 16, 16, 3), np.uint8))
    store.pack()
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.parent == store.videos for p in files if p.suffix == ".mp4") and len(files) == len(samples) + 2
    manifest = json.loads(store.manifest.read_text())  # the prompt_file of VBench's custom mode
    assert manifest == {store.path(s).name: s.prompt for s in samples}
    with pytest.raises(ValueError, match="prompt 1 is ''"):
        prompt_stems(["a", ""])


@needs_env
def test_every_vbench_prompt_keeps_its_name_but_a_case_twin():
    prompts = [e["prompt_en"] for e in json.loads(package_file("VBench_full_info.json").read_text())]
    stems = prompt_stems(prompts)
    assert [p for p in stems if stems[p] != p] == ["A fantasy landscape"]  # after "a fantasy landscape"


@pytest.mark.slow
@needs_env
def test_prompts_that_are_no_file_names_are_generated_inside_the_run_folder_and_scored(vbench_files, tmp_path):
    """A custom VBench prompt list with `../../../tmp/x`, `/tmp/x`, `a/b` and a 308-character prompt: a tiny
    HunyuanVideo run writes its four videos inside its own videos/ folder (renamed) and VBench scores them through
    the listed paths (~1 min, mostly VBench's start)."""
    prompts = ["../../../tmp/foca_escape", "/tmp/foca_escape_abs", "a/b", "a long prompt " * 22]
    info = [{"prompt_en": p, "dimension": ["temporal_flickering"]} for p in prompts]
    (tmp_path / "custom.json").write_text(json.dumps(info))
    results = tmp_path / "results"
    record = run(make_cfg(*_overrides(vbench_files, results, f"benchmark.prompts_path={tmp_path / 'custom.json'}",
                                      "benchmark.dimensions=[temporal_flickering]", "benchmark.videos_per_prompt=1",
                                      "sampler.steps=2")))
    assert 0 < record["metrics"]["temporal_flickering"]["value"] <= 1
    videos = [p for p in results.rglob("*.mp4")]
    assert len(videos) == 4 and all(p.parent.name == "videos" for p in videos)
    assert not list(Path("/tmp").glob("foca_escape*")) and not (results.parent / "b-0.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.json", "results"]


def test_total_score_is_vbenchs_weighted_normalised_mean():
    raw = {d: 0.5 for d in DIMENSIONS}
    scores = total_score(raw)
    normed = {d: (0.5 - lo) / (hi - lo) for d, (lo, hi) in NORMALIZE.items()}
    quality = [normed[d] for d in ("subject_consistency", "background_consistency", "temporal_flickering",
                                   "motion_smoothness", "aesthetic_quality", "imaging_quality")]
    q = (sum(quality) + 0.5 * normed["dynamic_degree"]) / 6.5
    s = sum(normed[d] for d in DIMENSIONS[7:]) / 9
    assert scores["vbench_quality"] == pytest.approx(100 * q)
    assert scores["vbench_semantic"] == pytest.approx(100 * s)
    assert scores["vbench"] == pytest.approx(100 * (4 * q + s) / 5)
    assert total_score({d: 0.5 for d in DIMENSIONS[:7]})["vbench"] is None


def test_per_video_values_are_in_their_aggregates_units():
    """Per-video lists as vbench 0.1.5 writes them: imaging_quality's MUSIQ score is 0-100 and its aggregate divides
    the videos' mean by 100 (vbench/imaging_quality.py, technical_quality); human_action's value is a bool and its
    aggregate correct / videos (vbench/human_action.py)."""
    musiq = [{"video_path": f"v{i}.mp4", "video_results": s} for i, s in enumerate([52.5, 61.0, 38.25])]
    aggregate = sum(v["video_results"] for v in musiq) / len(musiq) / 100.0
    assert np.mean(list(per_video("imaging_quality", musiq).values())) == pytest.approx(aggregate, rel=1e-12)
    flags = [{"video_path": "a", "video_results": True, "cor_num_per_video": 1},
             {"video_path": "b", "video_results": False, "cor_num_per_video": 0}]
    assert per_video("human_action", flags) == {"a": 1.0, "b": 0.0}


def _vbench_record(values: np.ndarray, tagged: np.ndarray, path: Path) -> tuple[Path, dict]:
    """A record of per-video values (n, 16) in DIMENSIONS' order, each dimension's score the mean over the videos
    VBench lists for it (NaN: not listed), with its arrays beside it as the runner writes them."""
    scores = {d: float(np.nanmean(values[:, j])) for j, d in enumerate(DIMENSIONS)}
    record = {"benchmark": "vbench", "samples": {"count": len(values), "seeds": [0, len(values) - 1]},
              "metrics": summarize(scores, values, tagged, list(DIMENSIONS))}
    externalize(record, path)
    return path, record


def test_totals_get_an_interval_over_videos_and_compare_paired(tmp_path):
    """Each dimension scores its own prompts' videos, so no video has a total: the total's interval resamples the
    videos (rows of every dimension's values at once) and recomputes VBench's weighted combination. Its half-width
    halves when the same videos count 4 times (a bootstrap over videos), and a row lowered by 0.02 on every video
    (plus noise) is told apart from its baseline while an identical one is not."""
    rng = np.random.default_rng(0)
    n, color = 60, DIMENSIONS.index("color")
    tagged = rng.random((n, 16)) < 0.4
    tagged[:8] = True
    values = np.where(tagged, rng.uniform(0.2, 0.9, (n, 16)), np.nan)
    values[tagged[:, color] & (rng.random(n) < 0.3), color] = np.nan  # color lists only videos with its object
    _, record = _vbench_record(values, tagged, tmp_path / "base.json")
    m = record["metrics"]
    for j, d in enumerate(DIMENSIONS):  # its tagged videos in sample order, null where VBench lists none
        assert m[d]["per_sample"] == [None if np.isnan(v) else v for v in values[tagged[:, j], j]]
    assert m["color"]["statistic"] == "nanmean" and None in m["color"]["per_sample"]
    for name, width in (("vbench", 16), ("vbench_quality", len(QUALITY)), ("vbench_semantic", len(SEMANTIC))):
        lo, hi = m[name]["interval"]
        assert lo < m[name]["value"] < hi and m[name]["statistic"] == name
        assert load_arrays(tmp_path / "base.json", name)["values"].shape == (n, width)  # beside the record
    wide = m["vbench"]["interval"][1] - m["vbench"]["interval"][0]
    _, fourfold = _vbench_record(np.tile(values, (4, 1)), np.tile(tagged, (4, 1)), tmp_path / "fourfold.json")
    narrow = fourfold["metrics"]["vbench"]["interval"][1] - fourfold["metrics"]["vbench"]["interval"][0]
    assert fourfold["metrics"]["vbench"]["value"] == pytest.approx(m["vbench"]["value"], rel=1e-12)
    assert narrow / wide == pytest.approx(0.5, rel=0.2)

    base = (tmp_path / "base.json", record)
    same = _vbench_record(values.copy(), tagged, tmp_path / "same.json")
    lower = _vbench_record(values - 0.02 + rng.normal(0, 0.01, values.shape), tagged, tmp_path / "lower.json")
    assert not compare(same, base, "vbench")["distinguishable"]
    verdict = compare(lower, base, "vbench")
    assert verdict["distinguishable"] and verdict["difference"] < 0
    assert verdict["difference"] == pytest.approx(lower[1]["metrics"]["vbench"]["value"] - m["vbench"]["value"])
    assert compare(lower, base, "color")["distinguishable"]  # nanmean, paired over the same videos

    # a score the per-video values do not give: no interval for it, nor for the groups it is part of
    scores = {d: float(np.nanmean(values[:, j])) for j, d in enumerate(DIMENSIONS)}
    off = summarize({**scores, "scene": scores["scene"] + 0.01}, values, tagged, list(DIMENSIONS))
    assert [k for k in ("scene", "vbench", "vbench_semantic", "vbench_quality") if "interval" in off[k]] == [
        "vbench_quality"]


@needs_env
def test_missing_weights_an_image_model_or_an_unreadable_size_stop_before_generation(vbench_files, tmp_path):
    with pytest.raises(MissingFileError, match="clip_model/ViT-B-32.pt"):
        run(make_cfg(*_overrides(vbench_files, tmp_path, f"benchmark.vbench_cache_path={tmp_path / 'none'}")))
    assert not (tmp_path / "samples").exists()
    with pytest.raises(ValueError, match="text-to-video"):
        run(make_cfg(*_overrides(vbench_files, tmp_path, model=TINY_FLUX)))
    with pytest.raises(ValueError, match="cannot decode 32x48 frames"):  # a width VBench's decord fails on
        run(make_cfg(*_overrides(vbench_files, tmp_path, "model.tiny.width=48")))
    assert not (tmp_path / "samples").exists() and not list(tmp_path.rglob("*.json"))
