"""`benchmark=vbench`: VBench (Huang et al., arXiv:2311.17982) on a text-to-video model, the paper's Table 2.

The prompts are VBench's own full-info list (`VBench_full_info.json`, shipped in the vbench package), in file
order, keeping each prompt once and only the prompts tagged with a requested dimension (all 16: 944 prompts).
Sample i is video `i % videos_per_prompt` of prompt `i // videos_per_prompt`, seed `seed + i`, written as
`videos/<prompt>-<k>.mp4` (lossless RGB H.264), the names VBench's standard mode looks for, or, for a prompt that
is no safe file name (a custom list's `../x`, 300 characters), a renamed stem (`samples.prompt_stems`); the folder's
`prompts.json` maps every file to its prompt, and the evaluator hands VBench each prompt's files. The evaluator runs in
its own environment (`evaluation/vbench_score.py`); the record keeps each dimension's raw score and VBench's
quality, semantic and total scores (percent) when every dimension of a group was evaluated, each with its bootstrap
interval over videos and what recomputes it (`summarize`; docs/statistics.md).
"""

import json
import logging
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from evaluation import metric
from evaluation.uncertainty import STATISTICS, set_interval, summary
from evaluation.vbench_score import (DIMENSIONS, GROUPS, STATISTIC, WEIGHTS, cache_dir, env_python, group_score,
                                     package_file, run_vbench, total_score)
from foca_bench.benchmarks import (LOCAL, Benchmark, FileBenchmarkConfig, MissingFileError, register_benchmark,
                                   require_file)
from foca_bench.errors import CorruptFileError
from foca_bench.identity import input_item
from foca_bench.samples import Sample, SampleStore, VideoStore, write_mp4

log = logging.getLogger("foca_bench")


def check_readable(height: int, width: int, env_dir: Any = None) -> None:
    """Writes a 3-frame video of the model's frame size and has VBench's reader (decord, in the VBench environment)
    decode it: decord fails on some frame widths (16 and 48 among them), which would otherwise surface only when
    the finished videos are scored."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.mp4"
        write_mp4(path, np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8), 8)
        code = ("import sys, decord; v = decord.VideoReader(sys.argv[1]);"
                "print(tuple(v.get_batch([0, 1, 2]).asnumpy().shape))")
        out = subprocess.run([str(env_python(env_dir)), "-c", code, str(path)], capture_output=True, text=True)
    if out.returncode != 0 or out.stdout.strip() != str((3, height, width, 3)):
        raise ValueError(f"VBench's video reader (decord) cannot decode {height}x{width} frames (a decord bug for "
                         "some widths, e.g. 16 and 48): choose another model.width (nothing was generated). "
                         f"decord said: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.stdout}")


def read_full_info(path: Path) -> list[dict]:
    """The entries of a VBench full-info file, checked before anything is generated: a JSON list of objects, each
    with a non-empty `prompt_en` string and a `dimension` list. A file that does not parse raises
    `CorruptFileError`; an entry that breaks the format raises ValueError; both name the file."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, "VBench's prompt list", err, "It must be UTF-8 JSON in the format of VBench's "
                               "VBench_full_info.json (datasets/vbench.md); nothing was generated.") from err
    if not isinstance(info, list):
        raise ValueError(f"{path}: VBench's prompt list must be a JSON list of entries, not {type(info).__name__}.")
    for i, entry in enumerate(info):
        prompt = entry.get("prompt_en") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(entry.get("dimension"), list):
            raise ValueError(f"{path}: entry {i} ({str(entry)[:80]}) needs a non-empty `prompt_en` string and a "
                             "`dimension` list, as in VBench_full_info.json (nothing was generated).")
    return info


@dataclass
class VBenchConfig(FileBenchmarkConfig):
    """`benchmark=vbench`: VBench's prompt suite (Huang et al., arXiv:2311.17982) on a text-to-video model.

    Attributes:
        videos_per_prompt: videos per prompt (VBench's standard: 5; sample i is prompt i // videos_per_prompt).
        dimensions: the VBench dimensions to evaluate (the total score needs all 16).
        fps: frame rate written into the mp4 files.
        prompts_path: VBench's full-info JSON; null: `VBench_full_info.json` of the vbench package in `vbench_env`.
        vbench_cache_path: VBench's weight folder; null: $VBENCH_CACHE_DIR, else ~/.cache/vbench. Its files are
            VBench's own pinned downloads (per dimension, `evaluation/vbench_score.WEIGHTS`): their location is
            recorded, their contents are not hashed into the run's identity.
        vbench_env: the overlay environment the VBench worker runs in (null: `.envs/vbench`).
    """

    name: str = "vbench"
    batch_size: int = 1
    videos_per_prompt: int = 5
    dimensions: List[str] = field(default_factory=lambda: [
        "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
        "aesthetic_quality", "imaging_quality", "dynamic_degree", "object_class", "multiple_objects", "human_action",
        "color", "spatial_relationship", "scene", "appearance_style", "temporal_style", "overall_consistency"])
    fps: int = 24
    prompts_path: Optional[str] = None
    vbench_cache_path: Optional[str] = None
    vbench_env: Optional[str] = field(default=None, metadata=LOCAL)


@register_benchmark("vbench", VBenchConfig)
class VBench(Benchmark):
    condition = "prompts"
    model_hint = "Use a text-to-video model: model=hunyuan_video."

    def preflight(self) -> None:
        unknown = set(self.cfg.dimensions) - set(DIMENSIONS)
        if unknown or not self.cfg.dimensions:
            raise ValueError(f"benchmark.dimensions has {sorted(unknown) or 'nothing'}; choose from "
                             f"{list(DIMENSIONS)}.")
        how = "See datasets/vbench.md."
        if not env_python(self.cfg.vbench_env).is_file():
            raise MissingFileError(f"The VBench environment is not installed ({env_python(self.cfg.vbench_env)} is "
                                   "missing): run `make env-vbench` (nothing was generated).")
        path = self.cfg.prompts_path or str(package_file("VBench_full_info.json", self.cfg.vbench_env))
        self.prompts_file = require_file(path, "VBench's prompt list (VBench_full_info.json)", "prompts_path", how)
        self.info = read_full_info(self.prompts_file)
        self.weights = cache_dir(self.cfg.vbench_cache_path)
        for dim in self.cfg.dimensions:
            for rel in WEIGHTS[dim]:
                target = self.weights / rel
                if not (target.is_dir() if rel.endswith("/") else target.is_file()):
                    raise MissingFileError(
                        f"VBench's `{dim}` needs {target}, which does not exist. {how} Put VBench's weights under "
                        "one folder in its layout and set benchmark.vbench_cache_path=/path/to/it (or "
                        "VBENCH_CACHE_DIR), or leave the dimension out of benchmark.dimensions (nothing was "
                        "generated).")
        if "frames" not in self.model_cfg:
            raise ValueError(f"benchmark=vbench needs a text-to-video model; model={self.model_cfg.name} generates "
                             "images. Use model=hunyuan_video (nothing was generated).")
        check_readable(self.model_cfg.resolution, self.model_cfg.width, self.cfg.vbench_env)
        wanted = set(self.cfg.dimensions)
        self.entries = [e for e in self.info if wanted & set(e["dimension"])]
        self.prompts = list(dict.fromkeys(e["prompt_en"] for e in self.entries))  # first occurrence order
        if not self.prompts:
            raise ValueError(f"{path} has no prompt tagged with any of benchmark.dimensions={list(wanted)} "
                             "(nothing was generated).")

    def inputs(self) -> dict[str, dict]:
        return {"prompts": input_item(self.prompts_file)}

    def all_samples(self) -> list[Sample]:
        k = self.cfg.videos_per_prompt
        return [Sample(index=i, seed=self.cfg.seed + i, prompt=self.prompts[i // k])
                for i in range(k * len(self.prompts))]

    def samples(self) -> list[Sample]:
        """`benchmark.limit` keeps whole prompts (all their videos), so every evaluated prompt has its set."""
        items = self.all_samples()
        if not self.cfg.limit:
            return items
        k = self.cfg.videos_per_prompt
        return items[: -(-self.cfg.limit // k) * k]

    def store(self, root: Path) -> VideoStore:
        m = self.model_cfg
        return VideoStore(root, self.samples(), self.cfg.videos_per_prompt, self.cfg.fps,
                          (m.frames, m.resolution, m.width, 3))

    def to_files(self, videos: Any) -> np.ndarray:
        """Videos (B, 3, F, H, W) in [0, 1] -> (B, F, H, W, 3) uint8."""
        return videos.detach().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()

    def preview(self, store: VideoStore) -> tuple[torch.Tensor, int]:
        """Eight evenly spaced frames of each of the first four videos, one row per video."""
        rows = []
        for sample in store.samples[:4]:
            video = store.read(sample)  # (F, H, W, 3)
            rows.append(torch.from_numpy(video[np.linspace(0, len(video) - 1, 8).round().astype(int)]))
        return torch.cat(rows).permute(0, 3, 1, 2) / 255, 8

    def score(self, store: VideoStore, reference: Optional[SampleStore], device: str) -> dict:
        paths = [str(store.path(s).resolve()) for s in store.samples]
        videos: dict[str, list[str]] = {}
        for s, path in zip(store.samples, paths):
            videos.setdefault(s.prompt, []).append(path)
        info = [{**e, "video_list": videos[e["prompt_en"]]} for e in self.entries if e["prompt_en"] in videos]
        dims = [d for d in self.cfg.dimensions if any(d in e["dimension"] for e in info)]
        work = store.root / "vbench"
        results = run_vbench(info, dims, work, self.weights, device, self.cfg.vbench_env)
        shutil.rmtree(work, ignore_errors=True)
        tags: dict[str, set] = {}
        for e in info:
            tags.setdefault(e["prompt_en"], set()).update(e["dimension"])
        tagged = np.array([[d in tags[s.prompt] for d in dims] for s in store.samples])
        values = np.array([[results[d]["videos"].get(path, np.nan) for d in dims] for path in paths])
        return summarize({d: results[d]["score"] for d in dims}, values, tagged, dims)


def _interval(estimate: float, score: float, what: str, make: Callable[[], dict]) -> dict:
    """`make()` (a metric's interval and what recomputes it) when `estimate`, its statistic of the stored values,
    is VBench's `score` and the interval is finite (a resample may draw none of color's counted videos); else {}."""
    if not math.isclose(estimate, score, rel_tol=1e-9, abs_tol=1e-12):
        log.warning(f"VBench's {what} = {score} is not the statistic of its per-video values ({estimate}): the "
                    "record keeps no interval for it.")
        return {}
    extra = make()
    return extra if all(math.isfinite(x) for x in extra["interval"]) else {}


def summarize(scores: dict[str, float], values: np.ndarray, tagged: np.ndarray, dims: list[str]) -> dict:
    """The record's metrics: each dimension's VBench score, with `per_sample` (its videos' values, in sample order,
    so two rows on the same seeds pair up), `statistic` and bootstrap `interval`; VBench's quality, semantic and
    total scores (percent) where every dimension of the group was scored, with an interval over the videos' rows
    (a set metric: each resample recomputes every dimension's mean over its own drawn videos, then the weighted
    combination) and their `values` under `arrays`. An interval is kept only where its statistic of the stored
    values reproduces VBench's own score (it does for every dimension: `evaluation/vbench_score.py`).

    Args:
        scores: {dimension: VBench's aggregate}.
        values: (n, len(dims)) per-video values, rows in sample order; NaN where VBench lists none for the video.
        tagged: (n, len(dims)) whether the sample's prompt is tagged with the dimension (VBench scores it there).
    """
    out = {}
    for j, d in enumerate(dims):
        v = values[tagged[:, j], j]  # (videos of d,)
        stat = STATISTIC[d]
        out[d] = metric(scores[d], higher_is_better=True,
                        **_interval(float(STATISTICS[stat](v)), scores[d], d, lambda: summary(v, stat)))
    for name, value in total_score(scores).items():
        extra = {}
        if value is not None:
            rows, fn = values[:, [dims.index(d) for d in GROUPS[name]]], group_score(name)  # (n, group's dims)
            extra = _interval(fn(rows), value, name, lambda: {"interval": list(set_interval(rows, fn)),
                                                               "statistic": name, "arrays": {"values": rows}})
        out[name] = metric(value, higher_is_better=True, **extra)
    return out
