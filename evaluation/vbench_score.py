"""VBench (Huang et al., arXiv:2311.17982) through the `vbench` package, in its own environment, and its total score.

vbench 0.1.5 pins transformers==4.33.2, numpy<2 and timm<=1.0.12, which conflict with diffusers' new pipelines
and open-clip-torch in `.venv`. So the evaluator runs as a subprocess of an overlay environment, `.envs/vbench`
(`make env-vbench`): a venv whose own site-packages hold vbench and its pins and which reads torch and torchvision
from the main `.venv` (appended after its own packages, so its pins win). This file is the launcher (main env),
the worker (`python -m evaluation.vbench_score`, overlay env) and the score formula (both).

Weights: VBench's per-dimension models under its cache folder (`VBENCH_CACHE_DIR`, default `~/.cache/vbench`) in
the layout its `init_submodules(local=True)` reads (`WEIGHTS` below; `datasets/vbench.md` says where each comes
from). The worker runs `VBench.evaluate(..., local=True)` with HF_HUB_OFFLINE=1 (nothing is downloaded) on a
full-info file that lists only the prompts this run generated, each with its own `video_list`: the file VBench's
standard mode would build by looking for `<prompt>-<k>.mp4`, built by us instead, so every dimension (the
semantic ones too, which VBench's custom mode refuses) reads our files whatever their names
(`foca_bench.samples.prompt_stems` renames prompts that are no safe file name).

Total score: VBench's own aggregation (its `scripts/cal_final_score.py` and `scripts/constant.py`, whose numbers
`NORMALIZE`/`DIM_WEIGHT` reproduce): each dimension is min-max normalised and weighted (dynamic degree 0.5), the
quality score averages the 7 quality dimensions, the semantic score the 9 semantic ones, and the total is
(4 x quality + 1 x semantic) / 5, in percent as the FoCa paper's Table 2 prints it.

Per-video values: `VBench.evaluate` writes `<name>_eval_results.json`, each dimension mapping to [aggregate, one dict
per video with `video_path` and `video_results`]. Read from vbench 0.1.5's `vbench/<dimension>.py` (one process,
as the worker runs it): every dimension's aggregate is the mean of its per-video values over the videos it lists,
with three qualifications. imaging_quality's per-video value is MUSIQ's 0-100 score, and the aggregate divides the
mean by 100 (`SCALE`). color lists only the videos in which GRiT found the prompt's object with some colour word
(it leaves the others out), so its statistic is the mean over the videos that have a value (`nanmean`). The
frame-weighted ones (subject/background consistency, appearance_style: sum over all frames or frame pairs / their
count; object_class, multiple_objects, scene, spatial_relationship: over 16 sampled frames per video) equal the mean
over videos because every video of a run has the same frame count. `foca_bench.benchmarks.vbench` keeps an
interval only where the statistic of the stored values reproduces VBench's aggregate.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

ENV_DIR = Path(__file__).resolve().parent.parent / ".envs" / "vbench"

QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY + SEMANTIC
# VBench's scripts/constant.py: (min, max) of each dimension's raw score, and its weight
NORMALIZE = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
             "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
             "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0),
             "object_class": (0.0, 1.0), "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0),
             "color": (0.0, 1.0), "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222),
             "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364)}
DIM_WEIGHT = {d: 0.5 if d == "dynamic_degree" else 1.0 for d in DIMENSIONS}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1
GROUPS = {"vbench_quality": QUALITY, "vbench_semantic": SEMANTIC, "vbench": DIMENSIONS}  # total_score's names
# per-video value x SCALE is in the aggregate's units (vbench/imaging_quality.py: mean of MUSIQ's 0-100 / 100)
SCALE = {"imaging_quality": 0.01}
# vbench/color.py averages over the videos it lists, those in which the prompt's object was found with a colour
STATISTIC = {d: "nanmean" if d == "color" else "mean" for d in DIMENSIONS}

# files each dimension loads from the cache folder (vbench.utils.init_submodules with local=True, and the
# aesthetic head its aesthetic_quality.py reads); a folder ends with '/'
WEIGHTS = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main/", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": ("grit_model/grit_b_densecap_objectdet.pth",),
    "multiple_objects": ("grit_model/grit_b_densecap_objectdet.pth",),
    "color": ("grit_model/grit_b_densecap_objectdet.pth",),
    "spatial_relationship": ("grit_model/grit_b_densecap_objectdet.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
}


def env_python(env_dir: Optional[str] = None) -> Path:
    return Path(env_dir or ENV_DIR) / "bin" / "python"


def cache_dir(path: Optional[str] = None) -> Path:
    """VBench's weight folder: `path`, else $VBENCH_CACHE_DIR, else ~/.cache/vbench (as vbench.utils decides)."""
    return Path(path or os.environ.get("VBENCH_CACHE_DIR") or "~/.cache/vbench").expanduser()


def package_file(name: str, env_dir: Optional[str] = None) -> Path:
    """A file shipped inside the vbench package of the environment (e.g. `VBench_full_info.json`), located
    without importing vbench."""
    code = "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('vbench').origin))"
    out = subprocess.run([str(env_python(env_dir)), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / name


def total_score(scores: dict[str, float]) -> dict[str, Optional[float]]:
    """VBench's quality, semantic and total scores (percent) from raw dimension scores; a group is None unless
    every one of its dimensions was scored."""

    def group(dims: tuple[str, ...]) -> Optional[float]:
        if any(d not in scores for d in dims):
            return None
        normed = [(scores[d] - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) * DIM_WEIGHT[d] for d in dims]
        return sum(normed) / sum(DIM_WEIGHT[d] for d in dims)

    quality, semantic = group(QUALITY), group(SEMANTIC)
    total = (None if quality is None or semantic is None
             else (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT))
    return {name: None if v is None else 100 * v
            for name, v in (("vbench_quality", quality), ("vbench_semantic", semantic), ("vbench", total))}


def group_score(name: str) -> Callable[[np.ndarray], float]:
    """VBench's score `name` (a key of `GROUPS`, percent) from per-video values (n, len(GROUPS[name])), one column
    per dimension in `GROUPS[name]`'s order, NaN where a video has none (its prompt is not tagged with the dimension,
    or VBench listed no value): `total_score` of each column's mean over its values."""
    dims = GROUPS[name]
    return lambda values: total_score(dict(zip(dims, np.nanmean(values, axis=0).tolist())))[name]


def per_video(dimension: str, videos: list[dict]) -> dict[str, float]:
    """{video path: value in the aggregate's units} of one dimension's per-video results as VBench lists them
    (booleans, e.g. dynamic_degree's "moves", as 0/1)."""
    return {v["video_path"]: float(v["video_results"]) * SCALE.get(dimension, 1.0) for v in videos}


def run_vbench(info: list[dict], dimensions: list[str], work_dir: Path, weights: Path, device: str = "cpu",
               env_dir: Optional[str] = None) -> dict[str, dict]:
    """Evaluates videos on `dimensions` in the VBench environment.

    Args:
        info: VBench full-info entries (`prompt_en`, `dimension`, `auxiliary_info`, ...) of the prompts generated,
            each with `video_list`: the paths of its videos.
        weights: VBench's cache folder.

    Returns:
        {dimension: {"score": VBench's aggregate, "videos": {video path: value (`per_video`)}}}; a video VBench
        lists no value for (color's, see the module docstring) is absent.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    info_path, answer = work_dir / "vbench_full_info.json", work_dir / "vbench_scores.json"
    info_path.write_text(json.dumps(info))
    env = {**os.environ, "VBENCH_CACHE_DIR": str(weights), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(env_python(env_dir)), "-m", "evaluation.vbench_score", "--info", str(info_path), "--dimensions",
           ",".join(dimensions), "--out", str(answer), "--device", device]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, stderr=None)
    if proc.returncode != 0:
        raise RuntimeError(f"The VBench worker failed (exit {proc.returncode}); its log is above. Command: "
                           f"{' '.join(cmd)}")
    return json.loads(answer.read_text())


def _worker(argv: list[str]) -> None:
    from vbench import VBench

    class Listed(VBench):
        """VBench reading the video paths our full-info file lists, instead of looking them up by prompt."""

        def build_full_info_json(self, videos_path: str, name: str, dimension_list: list, *args, **kwargs) -> str:
            info = [e for e in json.loads(Path(self.full_info_dir).read_text()) if set(dimension_list) & set(
                e["dimension"])]
            path = Path(self.output_path) / f"{name}_full_info.json"
            path.write_text(json.dumps(info))
            return str(path)

    p = argparse.ArgumentParser()
    for name in ("--info", "--dimensions", "--out", "--device"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    out_dir = Path(args.out).parent / "vbench_output"
    bench = Listed(args.device, args.info, str(out_dir))
    dims = args.dimensions.split(",")
    bench.evaluate(videos_path=None, name="foca_bench", dimension_list=dims, local=True)
    raw = json.loads((out_dir / "foca_bench_eval_results.json").read_text())
    result = {d: {"score": float(raw[d][0]), "videos": per_video(d, raw[d][1])} for d in dims}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    _worker(sys.argv[1:])
