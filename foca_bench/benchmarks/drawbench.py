"""`benchmark=drawbench`: DrawBench prompts (Saharia et al., arXiv:2205.11487) scored with ImageReward and CLIP.

Sample i is prompt `i // images_per_prompt` of the CSV, in file order, with seed `seed + i`. ImageReward runs in
its own environment (`evaluation/image_reward.py`), CLIP score in this one (`evaluation/clip_score.py`). Besides the
means, the record keeps the per-category means (DrawBench's 11 categories), as `metrics.<metric>@<category>`.
"""

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from evaluation import metric
from evaluation.clip_score import clip_scores, load_clip
from evaluation.image_reward import env_python, run_image_reward
from evaluation.uncertainty import summary
from foca_bench.benchmarks import (LOCAL, Benchmark, FileBenchmarkConfig, MissingFileError, register_benchmark,
                                   require_file)
from foca_bench.errors import CorruptFileError
from foca_bench.identity import input_item
from foca_bench.samples import Sample, SampleStore

METRICS = ("image_reward", "clip_score")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache the ImageReward worker will read (HF_HUB_CACHE, else HF_HOME/hub), at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(prompt, category) rows of a DrawBench CSV: columns `Prompts`/`Category` (Imagen's sheet), any case."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise CorruptFileError(path, "The DrawBench prompt CSV", err, "Save it as UTF-8 CSV with a `Prompts` column "
                               "(datasets/drawbench.md).") from err
    if not rows:
        raise ValueError(f"{path} holds no prompts.")
    keys = {k.lower().strip(): k for k in rows[0]}
    prompt_key = keys.get("prompts") or keys.get("prompt")
    if prompt_key is None:
        raise ValueError(f"{path} has no `Prompts` column (its columns: {list(rows[0])}).")
    category_key = keys.get("category")
    return [(r[prompt_key].strip(), (r[category_key].strip() if category_key else "")) for r in rows]


@dataclass
class DrawBenchConfig(FileBenchmarkConfig):
    """`benchmark=drawbench`: DrawBench's 200 prompts (Saharia et al., arXiv:2205.11487), ImageReward and CLIP score.

    Attributes:
        prompts_path: the DrawBench CSV (columns `Prompts`, `Category`); see datasets/drawbench.md.
        images_per_prompt: samples per prompt (sample i is prompt i // images_per_prompt).
        metrics: which of `image_reward`, `clip_score` to compute.
        clip_model: open_clip architecture name; clip_path: its local checkpoint; clip_config_path: a JSON model
            config to register first (a custom architecture), else null.
        image_reward_path, image_reward_med_config_path: `ImageReward.pt` and `med_config.json`.
        image_reward_env: the overlay environment the ImageReward worker runs in (null: `.envs/imagereward`).
    """

    name: str = "drawbench"
    batch_size: int = 4
    images_per_prompt: int = 1
    metrics: List[str] = field(default_factory=lambda: ["image_reward", "clip_score"])
    prompts_path: Optional[str] = None
    clip_model: str = "ViT-L-14"
    clip_path: Optional[str] = None
    clip_config_path: Optional[str] = None
    image_reward_path: Optional[str] = None
    image_reward_med_config_path: Optional[str] = None
    image_reward_env: Optional[str] = field(default=None, metadata=LOCAL)


@register_benchmark("drawbench", DrawBenchConfig)
class DrawBench(Benchmark):
    condition = "prompts"
    model_hint = "Use a text-to-image model: model=flux."

    def preflight(self) -> None:
        unknown = set(self.cfg.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"benchmark.metrics has {sorted(unknown)}; choose from {list(METRICS)}.")
        how = "See datasets/drawbench.md."
        self.clip = self.reward = self.med_config = None
        self.prompts_file = require_file(self.cfg.prompts_path, "The DrawBench prompt CSV", "prompts_path", how)
        self.prompts = read_prompts(self.prompts_file)
        if "clip_score" in self.cfg.metrics:
            self.clip = require_file(self.cfg.clip_path, f"CLIP weights ({self.cfg.clip_model})", "clip_path", how)
        if "image_reward" in self.cfg.metrics:
            self.reward = require_file(self.cfg.image_reward_path, "ImageReward weights (ImageReward.pt)",
                                       "image_reward_path", how)
            self.med_config = require_file(self.cfg.image_reward_med_config_path, "ImageReward's med_config.json",
                                           "image_reward_med_config_path", how)
            python = env_python(self.cfg.image_reward_env)
            if not python.is_file():
                raise MissingFileError(f"The ImageReward environment is not installed ({python} is missing): run "
                                       "`make env-imagereward`, or drop it with "
                                       "benchmark.metrics=[clip_score] (nothing was generated).")
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache("bert-base-uncased", "vocab.txt", cache_dir=hf_hub_cache()), str):
                raise MissingFileError("ImageReward's BLIP loads the `bert-base-uncased` tokenizer by name, and it is "
                                       "not in the Hugging Face cache: on a networked machine run `python -c \"from "
                                       "transformers import BertTokenizer; BertTokenizer.from_pretrained('bert-base-"
                                       "uncased')\"` and copy ~/.cache/huggingface (or set HF_HOME). Nothing was "
                                       "generated.")

    def inputs(self) -> dict[str, dict]:
        clip_config = self.cfg.clip_config_path and Path(self.cfg.clip_config_path).expanduser()
        files = {"prompts": self.prompts_file, "clip": self.clip, "clip_config": clip_config,
                 "image_reward": self.reward, "image_reward_med_config": self.med_config}
        return {name: input_item(path) for name, path in files.items() if path}

    def all_samples(self) -> list[Sample]:
        k = self.cfg.images_per_prompt
        return [Sample(index=i, seed=self.cfg.seed + i, prompt=self.prompts[i // k][0])
                for i in range(k * len(self.prompts))]

    def score(self, store: SampleStore, reference: Optional[SampleStore], device: str) -> dict:
        samples = store.samples
        scores: dict[str, np.ndarray] = {}
        if "clip_score" in self.cfg.metrics:
            config = Path(self.cfg.clip_config_path) if self.cfg.clip_config_path else None
            model, preprocess, tokenizer = load_clip(self.cfg.clip_model, self.clip, device, config)
            images = (store.read(s) for s in samples)
            scores["clip_score"] = clip_scores(images, [s.prompt for s in samples], model, preprocess, tokenizer,
                                               device, self.cfg.metric_batch_size)
        if "image_reward" in self.cfg.metrics:
            items = [{"image": str(store.path(s)), "prompt": s.prompt} for s in samples]
            work = store.root / "image_reward"
            scores["image_reward"] = np.array(run_image_reward(items, self.reward, self.med_config, work, device,
                                                               self.cfg.image_reward_env))
            shutil.rmtree(work, ignore_errors=True)
        return summarize(scores, [self.prompts[s.index // self.cfg.images_per_prompt][1] for s in samples])


def summarize(scores: dict[str, np.ndarray], categories: list[str]) -> dict:
    """Means over all samples, then per category (`<metric>@<category>`)."""
    out = {name: metric(float(np.mean(v)), higher_is_better=True, **summary(v)) for name, v in scores.items()}
    for name, v in scores.items():
        for category in sorted(set(categories) - {""}):
            mask = np.array([c == category for c in categories])
            out[f"{name}@{category}"] = metric(float(np.mean(v[mask])), higher_is_better=True)
    return out
