"""One rank of a 2-process slide-parallel run in which something fails on one rank only.

    python run_failure.py CASE    (MASTER_PORT, WORLD_SIZE, LOCAL_RANK... set by the test)

Cases: ``loss`` (rank 0's loss raises), ``target`` (a slide without a target: rank 0's target
lookup raises), ``read`` (rank 1's loader raises while reading a slide), ``encode`` (rank 1's
encoder raises), ``val`` (rank 0's aggregator raises during validation).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from slide_batches import make_slides  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402

from lightning_wsi import SlideModule, SlideParallelStrategy  # noqa: E402

CASE = sys.argv[1] if __name__ == "__main__" else ""
FAIL_AT = 2  # the training step (or validation slide) at which the failure happens


class FailingModule(SlideModule):
    def __init__(self) -> None:
        super().__init__("test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 16})
        self.steps = 0

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        if CASE == "encode" and dist.get_rank() == 1 and self.training and self.steps == FAIL_AT:
            raise RuntimeError("encoder blew up on rank 1")
        return super().encode(tiles)

    def aggregate(self, features: torch.Tensor, coords: Any = None) -> Any:
        if CASE == "val" and not self.training:
            raise ValueError("aggregator cannot handle this validation slide")
        return super().aggregate(features, coords)

    def slide_loss(self, output: Any, batch: Any) -> torch.Tensor:
        if CASE == "loss" and self.steps == FAIL_AT:
            raise FloatingPointError(f"loss exploded on slide {batch['slide_id']}")
        return super().slide_loss(output, batch)

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


class Slides(Dataset):
    def __init__(self, slides: list[dict[str, Any]]) -> None:
        self.slides = slides

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if CASE == "read" and dist.get_rank() == 1 and i == FAIL_AT:
            slide_id = self.slides[i]["slide_id"]
            raise OSError(f"cannot read tile 3 of {slide_id}: Bogus marker length")
        slide = dict(self.slides[i])
        if CASE == "target" and i == FAIL_AT:
            del slide["target"]
        return slide


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    slides = Slides(make_slides(5, k=6))
    order = DistributedSampler(slides, num_replicas=1, rank=0, shuffle=False)
    loader = DataLoader(slides, batch_size=None, sampler=order)
    val = DataLoader(make_slides(3, k=4, seed=1), batch_size=None) if CASE == "val" else None
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=SlideParallelStrategy(), max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(FailingModule(), loader, val)


if __name__ == "__main__":
    main()
