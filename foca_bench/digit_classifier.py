"""A small CNN digit classifier: the feature network of the toy FID/IS benchmark (stands in for Inception).

Its penultimate activations (64-d) play Inception's pool features for FID; its logits play Inception's logits
for IS and give the class accuracy of generated samples.
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from foca_bench import ASSETS_DIR

CLASSIFIER_DIR = ASSETS_DIR / "digit_classifier"


class DigitClassifier(nn.Module):
    """CNN on (B, 1, 16, 16) images in [0, 1]."""

    num_features = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),  # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),  # (B, 64, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, 10)


class FeatureView(nn.Module):
    """Exposes one output of the classifier to torchmetrics' FID (`features`) or IS (`logits`)."""

    def __init__(self, classifier: DigitClassifier, output: str) -> None:
        super().__init__()
        self.classifier = classifier
        self.output = output
        self.num_features = classifier.num_features if output == "features" else classifier.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        return self.classifier.features(x) if self.output == "features" else self.classifier(x)


def save_classifier(model: DigitClassifier, path: Path, info: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def load_classifier(path: Path = CLASSIFIER_DIR) -> DigitClassifier:
    """Loads the shipped classifier.

    Raises:
        FileNotFoundError: naming the path and the make target that produces it.
    """
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"Digit classifier weights not found at {weights}. Run `make toy-model` to train them "
            "(seconds on a CPU); they normally ship with the repository."
        )
    model = DigitClassifier()
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)
