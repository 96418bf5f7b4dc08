"""`benchmark=imagenet_fid`: class-conditional ImageNet samples, FID-50k and IS (DiT, arXiv:2212.09748, Table 3).

Sample i is class `i % C` (C = `model.num_classes`), the `i // C`-th sample of that class, seed `seed + i`: the
first C samples cover every class once, so `benchmark.limit` smoke runs stay class-balanced. Deviation from DiT's
`sample_ddp.py`: it draws random labels per batch; we use exactly `samples_per_class` per class, as the issue asks.
"""

from pathlib import Path
import numpy as np

from evaluation.inception_fid import (INCEPTION_FILE, INCEPTION_URL, check_reference_batch, default_inception_path,
                                     fid_is, load_reference_batch)
from foca_bench.benchmarks import FileBenchmark, require_file, register_benchmark
from foca_bench.samples import Sample, SampleStore

REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/" \
                "VIRTUAL_imagenet256_labeled.npz"


@register_benchmark("imagenet_fid")
class ImageNetFID(FileBenchmark):
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

    def all_samples(self) -> list[Sample]:
        c = self.model_cfg.num_classes
        n = self.cfg.samples_per_class * c
        return [Sample(index=i, seed=self.cfg.seed + i, label=i % c) for i in range(n)]

    def evaluate(self, store: SampleStore, device: str) -> dict:
        with np.load(store.npz) as f:
            images = f["arr_0"]
        reference = load_reference_batch(Path(self.reference))
        return fid_is(images, reference, self.inception, device=device, batch_size=self.cfg.metric_batch_size,
                      isc_splits=self.cfg.isc_splits)
