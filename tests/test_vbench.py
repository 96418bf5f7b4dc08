"""benchmark=vbench end to end: a tiny random HunyuanVideo writes the videos VBench expects, and the real vbench
package (in `.envs/vbench`) scores them on temporal flickering (no network) and background consistency (a random
CLIP saved in OpenAI's file format and opened by VBench's own `clip.load`); per-frame noise lowers both. Plus the
video store, the total-score formula against a hand computation, and the preflight errors."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from evaluation.vbench_score import DIMENSIONS, NORMALIZE, env_python, package_file, run_vbench, total_score
from foca_bench.benchmarks import MissingFileError
from foca_bench.runner import run
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


@needs_env
def test_vbench_end_to_end_and_noise_lowers_both_dimensions(vbench_files, tmp_path):
    record = run(make_cfg(*_overrides(vbench_files, tmp_path)))
    m = record["metrics"]
    assert record["samples"]["count"] == 8 and record["samples"]["npz"] is None  # 4 prompts x 2 videos
    for d in DIMS:
        assert np.isfinite(m[d]["value"]) and 0 < m[d]["value"] <= 1, (d, m[d])
    assert m["vbench"]["value"] is None  # the total needs all 16 dimensions
    videos = sorted(p.name for p in (tmp_path / "samples").rglob("*.mp4"))
    assert videos[0].endswith("-0.mp4") and "In a still frame, a stop sign-1.mp4" in videos

    # the same videos with independent noise on every frame: more flicker, less frame-to-frame similarity
    folder = next((tmp_path / "samples").rglob("videos"))
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for path in folder.glob("*.mp4"):
        video = read_mp4(path).astype(np.float32)
        write_mp4(noisy / path.name, np.clip(video + rng.normal(0, 40, video.shape), 0, 255).astype(np.uint8), 24)
    info = json.loads((vbench_files / "prompts.json").read_text())
    for entry in info:
        entry["video_list"] = [str(noisy / f"{entry['prompt_en']}-{k}.mp4") for k in range(2)]
    perturbed = run_vbench(info, DIMS, tmp_path / "work", vbench_files / "weights")
    for d in DIMS:
        assert perturbed[d]["score"] < m[d]["value"], (d, perturbed[d]["score"], m[d]["value"])
        REPORTED.setdefault("VBench on tiny random HunyuanVideo videos: clean -> per-frame noise (test_vbench)", {})[
            d] = f"{m[d]['value']:.4f} -> {perturbed[d]['score']:.4f}"


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
