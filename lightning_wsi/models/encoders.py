"""Tile encoders: a timm model by name, or any ``nn.Module`` from ``[k, 3, H, W]`` to ``[k, D]``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import group_parameters
from torch import nn

from lightning_wsi.models.batchnorm import freeze_batchnorm as _freeze_batchnorm

__all__ = [
    "build_encoder",
    "create_encoder",
    "encoder_feature_dim",
    "freeze_all_but_last_blocks",
    "load_encoder_weights",
]


def build_encoder(
    encoder: str | nn.Module,
    *,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None,
    freeze: bool = False,
    train_last_n_blocks: int | None = None,
    freeze_batchnorm: bool = True,
    grad_checkpointing: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """Create (or take) a tile encoder and apply the training options to it.

    Args:
        encoder: A timm model name or a module mapping ``[k, 3, H, W]`` tiles to ``[k, D]``.
        pretrained: Load timm's pretrained weights (needs a model hub; names only).
        checkpoint_path: A local weights file loaded after creation (see ``load_encoder_weights``).
        encoder_kwargs: Extra keyword arguments for ``timm.create_model`` (names only).
        freeze: Freeze every parameter and keep the encoder in eval mode (the frozen-encoder
            MIL baseline).
        train_last_n_blocks: Train only the last N blocks (see ``freeze_all_but_last_blocks``).
        freeze_batchnorm: Replace BatchNorm layers by ``FrozenBatchNorm``: running statistics fixed,
            affine parameters trainable. Needed for exact slide-parallel gradients.
        grad_checkpointing: Recompute activations in backward (timm's ``set_grad_checkpointing``).
        channels_last: Store conv weights channels-last (NHWC); feed tiles the same way.

    Returns:
        The configured encoder.

    Raises:
        ValueError: An option does not apply to this encoder, or options conflict.

    Example:
        >>> enc = build_encoder("test_resnet", train_last_n_blocks=1)
        >>> enc(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 96])
    """
    if freeze and train_last_n_blocks is not None:
        raise ValueError(
            "Expected at most one of `freeze_encoder` and `train_last_n_blocks`, got both "
            f"(freeze_encoder=True, train_last_n_blocks={train_last_n_blocks})."
        )
    if isinstance(encoder, str):
        encoder = create_encoder(encoder, pretrained=pretrained, **dict(encoder_kwargs or {}))
    elif not isinstance(encoder, nn.Module):
        raise TypeError(
            f"Expected `encoder` to be a timm model name or an nn.Module, got {encoder!r}"
        )
    elif pretrained or encoder_kwargs:
        raise ValueError("`pretrained` and `encoder_kwargs` apply to a timm model name only.")
    if checkpoint_path is not None:
        load_encoder_weights(encoder, checkpoint_path)
    if freeze_batchnorm:
        encoder = _freeze_batchnorm(encoder)
    if freeze:
        encoder.requires_grad_(False)
        encoder.eval()
    elif train_last_n_blocks is not None:
        freeze_all_but_last_blocks(encoder, train_last_n_blocks)
    if grad_checkpointing:
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise ValueError(
                "`grad_checkpointing=True` needs an encoder with timm's `set_grad_checkpointing`, "
                f"got {type(encoder).__name__}."
            )
        encoder.set_grad_checkpointing(True)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    return encoder


def create_encoder(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a timm model as a feature extractor (``num_classes=0``: pooled ``[k, D]`` features).

    Args:
        name: A timm model name (``timm.list_models()``).
        pretrained: Load timm's pretrained weights.
        **kwargs: Passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).

    Returns:
        The model; ``model.num_features`` is ``D``.

    Example:
        >>> create_encoder("test_vit", img_size=32).num_features
        64
    """
    if not timm.is_model(name):
        raise ValueError(f"Expected a timm model name (see timm.list_models()), got {name!r}.")
    kwargs.setdefault("num_classes", 0)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def encoder_feature_dim(encoder: nn.Module, input_size: int = 224) -> int:
    """The feature size ``D`` of an encoder: ``num_features`` if it has one, else a dummy forward.

    Args:
        encoder: A module mapping ``[k, 3, H, W]`` to ``[k, D]``.
        input_size: Tile size of the dummy input when the module does not say its size.

    Returns:
        ``D``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> encoder_feature_dim(net)
        5
    """
    dim = getattr(encoder, "num_features", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    was_training = encoder.training
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        encoder.eval()
        with torch.no_grad():
            out = encoder(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        encoder.train(was_training)
    if out.ndim != 2:
        raise ValueError(
            f"Expected the encoder to return features of shape [k, D], got {tuple(out.shape)} "
            f"for a [1, 3, {input_size}, {input_size}] input."
        )
    return int(out.shape[1])


def freeze_all_but_last_blocks(encoder: nn.Module, n: int) -> None:
    """Freeze every encoder parameter except those of its last ``n`` blocks (in place).

    Blocks are the groups of timm's fine-grained ``group_matcher()``, in forward order: the stem,
    then one group per block (a residual block such as ``layer3.1`` in a ResNet, a transformer
    block in a ViT; a ViT's final ``norm`` belongs to its last block). Parameters the matcher does
    not name (``fc_norm``, attention-pool heads) sit after the last block and always stay trainable.
    ``n`` equal to the number of groups trains everything.

    Args:
        encoder: A timm model (anything with ``group_matcher``).
        n: Number of trailing blocks to train, at least 1.

    Raises:
        ValueError: ``n`` is out of range or the encoder has no ``group_matcher``.

    Example:
        >>> enc = create_encoder("test_resnet")
        >>> freeze_all_but_last_blocks(enc, 1)
        >>> enc.layer4[0].conv1.weight.requires_grad, enc.layer3[0].conv1.weight.requires_grad
        (True, False)
    """
    if not hasattr(encoder, "group_matcher"):
        raise ValueError(
            "`train_last_n_blocks` needs an encoder with timm's `group_matcher()`, "
            f"got {type(encoder).__name__}."
        )
    matcher = encoder.group_matcher(coarse=False)
    names = [name for name, _ in encoder.named_parameters()]
    layer_of = group_parameters(encoder, matcher, reverse=True)
    head = {name for name in names if not _matched(name, matcher)}
    block_ids = sorted({layer_of[name] for name in names if name not in head})
    if not 1 <= n <= len(block_ids):
        raise ValueError(
            f"Expected `train_last_n_blocks` between 1 and {len(block_ids)} for "
            f"{type(encoder).__name__} (stem + blocks), got {n}."
        )
    trainable_ids = set(block_ids[-n:])
    for name, param in encoder.named_parameters():
        param.requires_grad_(name in head or layer_of[name] in trainable_ids)


def _matched(name: str, matcher: Any) -> bool:
    """Whether a dict group matcher names ``name``; callable matchers name everything."""
    if not isinstance(matcher, Mapping):
        return True
    for spec in matcher.values():
        if spec is None:
            continue
        patterns = [s[0] for s in spec] if isinstance(spec, list | tuple) else [spec]
        if any(re.match(pattern, name) for pattern in patterns):
            return True
    return False


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load encoder weights from a local file (in place).

    Accepts a plain state dict, or one wrapped under ``state_dict`` / ``model`` / ``module``
    (Lightning, timm, DDP checkpoints); a ``module.`` prefix is stripped, and from a lightning-wsi
    checkpoint only the ``encoder.`` entries are taken. A classifier in the file (timm's
    ``pretrained_cfg["classifier"]``, e.g. ``fc`` or ``head``) is dropped, as the encoder has none.

    Args:
        encoder: The module to load into.
        path: A file written by ``torch.save``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file's keys do not match the encoder's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Encoder checkpoint not found: {path}")
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=False), encoder)
    classifier = getattr(encoder, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = set(encoder.state_dict())
    state = {
        k: v for k, v in state.items() if k in own or not any(k.startswith(c) for c in classifier)
    }
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(
            f"Encoder checkpoint {path} does not match {type(encoder).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}."
        )
    encoder.load_state_dict(state)


def _unwrap_state_dict(obj: Any, encoder: nn.Module) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"Expected a state dict in the encoder checkpoint, got {type(obj).__name__}"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = encoder.state_dict()
    if not any(k.startswith("encoder.") for k in own) and any(
        k.startswith("encoder.") for k in state
    ):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    return state
