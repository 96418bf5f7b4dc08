"""`benchmark=toy_fid`: FID/IS/accuracy of generated digits with the shipped digit classifier (toy numbers).

A sample's index is its position in the benchmark's fixed list and its seed is `benchmark.seed + index`, so the
same samples come out whatever the batch size or the number of processes.
"""

from typing import Any

import torch
from torch import Tensor

from evaluation.digit_metrics import digit_metrics
from evaluation.fidelity import fidelity
from foca_bench.benchmarks import register_benchmark
from foca_bench.digit_classifier import load_classifier
from foca_bench.toy_data import load_digits_images


@register_benchmark("toy_fid")
class ToyFID:
    """K samples per digit class; FID/IS/accuracy with the digit classifier; fidelity to full compute."""

    def __init__(self, cfg: Any, model_cfg: Any) -> None:
        if model_cfg.num_classes != 10 or model_cfg.resolution != 16:
            raise ValueError(f"benchmark=toy_fid (the default benchmark) scores 16x16 images of 10 digit classes; "
                             f"model={model_cfg.name} makes {model_cfg.resolution}px images of "
                             f"{model_cfg.num_classes} classes. Use model=toy_dit at model.resolution=16, or this "
                             "model's benchmark (dit_xl_2: imagenet_fid, flux: drawbench, hunyuan_video: vbench, "
                             "inf_dit: div8k), or profile.benchmark=false (FLOPs and latency only).")
        self.cfg = cfg
        self.classifier = load_classifier()  # fails early, before any generation, if missing

    def samples(self) -> tuple[Tensor, list[int]]:
        """Class labels (N,) and seeds, class-major: index = class * K + k."""
        k = self.cfg.samples_per_class
        labels = torch.arange(10).repeat_interleave(k)
        seeds = [self.cfg.seed + i for i in range(len(labels))]
        return labels, seeds

    def evaluate(self, images: Tensor, labels: Tensor, reference: Tensor) -> dict:
        real, _ = load_digits_images(16)
        return {**digit_metrics(images, labels, real, self.classifier), **fidelity(images, reference)}
