"""FID, IS and class accuracy of generated digits with the shipped digit classifier as feature network.

FID and IS are torchmetrics' implementations (`FrechetInceptionDistance`, `InceptionScore`) with the
classifier's 64-d penultimate features and its logits in place of Inception's: the toy analogue of ImageNet
FID-50k/IS. Toy-model numbers: not comparable to the paper's ImageNet values.
"""

import torch
from torch import Tensor

from evaluation import metric
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
    from torchmetrics.image.inception import InceptionScore

    fid = FrechetInceptionDistance(feature=FeatureView(classifier, "features"), reset_real_features=True)
    splits = 10 if len(fake) >= 100 else 1
    inception = InceptionScore(feature=FeatureView(classifier, "logits"), splits=splits)
    for chunk in real.split(batch_size):
        fid.update(chunk, real=True)
    correct = 0
    for chunk, chunk_labels in zip(fake.split(batch_size), labels.split(batch_size)):
        fid.update(chunk, real=False)
        inception.update(chunk)
        correct += (classifier(chunk).argmax(1) == chunk_labels).sum().item()
    with torch.random.fork_rng():  # torchmetrics' IS shuffles with the global RNG: seed it for reproducible records
        torch.manual_seed(0)
        is_mean, _ = inception.compute()
    return {
        "fid": metric(fid.compute(), higher_is_better=False),
        "is": metric(is_mean, higher_is_better=True),
        "class_acc": metric(correct / len(fake), higher_is_better=True),
    }
