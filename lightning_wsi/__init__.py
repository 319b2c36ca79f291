"""lightning-wsi: end-to-end whole-slide training for PyTorch Lightning.

Importing the package registers ``Trainer(strategy="slide_parallel")`` and its variants.
"""

from lightning_wsi import config  # noqa: F401 - registers the configs' Hydra resolvers
from lightning_wsi.data import SlideDataModule
from lightning_wsi.models import SlideModule
from lightning_wsi.strategies import SlideParallelStrategy

__all__ = ["SlideDataModule", "SlideModule", "SlideParallelStrategy"]
__version__ = "0.1.0"
