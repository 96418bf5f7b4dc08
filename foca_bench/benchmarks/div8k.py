"""`benchmark=div8k`: DIV8K super-resolution (Gu et al., ICCVW 2019) as the paper's Table 4 runs Inf-DiT.

Sample i is the i-th ground-truth PNG of `gt_path` (sorted by name). Its target is the centre `hr_size` crop; the
model's input is that crop downsampled `scale` times (bicubic with antialiasing, PIL). Scores: PSNR and SSIM of the
output against the crop (`evaluation/sr_metrics.py`). Generation needs an adapter that super-resolves
(`adapter.super_resolves`: Inf-DiT, `model=inf_dit`, whose `model.resolution` must be `hr_size`); it reads each
sample's input through `adapter.low_res(index)`, which `prepare` sets.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from evaluation.sr_metrics import psnr_ssim
from foca_bench.benchmarks import FileBenchmark, MissingFileError, register_benchmark
from foca_bench.samples import Sample, SampleStore


def centre_crop(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 centre crop of an image file; raises if the image is smaller than `size`."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) < size:
            raise ValueError(f"{path} is {w}x{h}, smaller than benchmark.hr_size={size}.")
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic, antialiased (PIL) downsampling by `scale`: the low-resolution input of the protocol."""
    side = hr.shape[0] // scale
    return np.asarray(Image.fromarray(hr).resize((side, side), Image.BICUBIC, reducing_gap=None))


@register_benchmark("div8k")
class Div8K(FileBenchmark):
    def preflight(self) -> None:
        folder = Path(self.cfg.gt_path).expanduser() if self.cfg.gt_path else None
        if folder is None or not folder.is_dir() or not sorted(folder.glob("*.png")):
            where = f"{folder} holds no PNG images" if folder else "benchmark.gt_path is not set"
            raise MissingFileError(f"DIV8K ground truth: {where}. Download DIV8K (datasets/div8k.md) and set "
                                   "benchmark.gt_path=/path/to/DIV8K/folder (nothing was generated).")
        if self.cfg.hr_size % self.cfg.scale:
            raise ValueError(f"benchmark.hr_size={self.cfg.hr_size} must be a multiple of benchmark.scale="
                             f"{self.cfg.scale}.")
        self.files = sorted(folder.glob("*.png"))

    def prepare(self, adapter: Any) -> None:
        if not getattr(adapter, "super_resolves", False):
            raise ValueError(f"benchmark=div8k needs a super-resolution model; model={adapter.cfg.name} generates "
                             "from noise. The paper's model is Inf-DiT: model=inf_dit.")
        if adapter.cfg.resolution != self.cfg.hr_size:
            raise ValueError(f"benchmark.hr_size={self.cfg.hr_size} but model.resolution={adapter.cfg.resolution}: "
                             "the model must output the crop's size; set them equal.")
        samples = self.samples()
        adapter.low_res = lambda index: self.low_res(samples[index])  # read when a batch needs it, not up front

    def all_samples(self) -> list[Sample]:
        return [Sample(index=i, seed=self.cfg.seed + i, condition=str(p)) for i, p in enumerate(self.files)]

    def low_res(self, sample: Sample) -> np.ndarray:
        return downsample(centre_crop(Path(sample.condition), self.cfg.hr_size), self.cfg.scale)

    def conditions(self, samples: list[Sample]) -> tuple[torch.Tensor, list[int]]:
        return torch.tensor([s.index for s in samples]), [s.seed for s in samples]  # `adapter.low_res(index)`

    def evaluate(self, store: SampleStore, device: str) -> dict:
        pairs = ((store.read(s), centre_crop(Path(s.condition), self.cfg.hr_size)) for s in store.samples)
        return psnr_ssim(pairs, total=len(store.samples))
