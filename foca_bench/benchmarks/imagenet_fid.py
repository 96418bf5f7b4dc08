"""`benchmark=imagenet_fid`: class-conditional ImageNet samples, FID-50k and IS (DiT, arXiv:2212.09748, Table 3).

Sample i is class `i % C` (C = `model.num_classes`), the `i // C`-th sample of that class, seed `seed + i`: the
first C samples cover every class once, so `benchmark.limit` smoke runs stay class-balanced. Deviation from DiT's
`sample_ddp.py`: it draws random labels per batch; we use exactly `samples_per_class` per class, as the issue asks.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from evaluation.inception_fid import (INCEPTION_FILE, INCEPTION_URL, check_reference_batch, default_inception_path,
                                     fid_is, load_reference_batch)
from foca_bench.benchmarks import Benchmark, FileBenchmarkConfig, register_benchmark, require_file
from foca_bench.identity import input_item
from foca_bench.samples import Sample, SampleStore

REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/" \
                "VIRTUAL_imagenet256_labeled.npz"


@dataclass
class ImageNetFIDConfig(FileBenchmarkConfig):
    """`benchmark=imagenet_fid`: `samples_per_class` x `model.num_classes` samples; sample i is class i % C.

    Attributes:
        reference_path: ADM's reference batch (`VIRTUAL_imagenet256_labeled.npz`: `arr_0` uint8 NHWC).
        inception_path: torch-fidelity's Inception-v3 weights; null: torch-fidelity's own cache location.
        isc_splits: Inception Score splits (ADM: 10).
    """

    name: str = "imagenet_fid"
    samples_per_class: int = 50
    batch_size: int = 25
    reference_path: Optional[str] = None
    inception_path: Optional[str] = None
    isc_splits: int = 10


@register_benchmark("imagenet_fid", ImageNetFIDConfig)
class ImageNetFID(Benchmark):
    model_hint = "Use model=dit_xl_2."

    def preflight(self) -> None:
        if self.model_cfg.num_classes < 2:
            raise ValueError(f"benchmark=imagenet_fid samples classes; model={self.model_cfg.name} is not "
                             "class-conditional. Use model=dit_xl_2.")
        self.reference = require_file(self.cfg.reference_path, "ADM's ImageNet reference batch", "reference_path",
                                      f"Download VIRTUAL_imagenet256_labeled.npz from {REFERENCE_URL} (datasets/"
                                      "imagenet_fid.md).")
        check_reference_batch(self.reference)  # loads, keys, shapes: before any sample is generated
        inception = self.cfg.inception_path or str(default_inception_path())
        self.inception = require_file(inception, f"torch-fidelity's Inception weights ({INCEPTION_FILE})",
                                      "inception_path", f"Download {INCEPTION_URL} into "
                                      f"{default_inception_path().parent} (torch-fidelity's cache) or anywhere else.")

    def inputs(self) -> dict[str, dict]:
        return {"reference": input_item(self.reference), "inception": input_item(self.inception)}

    def all_samples(self) -> list[Sample]:
        c = self.model_cfg.num_classes
        n = self.cfg.samples_per_class * c
        return [Sample(index=i, seed=self.cfg.seed + i, label=i % c) for i in range(n)]

    def score(self, store: SampleStore, reference: Optional[SampleStore], device: str) -> dict:
        with np.load(store.npz) as f:
            images = f["arr_0"]
        batch = load_reference_batch(Path(self.reference))
        return fid_is(images, batch, self.inception, device=device, batch_size=self.cfg.metric_batch_size,
                      isc_splits=self.cfg.isc_splits)
