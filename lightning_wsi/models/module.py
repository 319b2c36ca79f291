"""SlideModule: a tile encoder and a slide aggregator trained end-to-end on one slide per step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torchmetrics import MetricCollection
from typing_extensions import override

from lightning_wsi.data.parts import CollectedSlide, SlideParts, whole_slide_batch
from lightning_wsi.data.problems import dropped_prediction, set_slide_problem
from lightning_wsi.data.transfer import normalize
from lightning_wsi.models.aggregators import AggregatorOutput, build_aggregator
from lightning_wsi.models.encoders import build_encoder, encoder_feature_dim
from lightning_wsi.models.lora import apply_lora, lora_options
from lightning_wsi.models.optim import WarmupCosine, layer_ids, param_groups
from lightning_wsi.models.tasks import Task, build_task

__all__ = ["SlideModule"]

_STAGES = ("val", "test")
_LR_SCHEDULES = ("cosine", "constant")


class SlideModule(L.LightningModule):
    """A tile encoder and a slide aggregator trained together from slide labels.

    A batch is one slide: a mapping with ``tiles`` ``[k, 3, H, W]`` (float, normalised), ``coords``
    ``[k, 2]`` (int64 level-0 ``x, y``), ``target`` (0-d) and ``slide_id``; feed it with
    ``DataLoader(..., batch_size=None)``. The module holds ``.encoder`` (the tile encoder) and
    ``.aggregator`` (aggregator and head as one module), so checkpoint keys start with
    ``encoder.`` and ``aggregator.``.

    Protocol for strategies (the module itself holds no distributed code). ``training_step`` is the
    single-process reference, made only of these public steps, which a strategy may call separately
    (e.g. ``encode`` on every rank's shard, the rest on rank 0):

    - ``encode(tiles [k, 3, H, W]) -> [k, D]``: the encoder under the current grad mode.
    - ``encode_in_chunks(tiles, chunk_size=None) -> [k, D]``: the same without autograd,
      ``chunk_size`` tiles at a time (default ``eval_chunk_size``).
    - ``aggregate(features [K, D], coords [K, 2] | None) -> AggregatorOutput`` (``logits`` ``[C]``,
      ``attention`` ``[K]`` or ``None``).
    - ``slide_loss(output, batch) -> 0-d tensor``.
    - ``log_train_loss(loss)``: logs ``train/loss`` (batch size 1).
    - ``evaluate_output(output, batch, stage) -> loss``: ``stage`` in ``{"val", "test"}``; logs
      ``{stage}/loss``, updates the task's metrics and logs them per epoch (``val/auroc``, ...).
    - ``predict_output(output, batch) -> dict``: what ``predict_step`` returns.

    Frozen BatchNorm (default): BatchNorm layers are replaced at construction by
    ``FrozenBatchNorm``, which always normalises with its running statistics whatever the module's
    mode, and whose affine parameters still train. A tile's features then do not depend on the other
    tiles in its forward pass, which exact slide-parallel and chunked gradients need.

    Checkpoints: ``save_hyperparameters`` records every argument, so a module configured by strings
    (``SlideModule.load_from_checkpoint(path)``) rebuilds itself. ``encoder``, ``aggregator`` or
    ``task`` passed as objects are not recorded: pass the same objects again to
    ``load_from_checkpoint(path, encoder=..., ...)``. ``pretrained`` and ``checkpoint_path`` are
    cleared in saved checkpoints, since their weights are in the state dict.

    Fine-tuning: the whole encoder (default), none of it (``freeze_encoder``), its last blocks
    (``train_last_n_blocks``), or LoRA adapters (``lora``, see ``models.lora``), at most one of
    the three. With ``lora`` the state dict holds the base and adapter weights
    (``encoder.blocks.0.attn.qkv.base_layer.weight``, ``...lora_A.default.weight``) and loads back
    into a module built with the same ``lora``, as ``load_from_checkpoint`` does from the saved
    hyper-parameters; ``models.lora.export_merged_encoder`` writes a plain timm weights file.

    Args:
        encoder: A timm model name (created with ``num_classes=0``) or a module mapping
            ``[k, 3, H, W]`` to ``[k, D]``; ``D`` is its ``num_features`` (else found by a dummy
            forward at 224 px).
        aggregator: "gma", "transformer", "mean", or a module called as
            ``aggregator(features [K, D], coords [K, 2])`` returning an ``AggregatorOutput``, a
            ``(logits, attention)`` tuple or ``logits`` ``[C]``, ``C`` being the task's
            ``num_outputs``.
        task: "binary", "multiclass", "regression" or a ``Task``.
        num_classes: Classes of a "multiclass" task.
        encoder_kwargs: Extra ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``).
        aggregator_kwargs: Extra aggregator arguments (``hidden_dim``, ``dropout``, ...).
        pretrained: timm's pretrained weights (needs a model hub).
        checkpoint_path: Local encoder weights file (a state dict or a Lightning checkpoint).
        freeze_encoder: Freeze the encoder and keep it in eval mode (frozen-encoder MIL baseline).
        train_last_n_blocks: Train only the encoder's last N blocks (timm ``group_matcher`` groups).
        freeze_batchnorm: Keep BatchNorm statistics frozen (see above). ``False`` gives batch
            statistics in training, which slide-parallel training cannot reproduce exactly.
        grad_checkpointing: Activation checkpointing in the encoder.
        channels_last: Channels-last encoder weights and tiles.
        encoder_lr: AdamW learning rate of the encoder.
        aggregator_lr: AdamW learning rate of the aggregator and head.
        weight_decay: AdamW weight decay (not applied to biases and norm parameters).
        warmup_fraction: Share of the optimiser steps spent in linear warm-up.
        warmup_steps: Warm-up steps; overrides ``warmup_fraction`` when given.
        lr_schedule: "cosine" (warm-up, then cosine to 0 over ``estimated_stepping_batches``) or
            "constant" (no scheduler).
        eval_chunk_size: Tiles encoded at a time in validation, test and predict.
        lora: LoRA adapters on the encoder, applied after it is built: a mapping with keys
            ``rank``, ``alpha``, ``targets``, ``dropout``, ``train_norms`` (``apply_lora``'s
            arguments, defaults for those left out). Only the adapters (plus the norms with
            ``train_norms``) and the aggregator train. Needs peft.
        layer_decay: Layer-wise learning-rate decay in (0, 1] of the encoder (``param_groups``):
            the last block at ``encoder_lr``, each block below it ``layer_decay`` times less.

    Example:
        >>> module = SlideModule("test_resnet", "gma", "binary")
        >>> tiles, coords = torch.randn(6, 3, 32, 32), torch.zeros(6, 2, dtype=torch.long)
        >>> out = module.aggregate(module.encode(tiles), coords)
        >>> out.logits.shape, out.attention.shape
        (torch.Size([1]), torch.Size([6]))
    """

    def __init__(
        self,
        encoder: str | nn.Module,
        aggregator: str | nn.Module,
        task: str | Task,
        num_classes: int | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
        aggregator_kwargs: Mapping[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | Path | None = None,
        freeze_encoder: bool = False,
        train_last_n_blocks: int | None = None,
        freeze_batchnorm: bool = True,
        grad_checkpointing: bool = False,
        channels_last: bool = False,
        encoder_lr: float = 1e-4,
        aggregator_lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.05,
        warmup_steps: int | None = None,
        lr_schedule: str = "cosine",
        eval_chunk_size: int = 256,
        lora: Mapping[str, Any] | None = None,
        layer_decay: float | None = None,
    ) -> None:
        super().__init__()
        objects = {"encoder": encoder, "aggregator": aggregator, "task": task}
        self.save_hyperparameters(ignore=[k for k, v in objects.items() if not isinstance(v, str)])
        if lr_schedule not in _LR_SCHEDULES:
            raise ValueError(
                f"Expected `lr_schedule` in {list(_LR_SCHEDULES)}, got {lr_schedule!r}."
            )
        if eval_chunk_size < 1:
            raise ValueError(f"Expected a positive `eval_chunk_size`, got {eval_chunk_size}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"Expected `warmup_fraction` in [0, 1), got {warmup_fraction}.")
        _check_finetuning(lora, freeze_encoder, train_last_n_blocks, layer_decay)
        lora_kwargs = None if lora is None else lora_options(lora)  # before building the encoder
        self.task = _as_task(task, num_classes)
        self.encoder = build_encoder(
            encoder,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            encoder_kwargs=encoder_kwargs,
            freeze=freeze_encoder,
            train_last_n_blocks=train_last_n_blocks,
            freeze_batchnorm=freeze_batchnorm,
            grad_checkpointing=grad_checkpointing,
            channels_last=channels_last,
        )
        if lora_kwargs is not None:
            self.encoder = apply_lora(self.encoder, **lora_kwargs)
        if layer_decay is not None:
            layer_ids(self.encoder, layer_decay)  # checks it now rather than when fit starts
        self.feature_dim = encoder_feature_dim(self.encoder)
        self.aggregator = _as_aggregator(
            aggregator, self.feature_dim, self.task.num_outputs, aggregator_kwargs
        )
        self.freeze_encoder = freeze_encoder
        self.channels_last = channels_last
        self.eval_chunk_size = eval_chunk_size
        self.tile_normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._eval_parts = SlideParts()  # a slide's evaluation parts (eval_part_size)
        self.val_metrics = MetricCollection(self.task.metrics(), prefix="val/")
        self.test_metrics = MetricCollection(self.task.metrics(), prefix="test/")

    # ----------------------------------------------------------------- composable steps

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Encode tiles ``[k, 3, H, W]`` to features ``[k, D]`` (autograd as the caller's mode)."""
        if tiles.ndim != 4:
            raise ValueError(
                f"Expected `tiles` of shape [k, 3, H, W] (one slide per batch: use "
                f"DataLoader(batch_size=None)), got {tuple(tiles.shape)}."
            )
        if tiles.dtype == torch.uint8 and self.tile_normalisation is not None:
            tiles = normalize(tiles, *self.tile_normalisation)  # this chunk only
        if not tiles.is_floating_point():
            raise ValueError(
                f"Expected normalised float tiles, got {tiles.dtype}: SlideDataModule sends uint8 "
                "tiles and normalises them in `on_after_batch_transfer`, which the Trainer calls; "
                "without a Trainer call `datamodule.on_after_batch_transfer(batch, 0)` first, or "
                "module.set_tile_normalisation(mean, std) to pass uint8 tiles."
            )
        if self.channels_last:
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        features = self.encoder(tiles)
        if features.ndim != 2 or features.shape[0] != tiles.shape[0]:
            raise ValueError(
                f"Expected the encoder to return [k, D] = [{tiles.shape[0]}, D] features, "
                f"got {tuple(features.shape)}."
            )
        return features

    def set_tile_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise uint8 tiles in :meth:`encode`, a chunk at a time, with this mean and std
        (per channel, for pixels in [0, 1]). ``SlideDataModule`` calls it under a Trainer and
        then hands over uint8 tiles, so a slide's tiles stay 1 byte per value on the device."""
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {mean} and {std}")
        self.tile_normalisation = (mean, std)

    @torch.no_grad()
    def encode_in_chunks(self, tiles: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Encode tiles ``[k, 3, H, W]`` without autograd, ``chunk_size`` at a time, to ``[k, D]``.

        Peak activation memory is that of one chunk, whatever ``k``; each chunk is moved to the
        module's device, so the tiles may stay on the CPU.
        """
        chunk_size = chunk_size or self.eval_chunk_size
        chunks = [self.encode(c.to(self.device)) for c in tiles.split(chunk_size)]
        return torch.cat(chunks)

    def aggregate(
        self, features: torch.Tensor, coords: torch.Tensor | None = None
    ) -> AggregatorOutput:
        """Aggregate one slide's features ``[K, D]`` (and coords ``[K, 2]``) to logits ``[C]``."""
        output = _as_output(self.aggregator(features, coords))
        if output.logits.shape != (self.task.num_outputs,):
            raise ValueError(
                f"Expected aggregator logits of shape [{self.task.num_outputs}] for "
                f"{self.task!r}, got {tuple(output.logits.shape)}."
            )
        return output

    def slide_loss(self, output: AggregatorOutput, batch: Mapping[str, Any]) -> torch.Tensor:
        """The task's loss of one slide: a 0-d tensor."""
        return self.task.loss(output.logits, self._target(batch, output))

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """Log ``train/loss`` per step and per epoch."""
        self.log(
            "train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=1
        )

    def evaluate_output(
        self, output: AggregatorOutput, batch: Mapping[str, Any], stage: str
    ) -> torch.Tensor:
        """Log ``{stage}/loss``, update and log ``{stage}/<metric>`` per epoch; return the loss."""
        if stage not in _STAGES:
            raise ValueError(f"Expected `stage` in {list(_STAGES)}, got {stage!r}.")
        target = self._target(batch, output)
        loss = self.task.loss(output.logits, target)
        # sync_dist: under slide groups (or data parallel) each rank's epoch mean covers other
        # slides; with one slide-parallel group it averages equal values.
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=1,
            sync_dist=True,
        )  # fmt: skip
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(*self.task.metric_inputs(output.logits, target))
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1)
        return loss

    def predict_output(self, output: AggregatorOutput, batch: Mapping[str, Any]) -> dict[str, Any]:
        """What ``predict_step`` returns for one slide, on the CPU.

        Keys: ``slide_id``, the task's prediction (``probabilities`` or ``prediction``),
        ``logits`` ``[C]``, ``attention`` ``[k]`` with ``coords`` ``[k, 2]``, and ``target`` if the
        batch has one.
        """
        attention = output.attention
        coords = batch.get("coords")
        result = {
            "slide_id": batch.get("slide_id"),
            self.task.prediction_key: self.task.predict(output.logits.detach()).cpu(),
            "logits": output.logits.detach().float().cpu(),
            "attention": None if attention is None else attention.detach().float().cpu(),
            "coords": None if coords is None else coords.cpu(),
        }
        if batch.get("target") is not None:
            result["target"] = torch.as_tensor(batch["target"]).cpu()
        if batch.get("slide_index") is not None:  # a patient bag: which slide each tile is from
            result["slide_index"] = torch.as_tensor(batch["slide_index"]).cpu()
        curve = getattr(self.task, "survival_curve", None)
        if callable(curve):  # survival: the probability of surviving each time bin
            result["survival"] = curve(output.logits.detach()).float().cpu()
        return result

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def forward(self, tiles: torch.Tensor, coords: torch.Tensor | None = None) -> AggregatorOutput:
        """Encode and aggregate one slide with autograd: ``[k, 3, H, W]`` tiles to an output."""
        return self.aggregate(self.encode(tiles), coords)

    @override
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        if int(batch.get("parts", 1)) > 1:
            raise ValueError(
                f"slide {batch.get('slide_id')!r} came as training part {batch.get('part')} of "
                f"{batch.get('parts')}: only a strategy that streams training parts "
                "(SlideParallelStrategy with encode_chunk_size) joins them into one step; use "
                "one, or SlideDataModule(train_part_size=None)"
            )
        if _unusable(batch):
            return self._skipped_step()
        features = self.encode(batch["tiles"])
        output = self.aggregate(features, batch.get("coords"))
        loss = self.slide_loss(output, batch)
        self.log_train_loss(loss)
        return loss

    @override
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        # A slide's parts are collected; only its last evaluates it. Dropped: it counts in no
        # metric (the problem record names it).
        slide, whole = self._collect_part(batch)
        if slide is None or slide.verdict is not None:
            return None
        return self.evaluate_output(self._aggregate_collected(slide), whole, "val")

    @override
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        slide, whole = self._collect_part(batch)
        if slide is None or slide.verdict is not None:
            return None
        return self.evaluate_output(self._aggregate_collected(slide), whole, "test")

    @override
    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """A slide's prediction at its last part (``None`` for the parts before it)."""
        slide, whole = self._collect_part(batch)
        if slide is None:
            return None
        if slide.verdict is not None:
            return dropped_prediction(batch)
        return self.predict_output(self._aggregate_collected(slide), whole)

    @override
    def on_predict_epoch_end(self) -> None:
        """The parts before a slide's last predict nothing (``None``): the returned list holds
        one prediction per slide, in the loader's order."""
        for outputs in self.trainer.predict_loop._predictions:
            outputs[:] = [o for o in outputs if o is not None]

    def _skipped_step(self) -> torch.Tensor | None:
        """A slide that could not be read trains nothing. One process skips the step (``None``);
        Lightning refuses ``None`` with several data-parallel processes, whose gradient
        averaging needs every rank's backward, so there the step is a zero loss over the
        trainable parameters: this rank adds nothing to the average."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self._trainer is None or self.trainer.world_size == 1 or not trainable:
            return None
        return torch.stack([p.sum() * 0.0 for p in trainable]).sum()

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(
            self.encoder,
            self.aggregator,
            hp.encoder_lr,
            hp.aggregator_lr,
            hp.weight_decay,
            layer_decay=hp.layer_decay,
        )
        optimizer = torch.optim.AdamW(groups, **_adamw_implementation(groups, self._trainer))
        if hp.lr_schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        total_steps = int(total) if math.isfinite(total) else None
        warmup = hp.warmup_steps
        if warmup is None:
            warmup = int(hp.warmup_fraction * total_steps) if total_steps else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The encoder's initial weights are in the state dict: a reload must not need the file
        # or the hub again.
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if hparams is not None:
            hparams["checkpoint_path"] = None
            hparams["pretrained"] = False
        state = getattr(self.task, "state", None)
        if callable(state):  # e.g. a survival task's time bins, fitted on the training split
            checkpoint["task_state"] = state()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load = getattr(self.task, "load_state", None)
        if "task_state" in checkpoint and callable(load):
            load(checkpoint["task_state"])

    @override
    def setup(self, stage: str) -> None:
        """Fit what the task learns from the training split's targets (a survival task's time
        bins) before the first step, unless it already has them (given or from a checkpoint)."""
        fit_bins = getattr(self.task, "fit_bins", None)
        if stage != "fit" or not callable(fit_bins) or self.task.bin_edges is not None:
            return
        datamodule = getattr(self._trainer, "datamodule", None)
        targets = getattr(datamodule, "training_targets", None)
        if not callable(targets):
            raise ValueError(
                "The survival task needs time bins from the training split: call "
                "module.task.fit_bins(train_times, train_events) before fit, or train with a "
                "SlideDataModule, which gives them."
            )
        pairs = [t for t in targets() if t is not None]
        fit_bins([t[0] for t in pairs], [t[1] for t in pairs])

    @override
    def train(self, mode: bool = True) -> SlideModule:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    # ----------------------------------------------------------------- helpers

    def _collect_part(
        self, batch: Mapping[str, Any]
    ) -> tuple[CollectedSlide | None, Mapping[str, Any]]:
        """Encode one evaluation part (a whole slide is one part) and add it to the slide.

        Returns ``(None, batch)`` before the slide's last part; at the last, the collected slide
        and the whole slide's batch. The slide's verdict (left-out tiles of all parts against
        ``max_bad_tiles``, or a reason the loader gave) is written into ``batch`` as
        ``slide_problem`` once, at the last part, for the problem record.
        """
        parts = self._eval_parts
        parts.begin(batch)
        parts.add_problems(len(batch.get("tile_problems") or ()), batch.get("slide_problem"))
        tiles = batch["tiles"]
        if not parts.dropped and len(tiles):
            coords, index = batch.get("coords"), batch.get("slide_index")
            parts.add(
                len(tiles),
                self.encode_in_chunks(tiles),
                None if coords is None else coords.to(self.device),
                None if index is None else torch.as_tensor(index).to(self.device),
            )
        if not parts.last:
            set_slide_problem(batch, None)  # recorded once, at the slide's last part
            return None, batch
        slide = parts.finish()
        set_slide_problem(batch, slide.verdict)
        return slide, whole_slide_batch(batch, slide)

    @torch.no_grad()
    def _aggregate_collected(self, slide: CollectedSlide) -> AggregatorOutput:
        assert slide.features is not None
        return self.aggregate(slide.features, slide.coords)

    def _target(self, batch: Mapping[str, Any], output: AggregatorOutput) -> torch.Tensor:
        if "target" not in batch:
            raise KeyError(f"Slide {batch.get('slide_id')!r} has no `target` in its batch.")
        return torch.as_tensor(batch["target"], device=output.logits.device)


def _check_finetuning(
    lora: Mapping[str, Any] | None,
    freeze_encoder: bool,
    train_last_n_blocks: int | None,
    layer_decay: float | None,
) -> None:
    """One line for fine-tuning options that contradict each other."""
    if lora is not None and (freeze_encoder or train_last_n_blocks is not None):
        given = (
            "freeze_encoder=True"
            if freeze_encoder
            else f"train_last_n_blocks={train_last_n_blocks}"
        )
        raise ValueError(
            f"Expected one way to fine-tune the encoder, got `lora` and {given}: LoRA already "
            "freezes the base weights; drop one (finetune=lora alone, or lora=null)."
        )
    if layer_decay is not None and freeze_encoder:
        raise ValueError(
            "Expected `layer_decay` with a trainable encoder, got freeze_encoder=True: a frozen "
            "encoder has no learning rate to decay; set layer_decay=null."
        )


def _unusable(batch: Mapping[str, Any]) -> bool:
    """A slide the loader could not read in this step (dropped, or no tile left)."""
    return bool(batch.get("slide_problem")) or len(batch["tiles"]) == 0


def _adamw_implementation(
    groups: list[dict[str, Any]], trainer: L.Trainer | None = None
) -> dict[str, bool]:
    """Keyword arguments that choose torch's AdamW implementation for ``groups`` under ``trainer``.

    ``fused=True`` where torch has fused AdamW for every parameter (CPU or CUDA floats, torch
    2.4+): one kernel instead of a loop over tensors, 7x faster for a ResNet-18 on one CPU thread
    (6 vs 41 ms a step), which a slide-parallel step would otherwise spend on every rank.

    ``foreach=True`` instead when the trainer clips gradients (``gradient_clip_val > 0``) under a
    precision plugin that needs unscaled gradients to clip. A fused optimiser unscales gradients
    inside its own ``step`` (it sets ``_step_supports_amp_scaling``), so Lightning's
    ``MixedPrecision`` ("16-mixed" and "bf16-mixed", scaler or not) raises at the first clipping
    ("does not allow for gradient clipping because it performs unscaling of gradients
    internally"), which stopped the shipped ``trainer=gpu`` preset at step 1; a plugin with a
    grad scaler that does not refuse (``FSDPPrecision`` in "16-mixed") skips ``unscale_`` and
    would clip the scaled gradients. ``foreach`` still beats torch's per-tensor loop on CPU (58
    vs 65 ms a step for that ResNet-18 in a run where fused took 10 ms).

    Without a trainer (a module used on its own) the choice is fused wherever torch has it.
    """
    params = [p for g in groups for p in g["params"]]
    if not params:
        return {}
    if trainer is not None and _clips_under_amp(trainer):
        return {"foreach": True}
    fused_ok = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    fused_ok = fused_ok and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return {"fused": True} if fused_ok else {}


def _clips_under_amp(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` clips gradients where an optimiser that unscales internally cannot.

    Mirrors ``MixedPrecision.clip_gradients`` (Lightning 2.6), which refuses any clip value above
    0 with such an optimiser, and adds any other plugin holding a grad scaler, which would clip
    still-scaled gradients. ``LightningModule.clip_gradients`` clips by
    ``trainer.gradient_clip_val or 0.0``.
    """
    if not (trainer.gradient_clip_val or 0.0) > 0:
        return False
    plugin = trainer.precision_plugin
    return isinstance(plugin, MixedPrecision) or getattr(plugin, "scaler", None) is not None


def _as_task(task: str | Task, num_classes: int | None) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return build_task(task, num_classes=num_classes)
    raise TypeError(f"Expected `task` to be a task name or a Task, got {task!r}.")


def _as_aggregator(
    aggregator: str | nn.Module,
    in_dim: int,
    num_outputs: int,
    kwargs: Mapping[str, Any] | None,
) -> nn.Module:
    if isinstance(aggregator, str):
        return build_aggregator(aggregator, in_dim, num_outputs, **dict(kwargs or {}))
    if not isinstance(aggregator, nn.Module):
        raise TypeError(f"Expected `aggregator` to be a name or an nn.Module, got {aggregator!r}.")
    if kwargs:
        raise ValueError("`aggregator_kwargs` apply to an aggregator name only.")
    return aggregator


def _as_output(out: Any) -> AggregatorOutput:
    if isinstance(out, AggregatorOutput):
        return out
    if isinstance(out, torch.Tensor):
        return AggregatorOutput(logits=out)
    if isinstance(out, tuple) and len(out) == 2:
        return AggregatorOutput(logits=out[0], attention=out[1])
    raise TypeError(
        "Expected the aggregator to return an AggregatorOutput, a (logits, attention) tuple or "
        f"logits, got {type(out).__name__}."
    )
