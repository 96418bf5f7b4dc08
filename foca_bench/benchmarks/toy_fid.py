"""`benchmark=toy_fid`: FID/IS/accuracy of generated digits with the shipped digit classifier (toy numbers).

A sample's index is its position in the benchmark's fixed list (class-major: index = class * K + k) and its seed
is `benchmark.seed + index`, so the same samples come out whatever the batch size or the number of processes.
Samples are stored as float32 `.npy` files (`ArrayStore`): fidelity to the full-compute samples (PSNR, SSIM,
relative L2) is measured on the model's own values, not on 8-bit images.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from evaluation.digit_metrics import digit_metrics
from evaluation.fidelity import fidelity
from foca_bench.benchmarks import Benchmark, BenchmarkConfig, register_benchmark
from foca_bench.digit_classifier import CLASSIFIER_DIR, load_classifier
from foca_bench.identity import input_item
from foca_bench.samples import ArrayStore, Sample, SampleStore
from foca_bench.toy_data import load_digits_images


@register_benchmark("toy_fid", BenchmarkConfig)
class ToyFID(Benchmark):
    """K samples per digit class; FID/IS/accuracy with the digit classifier; fidelity to full compute."""

    needs_reference = True
    model_hint = "Use model=toy_dit."

    def preflight(self) -> None:
        if self.model_cfg.num_classes != 10 or self.model_cfg.resolution != 16:
            raise ValueError(f"benchmark=toy_fid (the default benchmark) scores 16x16 images of 10 digit classes; "
                             f"model={self.model_cfg.name} makes {self.model_cfg.resolution}px images of "
                             f"{self.model_cfg.num_classes} classes. Use model=toy_dit at model.resolution=16, or this "
                             "model's benchmark (dit_xl_2: imagenet_fid, flux: drawbench, hunyuan_video: vbench, "
                             "inf_dit: div8k), or profile.benchmark=false (FLOPs and latency only).")
        self.classifier = load_classifier()  # fails early, before any generation, if missing

    def inputs(self) -> dict[str, dict]:
        return {"classifier": input_item(CLASSIFIER_DIR / "model.safetensors")}

    def all_samples(self) -> list[Sample]:
        k = self.cfg.samples_per_class
        return [Sample(index=i, seed=self.cfg.seed + i, label=i // k) for i in range(10 * k)]

    def store(self, root: Path) -> ArrayStore:
        return ArrayStore(root, self.samples())

    def to_files(self, images: torch.Tensor) -> np.ndarray:
        return images.float().numpy()  # (B, C, H, W) in [0, 1], as generated

    def preview(self, store: SampleStore) -> tuple[torch.Tensor, int]:
        """Every sample, one class per row."""
        return _images(store), self.cfg.samples_per_class

    def score(self, store: SampleStore, reference: Optional[SampleStore], device: str) -> dict:
        images, labels = _images(store), torch.tensor([s.label for s in store.samples])
        real, _ = load_digits_images(16)
        return {**digit_metrics(images, labels, real, self.classifier), **fidelity(images, _images(reference))}


def _images(store: SampleStore) -> torch.Tensor:
    with np.load(store.npz) as f:
        return torch.from_numpy(f["arr_0"])  # (N, C, H, W)
