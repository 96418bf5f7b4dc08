"""`benchmark=div8k`: DIV8K super-resolution (Gu et al., ICCVW 2019) as the paper's Table 4 runs Inf-DiT.

Sample i is the i-th ground-truth PNG of `gt_path` (sorted by name). Its target is the centre `hr_size` crop; the
model's input is that crop downsampled `scale` times (bicubic with antialiasing, PIL). Scores: PSNR and SSIM of the
output against the crop (`evaluation/sr_metrics.py`). Generation needs an adapter that takes `low_res=` (B, 3, h, w)
in [0, 1] (`Adapter.condition = "low_res"`): Inf-DiT, `model=inf_dit`, whose `model.resolution` must be `hr_size`;
the inputs are read and downsampled when a batch is generated (`conditions`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from evaluation.sr_metrics import psnr_ssim
from foca_bench.benchmarks import Benchmark, FileBenchmarkConfig, MissingFileError, register_benchmark
from foca_bench.identity import input_item
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


@dataclass
class Div8KConfig(FileBenchmarkConfig):
    """`benchmark=div8k`: DIV8K super-resolution (Gu et al., ICCVW 2019), the paper's Table 4 (512 -> 2048).

    Attributes:
        gt_path: folder of DIV8K ground-truth PNGs (sorted by name; sample i is the i-th file).
        hr_size: side of the centre crop of each ground truth the model must reproduce.
        scale: upsampling factor; the low-resolution input is the crop downsampled by `scale` (bicubic, antialiased).
    """

    name: str = "div8k"
    batch_size: int = 1
    gt_path: Optional[str] = None
    hr_size: int = 2048
    scale: int = 4


@register_benchmark("div8k", Div8KConfig)
class Div8K(Benchmark):
    condition = "low_res"
    model_hint = "It needs a super-resolution model: the paper's is Inf-DiT (model=inf_dit)."

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

    def check_model(self, adapter_class: type) -> None:
        super().check_model(adapter_class)
        if self.model_cfg.resolution != self.cfg.hr_size:
            raise ValueError(f"benchmark.hr_size={self.cfg.hr_size} but model.resolution={self.model_cfg.resolution}: "
                             "the model must output the crop's size; set them equal (nothing was generated).")

    def inputs(self) -> dict[str, dict]:
        files = [Path(s.condition) for s in self.samples()]
        return {"ground_truth": input_item(Path(self.cfg.gt_path).expanduser(), files)}

    def all_samples(self) -> list[Sample]:
        return [Sample(index=i, seed=self.cfg.seed + i, condition=str(p)) for i, p in enumerate(self.files)]

    def low_res(self, sample: Sample) -> np.ndarray:
        return downsample(centre_crop(Path(sample.condition), self.cfg.hr_size), self.cfg.scale)

    def conditions(self, samples: list[Sample]) -> dict:
        """`low_res` (B, 3, h, w) in [0, 1], read and downsampled when a batch is generated, not up front."""
        low = np.stack([self.low_res(s) for s in samples])  # (B, h, w, 3) uint8
        return {"low_res": torch.from_numpy(low).permute(0, 3, 1, 2).float() / 255}

    def score(self, store: SampleStore, reference: Optional[SampleStore], device: str) -> dict:
        pairs = ((store.read(s), centre_crop(Path(s.condition), self.cfg.hr_size)) for s in store.samples)
        return psnr_ssim(pairs, total=len(store.samples))
