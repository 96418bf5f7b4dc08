"""FID, IS and class accuracy of generated digits with the shipped digit classifier as feature network.

FID is torchmetrics' `FrechetInceptionDistance` with the classifier's 64-d penultimate features in place of
Inception's; IS is `evaluation.uncertainty.inception_score` (torchmetrics' formula, splits over a fixed
shuffle) on its logits: the toy analogue of ImageNet FID-50k/IS. Toy-model numbers: not comparable to the paper's
ImageNet values. Intervals (`evaluation.uncertainty`): class accuracy over per-sample correctness; FID and IS by
resampling the generated set's classifier features and logits, which the metric keeps (`arrays`) so a paired
comparison can recompute them.
"""

import numpy as np
import torch
from torch import Tensor

from evaluation import metric
from evaluation.uncertainty import inception_score, set_summary, summary
from foca_bench.digit_classifier import DigitClassifier, FeatureView


@torch.no_grad()
def digit_metrics(fake: Tensor, labels: Tensor, real: Tensor, classifier: DigitClassifier,
                  batch_size: int = 256) -> dict:
    """Args:
        fake: generated images (N, 1, 16, 16) in [0, 1].
        labels: requested classes (N,).
        real: reference data set images (M, 1, 16, 16) in [0, 1].
        classifier: the feature network.

    Returns:
        fid (lower is better), is (higher), class_acc (higher).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # imported here: torchmetrics takes seconds

    fid = FrechetInceptionDistance(feature=FeatureView(classifier, "features"), reset_real_features=True)
    splits = 10 if len(fake) >= 100 else 1
    for chunk in real.split(batch_size):
        fid.update(chunk, real=True)
    correct, features, logits = [], [], []
    for chunk, chunk_labels in zip(fake.split(batch_size), labels.split(batch_size)):
        fid.update(chunk, real=False)
        features.append(classifier.features(chunk.float()))  # (B, 64)
        logits.append(classifier.head(features[-1]))  # (B, 10)
        correct.append(logits[-1].argmax(1) == chunk_labels)
    real_features = torch.cat([classifier.features(c.float()) for c in real.split(batch_size)]).double().numpy()
    fake_features, fake_logits = torch.cat(features).double().numpy(), torch.cat(logits).double().numpy()
    real_mu, real_sigma = real_features.mean(0), np.cov(real_features, rowvar=False)
    fid_arrays = {"features": fake_features.astype(np.float32), "real_mu": real_mu, "real_sigma": real_sigma}
    correct = torch.cat(correct).double().numpy()
    return {
        "fid": metric(fid.compute(), higher_is_better=False, **set_summary("fid", fid_arrays)),
        "is": metric(inception_score(fake_logits, splits), higher_is_better=True,
                     **set_summary(f"is/{splits}", {"logits": fake_logits.astype(np.float32)})),
        "class_acc": metric(correct.mean(), higher_is_better=True, **summary(correct)),
    }
