"""foca-bench: a reference harness for training-free feature caching in Diffusion Transformers.

Reproduces FoCa ("Forecast then Calibrate", arXiv:2508.16211) and the caching baselines it compares against.
"""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
