"""SlideDataModule: manifest -> validated, tiled slides -> per-rank slide loaders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_wsi.data.augment import TileAugment
from lightning_wsi.data.dataset import BagEntry, SlideDataset, SlideEntry, slides_of
from lightning_wsi.data.loader import DeferredDataLoader
from lightning_wsi.data.manifest import (
    BadSlide,
    ManifestError,
    SlideRecord,
    parse_survival,
    parse_target,
    read_manifest,
    stratified_split,
)
from lightning_wsi.data.manifest_tiling import SlideJob, TilingSummary, tile_many
from lightning_wsi.data.problems import (
    DEFAULT_MAX_BAD_TILE_FRACTION,
    Problem,
    ProblemLog,
    ProblemRecorder,
)
from lightning_wsi.data.processes import worker_context
from lightning_wsi.data.sampling import SlideSampler, check_part_size, slide_group
from lightning_wsi.data.slide import SlideError
from lightning_wsi.data.tiling import SlideTiles, check_tiling_params
from lightning_wsi.data.transfer import jitter_tiles, normalize_tiles

__all__ = ["BadSlideError", "SlideDataModule"]

_PRELOAD = ("lightning_wsi.data.dataset",)  # what a loader worker needs, imported once


class BadSlideError(ValueError):
    """Slides of the manifest cannot be used; the message lists every one with its reason."""

    def __init__(self, message: str, bad_slides: Sequence[BadSlide]) -> None:
        super().__init__(message)
        self.bad_slides = list(bad_slides)


class SlideDataModule(LightningDataModule):
    """Slides from a manifest, tiled at a target mpp, served one slide per batch.

    Setup reads the manifest, checks every row (file, format, mpp, tissue, label, split) and tiles
    the slides in parallel with an on-disk coordinate cache. Every bad row is reported at once;
    ``on_bad_slide="skip"`` trains without them, with a warning that names each, and keeps them
    in :attr:`bad_slides`.

    In training, each slide contributes K tiles sampled from ``(seed, epoch, slide)``; under a
    slide-parallel strategy (one whose ``slide_parallel`` attribute is true) every rank of a
    slide group (all ranks, unless the strategy's ``slide_group_size`` says fewer) gets the same
    slides in the same order and reads only its contiguous shard of the K tiles, and groups
    split the slides; under any other multi-process strategy the ranks split the slides.
    Evaluation takes all tiles of a slide (or ``eval_k`` spread evenly), in a fixed order.
    Without a Trainer it behaves as world size 1, epoch 0, as in a notebook.

    Args:
        manifest: CSV with ``slide_id``, ``path`` (relative to the CSV's folder or absolute),
            ``label``, optional ``split`` (train/val/test) and ``mpp``.
        k: tiles per slide in training; ``None`` or ``"all"``: every tissue tile of the slide
            in every step (in a fixed order, with the training augmentation), so memory then
            grows with the slide unless ``encode_chunk_size`` caches gradients.
        mpp: microns per pixel of the tiles (0.5 = 20x).
        tile_size: tile side in pixels.
        eval_k: cap on tiles per slide in evaluation; ``None`` takes all.
        eval_part_size: tiles per evaluation item: a slide's evaluation tiles come in
            consecutive parts of this many, read ahead by the loader's workers and collected
            per slide by the module (or strategy), so host memory is bounded by the part, not
            the slide. ``None``: one item per slide (all its tiles at once).
        train_part_size: tiles of a rank's shard per training item, under a strategy that
            streams training parts (one whose ``streams_training_parts`` is true:
            ``SlideParallelStrategy`` with ``encode_chunk_size``). It joins a slide's parts into
            one step, encoding each as it arrives and keeping its tiles in a spill file for the
            re-encode, so host memory is bounded by the part and the chunk, not by K. Under
            other strategies, or ``None``, a training item is a rank's whole shard.
        min_tissue_fraction: keep grid tiles with at least this much tissue.
        task: ``"binary"``, ``"multiclass"`` or ``"regression"``: how labels are checked.
        num_classes: number of classes for ``"multiclass"`` with integer labels.
        classes: class names when labels are names; a label's index in it is its target.
        split_seed: seed of the stratified split when the manifest has no ``split`` column.
        val_fraction: share of each class held out for validation by that split; 0 trains
            without validation.
        test_fraction: share of each class held out for testing by that split.
        seed: seed of tile sampling, slide order and augmentation.
        augment: flips and 90° rotations of training tiles.
        color_jitter: colour jitter strength for training tiles (0 disables).
        mean: normalisation mean; default from ``encoder``'s timm data config, else ImageNet's.
        std: normalisation std, as ``mean``.
        encoder: a timm model name whose pretrained config gives ``mean`` and ``std``.
        slide_mpp: level-0 mpp for slides whose file and manifest row give none.
        cache_dir: coordinate cache; default ``<manifest folder>/.tiles``.
        num_workers: loader worker processes (each reads whole slides).
        tiling_workers: processes for tiling; ``None`` uses every core.
        pin_memory: pin loaded tiles for faster host-to-GPU copies.
        on_bad_slide: ``"raise"`` or ``"skip"``.
        bag: ``"slide"`` (an item is a slide) or ``"patient"`` (an item is a patient's slides:
            K tiles sampled over the union of their tissue tiles, sharded across ranks like one
            slide's; needs a ``patient_id`` column, and a patient's slides must agree on the
            label). Splits are made by patient whenever ``patient_id`` is present.
        allow_patch_size_mismatch: For slides whose manifest ``coords`` file (a CLAM or
            TRIDENT ``.h5``) names another level-0 tile size than the run's: read the run's
            tile size at the file's corners instead of refusing the slide.
        allow_upsampling: Read tiles at an ``mpp`` finer than a slide's own (more than 10%
            finer): the tiles are upsampled, not more detailed. Refused by default, with the
            slide reported as bad.
        max_bad_tile_fraction: A tile that fails to read (after a retry with the slide reopened)
            is left out of its step; a slide with more than this share of a sample failing, or
            whose file vanishes, is dropped for the rest of the run. Every loss is recorded in
            :attr:`problems`.
        progress: show progress bars and print the tiling summary.
        predict_splits: splits ``predict_dataloader`` covers (e.g. ``["val"]``); all by default.
        require_labels: ``False`` accepts slides without a label (no ``label`` column or an
            empty one) for prediction; their items carry no ``target``, and slides without a
            ``split`` all go to ``train``, as nothing is fitted on them.

    Example:
        >>> import tempfile
        >>> from lightning_wsi.data import make_synthetic_dataset
        >>> manifest = make_synthetic_dataset(tempfile.mkdtemp(), n_slides=4, progress=False)
        >>> dm = SlideDataModule(manifest, k=8, tile_size=64, val_fraction=0.5, progress=False)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["tiles"].shape, batch["coords"].shape
        (torch.Size([8, 3, 64, 64]), torch.Size([8, 2]))
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        k: int | Literal["all"] | None = 64,
        mpp: float = 0.5,
        tile_size: int = 224,
        *,
        eval_k: int | None = None,
        eval_part_size: int | None = 1024,
        train_part_size: int | None = 1024,
        min_tissue_fraction: float = 0.5,
        task: Literal["binary", "multiclass", "regression", "ordinal", "survival"] = "binary",
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.25,
        test_fraction: float = 0.0,
        seed: int = 0,
        augment: bool = True,
        color_jitter: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        encoder: str | None = None,
        slide_mpp: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int = 0,
        tiling_workers: int | None = None,
        pin_memory: bool = False,
        on_bad_slide: Literal["raise", "skip"] = "raise",
        max_bad_tile_fraction: float = DEFAULT_MAX_BAD_TILE_FRACTION,
        allow_upsampling: bool = False,
        bag: Literal["slide", "patient"] = "slide",
        allow_patch_size_mismatch: bool = False,
        progress: bool = True,
        predict_splits: Sequence[str] | None = None,
        require_labels: bool = True,
    ) -> None:
        super().__init__()
        # Recorded in checkpoints, so prediction reads tiles as training did (mpp, size, mean/std).
        # The resolved mean/std are stored rather than the encoder name, which would clash with
        # the module's own `encoder` hyperparameter in Lightning's merged hparams.
        self.save_hyperparameters(ignore=["encoder", "mean", "std"])
        # Paths are stored as text: a checkpoint must load with torch.load(weights_only=True).
        for key in ("manifest", "cache_dir"):
            if self.hparams.get(key) is not None:
                self.hparams[key] = str(self.hparams[key])
        if on_bad_slide not in ("raise", "skip"):
            raise ValueError(f"on_bad_slide must be 'raise' or 'skip', got {on_bad_slide!r}")
        k = _tiles_per_slide(k)
        if eval_k is not None and eval_k < 1:
            raise ValueError(f"eval_k must be >= 1 or None (all tiles), got eval_k={eval_k}")
        check_part_size(eval_part_size)
        check_part_size(train_part_size, "train_part_size")
        self.eval_part_size, self.train_part_size = eval_part_size, train_part_size
        check_tiling_params(mpp, tile_size, min_tissue_fraction)  # before any slide is read
        self.manifest = Path(manifest)
        self.k, self.eval_k, self.mpp, self.tile_size = k, eval_k, mpp, tile_size
        self.min_tissue_fraction = min_tissue_fraction
        self.task, self.num_classes = task, num_classes
        self.classes = list(classes) if classes is not None else None
        self.split_seed, self.val_fraction, self.test_fraction = (
            split_seed,
            val_fraction,
            test_fraction,
        )
        self.seed = seed
        self.augment = TileAugment(dihedral=augment, color_jitter=color_jitter)
        self.mean, self.std = _normalisation(mean, std, encoder)
        self.hparams.update(mean=list(self.mean), std=list(self.std))
        self.slide_mpp = slide_mpp
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else self.manifest.parent / ".tiles"
        )
        self.num_workers, self.tiling_workers, self.pin_memory = (
            num_workers,
            tiling_workers,
            pin_memory,
        )
        self.on_bad_slide = on_bad_slide
        if not 0.0 <= max_bad_tile_fraction < 1.0:
            raise ValueError(
                f"max_bad_tile_fraction must lie in [0, 1), got {max_bad_tile_fraction}"
            )
        self.max_bad_tile_fraction = max_bad_tile_fraction
        self.allow_upsampling = allow_upsampling
        if bag not in ("slide", "patient"):
            raise ValueError(f"bag must be 'slide' or 'patient', got {bag!r}")
        self.bag = bag
        self.allow_patch_size_mismatch = allow_patch_size_mismatch
        unknown = set(predict_splits or ()) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"predict_splits must be train/val/test, got {sorted(unknown)}")
        self.predict_splits = list(predict_splits) if predict_splits is not None else None
        self.require_labels = require_labels
        self.progress = progress
        self.bad_slides: list[BadSlide] = []
        self.problems = ProblemLog()  # every bad slide, left-out tile and dropped slide
        self.splits: dict[str, list[SlideEntry]] = {}
        self.tiling_summary: TilingSummary | None = None
        self._tiling: tuple[list[SlideRecord], list[BadSlide], TilingSummary] | None = None

    # ---------------------------------------------------------------- loading and validation
    @override
    def prepare_data(self) -> None:
        """Tile every slide once per node, so each rank's ``setup`` finds a warm cache."""
        self._tile_manifest()

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self._load()
        self._attach_recorder()
        # val_fraction=0 says "no validation": fit then runs without a val split.
        fit = ("train", "val") if self.val_fraction > 0 else ("train",)
        needed = {"fit": fit, "validate": ("val",), "test": ("test",)}
        for split in needed.get(stage or "fit", ()):
            if not self.splits[split]:
                raise ManifestError(
                    f"split {split!r} of manifest {self.manifest} has no usable slide "
                    f"(stage {stage!r}); give rows split={split} or set val_fraction/test_fraction"
                )

    def _attach_recorder(self) -> None:
        """Give the trainer a callback that records what each loaded slide reports (once)."""
        trainer = self.trainer
        if trainer is None or any(
            isinstance(c, ProblemRecorder) and c.problems is self.problems
            for c in trainer.callbacks
        ):
            return
        paths = {
            m.slide_id: m.path
            for split in self.splits.values()
            for e in split
            for m in slides_of(e)
        }
        trainer.callbacks.append(ProblemRecorder(self.problems, paths))

    def _tile_manifest(self) -> tuple[list[SlideRecord], list[BadSlide], TilingSummary]:
        if self._tiling is None:
            survival = self.task == "survival"
            records, bad = read_manifest(
                self.manifest,
                require_labels=self.require_labels and not survival,
                required=("time", "event") if survival and self.require_labels else (),
            )
            jobs = [
                SlideJob(r.slide_id, r.path, r.mpp or self.slide_mpp, r.coords) for r in records
            ]
            summary = tile_many(
                jobs,
                num_workers=self.tiling_workers,
                progress=self.progress,
                mpp=self.mpp,
                tile_size=self.tile_size,
                min_tissue_fraction=self.min_tissue_fraction,
                cache_dir=self.cache_dir,
                allow_upsampling=self.allow_upsampling,
                allow_patch_size_mismatch=self.allow_patch_size_mismatch,
            )
            if self.progress and summary.n_cached < len(jobs):
                print(f"{summary}; coordinates cached in {self.cache_dir}")
            self._tiling, self.tiling_summary = (records, bad, summary), summary
        return self._tiling

    def _load(self) -> dict[str, list[SlideEntry]]:
        records, bad_rows, summary = self._tile_manifest()
        bad = list(bad_rows)
        good: list[tuple[SlideRecord, SlideEntry]] = []
        for record, tiles in zip(records, summary.results, strict=True):
            try:
                target = None
                target = self._target(record)
            except ValueError as err:
                if self.require_labels:
                    bad.append(BadSlide(record.slide_id, record.path, str(err)))
                    continue
                # Prediction needs no label: a readable slide is predicted, its label reported.
                self.problems.add(
                    Problem("label ignored", record.slide_id, record.path, str(err), stage="setup")
                )
            if isinstance(tiles, SlideError):
                bad.append(BadSlide(record.slide_id, record.path, str(tiles)))
            elif len(tiles) == 0:
                bad.append(BadSlide(record.slide_id, record.path, _no_tissue(tiles, self)))
            else:
                good.append((record, SlideEntry(record.slide_id, record.path, target, tiles)))
        self._report_uncached(records, summary)
        self._report_bad(bad, n_rows=len(records) + len(bad_rows))
        splits = self._assign_splits(good)
        by_split = {
            name: [pair for pair, s in zip(good, splits, strict=True) if s == name]
            for name in ("train", "val", "test")
        }
        if self.bag == "patient":
            return {name: self._bags(pairs) for name, pairs in by_split.items()}
        return {name: [e for _, e in pairs] for name, pairs in by_split.items()}

    def _bags(self, pairs: list[tuple[SlideRecord, SlideEntry]]) -> list[BagEntry]:
        """One item per patient, in order of first appearance (splits keep patients whole)."""
        patients: dict[str, list[tuple[SlideRecord, SlideEntry]]] = {}
        for record, entry in pairs:
            if record.patient_id is None:
                raise ManifestError(
                    f"manifest {self.manifest}: bag='patient' needs a patient_id for every row; "
                    f"slide {record.slide_id!r} (line {record.row}) has none"
                )
            patients.setdefault(record.patient_id, []).append((record, entry))
        bags = []
        for patient, members in patients.items():
            targets = {entry.target for _, entry in members}
            if len(targets) > 1:
                listed = ", ".join(f"{e.slide_id}: {e.target}" for _, e in members)
                raise ManifestError(
                    f"manifest {self.manifest}: the slides of patient {patient!r} disagree on "
                    f"the label ({listed}); a patient bag has one label: fix the rows or use "
                    "bag='slide'"
                )
            bags.append(BagEntry(patient, members[0][1].target, tuple(e for _, e in members)))
        return bags

    def _target(self, record: SlideRecord) -> int | float | tuple[float, float] | None:
        """The slide's target: a class or value from ``label``, or ``(time, event)`` for survival;
        ``None`` for an unlabeled slide when labels are not required."""
        if self.task == "survival":
            if not (record.time or record.event) and not self.require_labels:
                return None
            return parse_survival(record.time, record.event)
        if record.label or self.require_labels:
            return parse_target(record.label, self.task, self.classes, self.num_classes)
        return None

    def training_targets(self) -> list[Any]:
        """The targets of the training split (e.g. a survival task's time bins come from them)."""
        if not self.splits:
            self.splits = self._load()
        return [entry.target for entry in self.splits["train"]]

    def _assign_splits(self, good: list[tuple[SlideRecord, SlideEntry]]) -> list[str]:
        """Each slide's split. With a ``patient_id`` column, a patient's slides are one unit:
        never in two splits (a given split that does so is an error naming the patient)."""
        given = [record.split for record, _ in good]
        if not self.require_labels:  # nothing is fitted: keep given splits, the rest in train
            return [split or "train" for split in given]
        if any(given):
            missing = [r.slide_id for r, _ in good if not r.split]
            if missing:
                raise ManifestError(
                    f"manifest {self.manifest}: rows {missing} have no split while others do; "
                    "give every row a split (train/val/test) or drop the column"
                )
            self._check_patients_in_one_split(good)
            return given
        groups: dict[str, list[int]] = {}
        for i, (record, _) in enumerate(good):
            groups.setdefault(record.patient_id or f"\0slide:{record.slide_id}", []).append(i)
        members = list(groups.values())
        split_of_group = stratified_split(
            [_stratum(good[m[0]][1].target) for m in members],
            seed=self.split_seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
        )
        splits = [""] * len(good)
        for group, split in zip(members, split_of_group, strict=True):
            for i in group:
                splits[i] = split
        return splits

    def _check_patients_in_one_split(self, good: list[tuple[SlideRecord, SlideEntry]]) -> None:
        seen: dict[str, SlideRecord] = {}
        for record, _ in good:
            if record.patient_id is None:
                continue
            first = seen.setdefault(record.patient_id, record)
            if first.split != record.split:
                raise ManifestError(
                    f"manifest {self.manifest}: patient {record.patient_id!r} has slide "
                    f"{first.slide_id!r} in {first.split!r} and slide {record.slide_id!r} in "
                    f"{record.split!r}; give all of a patient's slides one split, or drop the "
                    "split column to split by patient"
                )

    def _report_uncached(self, records: list[SlideRecord], summary: TilingSummary) -> None:
        """A cache that cannot be written costs speed, not slides: one warning for the run."""
        failed = [
            (record, tiles.cache_error)
            for record, tiles in zip(records, summary.results, strict=True)
            if isinstance(tiles, SlideTiles) and tiles.cache_error
        ]
        for record, error in failed:
            self.problems.add(Problem("cache", record.slide_id, record.path, error, stage="setup"))
        if failed and self._is_global_zero():
            warnings.warn(
                f"the tile cache {self.cache_dir} cannot be written ({failed[0][1]}); "
                f"{len(failed)} slides were tiled without caching and will be tiled again next "
                "run. Give a writable cache_dir to keep their coordinates.",
                stacklevel=3,
            )

    def _is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def _report_bad(self, bad: list[BadSlide], n_rows: int) -> None:
        self.bad_slides = bad
        for b in bad:
            self.problems.add(Problem("bad slide", b.slide_id, b.path, b.reason, stage="setup"))
        if not bad:
            return
        listing = "\n".join(f"  {b}" for b in bad)
        if self.on_bad_slide == "raise":
            raise BadSlideError(
                f"{len(bad)} of {n_rows} slides in manifest {self.manifest} cannot be used:\n"
                f"{listing}\nFix or remove these rows, or pass on_bad_slide='skip' to go on "
                "without them.",
                bad,
            )
        if self._is_global_zero():  # a plain line, not a warning: filters must not hide it
            print(
                f"skipping {len(bad)} of {n_rows} slides in manifest {self.manifest} "
                f"(on_bad_slide='skip'); they are in SlideDataModule.bad_slides and the "
                f"problem record:\n{listing}",
                flush=True,
            )

    # ------------------------------------------------------------------------- loaders
    def _placement(self) -> tuple[int, int, int]:
        """(rank, world size, ranks per slide) from the attached trainer, or a lone process.

        Under a slide-parallel strategy (``slide_parallel`` true) groups of its
        ``slide_group_size`` ranks share a slide (``None``: all ranks); under any other
        strategy every rank has its own slides (groups of one).
        """
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 1
        rank, world, strategy = trainer.global_rank, trainer.world_size, trainer.strategy
        if not getattr(strategy, "slide_parallel", False):
            return rank, world, 1
        size = getattr(strategy, "slide_group_size", None)
        return rank, world, world if size is None else size

    def _streams_training_parts(self) -> bool:
        """The trainer's strategy joins training parts into steps (and wants them)."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        return self.train_part_size is not None and bool(
            getattr(strategy, "streams_training_parts", False)
        )

    def _epoch(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_progress.current.processed

    def _loader(self, split: str | None, train: bool) -> DataLoader:
        if not self.splits:
            self.splits = self._load()
        if split is None:
            chosen = self.predict_splits or ["train", "val", "test"]
            slides = [e for s in ("train", "val", "test") if s in chosen for e in self.splits[s]]
        else:
            slides = self.splits[split]
        if not slides:
            raise ManifestError(f"split {split!r} of manifest {self.manifest} has no usable slide")
        rank, world, group_size = self._placement()
        group = slide_group(rank, world, group_size)  # its slides, and its shard of their tiles
        if not train and len(slides) < group.count:  # a group without a slide would skip the
            raise ManifestError(  # loop's end, where the others gather metrics: a hang
                f"split {split or 'predict'!r} of manifest {self.manifest} has {len(slides)} "
                f"slides, fewer than the {group.count} groups of ranks that evaluate slides side "
                f"by side ({world} ranks, {group.size} per slide); every group needs one: use "
                "fewer groups (a larger strategy.slide_group_size) or more slides"
            )
        streams = self._streams_training_parts()
        dataset = SlideDataset(
            slides,
            k=self.k if train else None,
            eval_k=None if train else self.eval_k,  # k=None in training: every tile, uncapped
            seed=self.seed,
            shard_rank=group.rank,
            shard_count=group.size,
            augment=self.augment if train else None,
            max_bad_tile_fraction=self.max_bad_tile_fraction,
            part_size=None if train else self.eval_part_size,
            train_part_size=self.train_part_size if train and streams else None,
        )
        index = {entry.slide_id: i for i, entry in enumerate(slides)}

        def dropped() -> dict[int, str]:
            return {index[s]: r for s, r in self.problems.dropped.items() if s in index}

        sampler = SlideSampler(
            len(slides),
            shuffle=train,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            group_size=group_size,
            pad=train,
            epoch_source=self._epoch if train and self.trainer is not None else None,
            dropped_source=dropped,
            parts=None if dataset.part_size is None else _parts_of(dataset),
        )
        loader_class = DeferredDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_context(_PRELOAD) if self.num_workers else None,
        )

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: uint8 tiles become normalised float (and colour-jittered in training).

        Without a Trainer, call it on a loaded batch to get what the model sees.

        A module that normalises its own uint8 input (``SlideModule``: its
        ``set_tile_normalisation``) under this data module's Trainer gets the tiles as uint8
        (jittered in chunks) and this module's mean and std: they become float a chunk at a time
        where they are encoded, so a slide's tiles take a quarter of the device memory.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        takes_uint8 = getattr(module, "set_tile_normalisation", None)
        if callable(takes_uint8):
            takes_uint8(self.mean, self.std)
            return jitter_tiles(batch)
        return normalize_tiles(batch, self.mean, self.std)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        if self.val_fraction == 0 and self.splits and not self.splits["val"]:
            return []  # no validation asked for: Lightning skips the loop
        return self._loader("val", train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """Every usable slide of the splits in ``predict_splits`` (default: all of them)."""
        return self._loader(None, train=False)


def _parts_of(dataset: SlideDataset) -> list[int]:
    """Items (parts) of each of the dataset's slides."""
    return [dataset.num_parts(i) for i in range(len(dataset))]


def _stratum(target: Any) -> int | float:
    """What a split stratifies on: the class, the value, or a survival target's event."""
    return int(target[1]) if isinstance(target, tuple) else target


def _no_tissue(tiles: SlideTiles, dm: SlideDataModule) -> str:
    if tiles.note:  # e.g. a grayscale slide, which saturation-based detection cannot see
        return f"no tissue tile: {tiles.note}"
    return (
        f"no tissue tile (min_tissue_fraction={dm.min_tissue_fraction}, {dm.tile_size} px at "
        f"{dm.mpp} mpp = {tiles.tile_size_level0} level-0 px on a {tiles.dimensions[0]}x"
        f"{tiles.dimensions[1]} slide at {tiles.slide_mpp} mpp)"
    )


def _tiles_per_slide(k: object) -> int | None:
    """``k`` as an int >= 1, or ``None`` for every tissue tile (``None`` or ``"all"``)."""
    if k is None or (isinstance(k, str) and k.strip().lower() == "all"):
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"k (K in the training config) must be an integer >= 1, or 'all' (every tissue "
            f"tile), got {k!r}"
        )
    return k


def _normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, encoder: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Explicit values first, then the encoder's timm pretrained config, then ImageNet's."""
    default_mean, default_std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    if encoder is not None:
        cfg = timm.get_pretrained_cfg(encoder)
        if cfg is None:
            raise ValueError(
                f"timm knows no pretrained config for encoder {encoder!r}; give mean and std"
            )
        default_mean, default_std = cfg.mean, cfg.std
    mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
    std = tuple(float(v) for v in (std if std is not None else default_std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0), got {mean} and {std}")
    return mean, std
