"""FID and Inception Score with torch-fidelity's Inception-v3 (a port of the TF graph ADM's evaluator uses).

FID-50k follows DiT/ADM (arXiv:2212.09748, arXiv:2105.05233): the generated set against the images (`arr_0`) of
ADM's reference batch, e.g. `VIRTUAL_imagenet256_labeled.npz`. torch-fidelity computes both sides' pool3
statistics with the same network, so the ADM file's TF-computed `mu`/`sigma` are not needed (its port matches TF to
the digits FID reports). IS uses the logits of the same network over 10 splits, as ADM does.

Both come from one Inception pass per set through torch-fidelity's own steps, so the values are the ones
`torch_fidelity.calculate_metrics` reports; the generated set's pool features and logits, and the reference's
statistics, stay with the metrics as `arrays` for their bootstrap intervals and paired comparisons
(`evaluation.uncertainty`, docs/statistics.md).
"""

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from evaluation import metric
from evaluation.uncertainty import set_summary

log = logging.getLogger("foca_bench")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def default_inception_path() -> Path:
    """Where torch-fidelity itself would cache its Inception weights: `<torch hub dir>/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class Uint8Images(Dataset):
    """(N, H, W, C) uint8 arrays as torch-fidelity inputs: (3, H, W) uint8 tensors, grey images repeated."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def check_reference_batch(path: Path) -> tuple[int, ...]:
    """The shape of `arr_0` of an ADM-style reference batch, read from the npz's array header (no pixels load), so a
    damaged or wrong file fails before generation: `CorruptFileError` naming the file and the reader's error, or
    ValueError naming what is wrong with its arrays."""
    import zipfile

    from foca_bench.errors import CorruptFileError

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "arr_0.npy" not in names:
                raise ValueError(f"{path} has no `arr_0` (its arrays: {[n[:-4] for n in names]}); expected an ADM "
                                 "reference batch such as VIRTUAL_imagenet256_labeled.npz.")
            with z.open("arr_0.npy") as f:
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, _, dtype = read[np.lib.format.read_magic(f)](f)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as err:
        raise CorruptFileError(path, "The reference batch (benchmark.reference_path)", err, "Download it again "
                               "(datasets/imagenet_fid.md).") from err
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}; expected (N, H, W, 3) uint8 (an ADM reference batch).")
    return shape


def load_reference_batch(path: Path) -> np.ndarray:
    """`arr_0` of an ADM-style reference batch: (N, H, W, 3) uint8."""
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} has no `arr_0` (its arrays: {f.files}); expected an ADM reference batch such as "
                             "VIRTUAL_imagenet256_labeled.npz.")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}; expected (N, H, W, C) uint8.")
    return images


@torch.no_grad()
def fid_is(samples: np.ndarray, reference: np.ndarray, inception_path: Path, device: str = "cpu",
           batch_size: int = 64, isc_splits: int = 10, verbose: bool = True) -> dict:
    """FID and IS as `torch_fidelity.calculate_metrics(fid=True, isc=True)` computes them, from one Inception pass
    per set through torch-fidelity's own steps (its feature extractor, `extract_featuresdict_from_input_id`,
    `fid_featuresdict_to_statistics`, `fid_statistics_to_metric`, `isc_featuresdict_to_metric`), keeping the
    generated set's features and logits so that FID and IS get bootstrap intervals (`evaluation.uncertainty`).

    Args:
        samples, reference: (N, H, W, C) uint8.
        inception_path: torch-fidelity's Inception weights (its own `.pth` format).

    Returns:
        fid (lower is better) and is (higher), each with its `interval`, `statistic` and `arrays` (fid: the
        generated set's pool features (N, 2048) float32 and the reference's `real_mu`, `real_sigma` as
        torch-fidelity computes them; is: the logits (N, 1008) float32); `is_std` across splits.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
    from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id,
                                      resolve_feature_extractor, resolve_feature_layer_for_metric)

    splits = max(1, min(isc_splits, len(samples)))
    kwargs = dict(input1=Uint8Images(samples), input2=Uint8Images(reference), fid=True, isc=True, isc_splits=splits,
                  feature_extractor_weights_path=str(inception_path), cuda=device.startswith("cuda"),
                  batch_size=batch_size, cache=False, verbose=verbose, save_cpu_ram=True)
    pool, logits = resolve_feature_layer_for_metric("fid", **kwargs), resolve_feature_layer_for_metric("isc", **kwargs)
    extractor = create_feature_extractor(resolve_feature_extractor(**kwargs), [pool, logits], **kwargs)
    fake, real = (extract_featuresdict_from_input_id(i, extractor, **kwargs) for i in (1, 2))
    real_stats = fid_featuresdict_to_statistics(real, pool)
    fid = fid_statistics_to_metric(fid_featuresdict_to_statistics(fake, pool), real_stats, verbose)[KEY_METRIC_FID]
    isc = isc_featuresdict_to_metric(fake, logits, **kwargs)
    # kept as extracted (float32): 645 MB for FID-50k, beside its 9.8 GB samples.npz; float16 would save 300 MB but
    # move a recomputed FID by ~1e-5 relative (docs/statistics.md)
    fid_arrays = {"features": fake[pool].numpy(), "real_mu": real_stats["mu"], "real_sigma": real_stats["sigma"]}
    is_arrays = {"logits": fake[logits].numpy()}
    return {
        "fid": metric(fid, higher_is_better=False, **set_summary("fid", fid_arrays, progress=verbose)),
        "is": metric(isc[KEY_METRIC_ISC_MEAN], higher_is_better=True,
                     **set_summary(f"torch_fidelity_is/{splits}", is_arrays, progress=verbose)),
        "is_std": metric(isc[KEY_METRIC_ISC_STD], higher_is_better=False),
    }
