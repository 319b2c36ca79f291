"""lightning-wsi: end-to-end whole-slide training for PyTorch Lightning."""

from lightning_wsi.data import SlideDataModule

__all__ = ["SlideDataModule"]
__version__ = "0.1.0"
