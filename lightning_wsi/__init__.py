"""lightning-wsi: end-to-end whole-slide training for PyTorch Lightning."""

from lightning_wsi.data import SlideDataModule
from lightning_wsi.models import SlideModule

__all__ = ["SlideDataModule", "SlideModule"]
__version__ = "0.1.0"
