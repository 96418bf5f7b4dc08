"""`benchmark=drawbench`: DrawBench prompts (Saharia et al., arXiv:2205.11487) scored with ImageReward and CLIP.

Sample i is prompt `i // images_per_prompt` of the CSV, in file order, with seed `seed + i`. ImageReward runs in
its own environment (`evaluation/image_reward.py`), CLIP score in this one (`evaluation/clip_score.py`). Besides the
means, the record keeps the per-category means (DrawBench's 11 categories), as `metrics.<metric>@<category>`.
"""

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import metric
from evaluation.clip_score import clip_scores, load_clip
from evaluation.image_reward import env_python, run_image_reward
from evaluation.uncertainty import summary
from foca_bench.benchmarks import FileBenchmark, MissingFileError, register_benchmark, require_file
from foca_bench.errors import CorruptFileError
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


@register_benchmark("drawbench")
class DrawBench(FileBenchmark):
    def preflight(self) -> None:
        unknown = set(self.cfg.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"benchmark.metrics has {sorted(unknown)}; choose from {list(METRICS)}.")
        how = "See datasets/drawbench.md."
        self.prompts = read_prompts(require_file(self.cfg.prompts_path, "The DrawBench prompt CSV", "prompts_path",
                                                 how))
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

    def all_samples(self) -> list[Sample]:
        k = self.cfg.images_per_prompt
        return [Sample(index=i, seed=self.cfg.seed + i, label=i // k, prompt=self.prompts[i // k][0])
                for i in range(k * len(self.prompts))]

    def prepare(self, adapter: Any) -> None:
        adapter.prompts = [p for p, _ in self.prompts]  # sample labels index this list

    def evaluate(self, store: SampleStore, device: str) -> dict:
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
        return summarize(scores, [self.prompts[s.label][1] for s in samples])


def summarize(scores: dict[str, np.ndarray], categories: list[str]) -> dict:
    """Means over all samples, then per category (`<metric>@<category>`)."""
    out = {name: metric(float(np.mean(v)), higher_is_better=True, **summary(v)) for name, v in scores.items()}
    for name, v in scores.items():
        for category in sorted(set(categories) - {""}):
            mask = np.array([c == category for c in categories])
            out[f"{name}@{category}"] = metric(float(np.mean(v[mask])), higher_is_better=True)
    return out
