"""LoRA adapters on a tile encoder (peft), with merged export to a plain timm weights file.

``apply_lora`` injects peft's LoRA layers in place (``peft.inject_adapter_in_model``), so the
encoder stays the timm model it was: its own ``forward``, ``forward_features``, ``blocks``,
``group_matcher`` and ``set_grad_checkpointing`` keep working, and its state dict gains
``<layer>.base_layer.*`` and ``<layer>.lora_{A,B}.default.weight`` keys. Only the adapters train
(plus, if asked, the normalisation layers); everything else in the encoder is frozen.

Slide-parallel training needs nothing special: the strategy syncs every parameter with
``requires_grad``, adapters included, and LoRA dropout is an ``nn.Dropout``, which draws from
torch's global generator, the one the strategy seeds per rank (``strategies.randomness``) and the
chunked re-encode replays.

peft is imported only when LoRA is used (it pulls in transformers: seconds at start-up).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_KEYS",
    "apply_lora",
    "export_merged_encoder",
    "has_lora",
    "load_adapters",
    "lora_options",
    "merge_lora",
    "save_adapters",
]

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")  # a timm ViT's attention and MLP projections
LORA_KEYS = ("rank", "alpha", "targets", "dropout", "train_norms")
_ADAPTER = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_INSTALL = 'LoRA needs peft: pip install "lightning-wsi[lora]" (or pip install "peft>=0.13").'


def lora_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``apply_lora`` from a config mapping (``model.lora``).

    Raises:
        ValueError: A key other than ``rank``, ``alpha``, ``targets``, ``dropout``,
            ``train_norms``, or a mapping that is not one.
    """
    if not isinstance(config, Mapping):
        raise ValueError(
            f"Expected `lora` to be a mapping with keys {list(LORA_KEYS)}, got {config!r}."
        )
    unknown = sorted(set(config) - set(LORA_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) lora.{', lora.'.join(map(str, unknown))}: expected some of "
            f"{list(LORA_KEYS)}."
        )
    return dict(config)


def apply_lora(
    encoder: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    train_norms: bool = False,
) -> nn.Module:
    """Add LoRA adapters to ``encoder``'s Linear layers named by ``targets`` (in place) and freeze
    everything else.

    A target names Linear modules by their name or a dotted suffix of it, as peft matches them:
    ``qkv`` is every ``blocks.<i>.attn.qkv``, ``attn.proj`` leaves ``patch_embed.proj`` (a
    convolution) aside, and ``proj`` does too, as only Linear layers are adapted. An adapted
    layer computes ``W x + (alpha / rank) B A x`` with ``B`` zero-initialised, so the encoder's
    output is unchanged until the adapters train.

    Args:
        encoder: The tile encoder (a timm model, or any module with Linear layers).
        rank: Rank ``r`` of ``A`` ``[r, in]`` and ``B`` ``[out, r]``.
        alpha: LoRA scaling numerator (``alpha / rank`` multiplies ``B A``).
        targets: Linear module names or dotted suffixes; each must match at least one.
        dropout: Dropout on the adapters' input (torch's global generator).
        train_norms: Also train the normalisation layers' affine parameters.

    Returns:
        ``encoder`` itself, with adapters; only they (and the norms, if asked) require grad.

    Raises:
        ValueError: A target matches no Linear module (the error lists them), an option is out of
            range, or the encoder already has adapters.
        ImportError: peft is not installed.

    Example:
        >>> import timm
        >>> enc = apply_lora(timm.create_model("test_vit", num_classes=0), rank=4)
        >>> sorted({n.split(".")[-3] for n, p in enc.named_parameters() if p.requires_grad})
        ['lora_A', 'lora_B']
    """
    _check_options(rank, alpha, targets, dropout)
    if has_lora(encoder):
        raise ValueError(
            f"{type(encoder).__name__} already has LoRA adapters: apply LoRA once (pass the "
            "encoder without adapters, or leave `lora` unset)."
        )
    names = _target_names(encoder, targets)
    peft = _import_peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=dropout, bias="none"
    )
    encoder = peft.inject_adapter_in_model(config, encoder)
    encoder.requires_grad_(False)
    for name, param in encoder.named_parameters():
        if _ADAPTER.search(name):
            param.requires_grad_(True)
    if train_norms:
        for module in encoder.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    return encoder


def _check_options(rank: int, alpha: float, targets: Sequence[str], dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Expected lora.rank to be a positive integer, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"Expected lora.alpha to be a positive number, got {alpha!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected lora.dropout in [0, 1), got {dropout!r}.")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(
            f"Expected lora.targets to be a non-empty list of module names such as "
            f"{list(DEFAULT_TARGETS)}, got {targets!r}."
        )


def _linear_names(encoder: nn.Module) -> list[str]:
    """Names of the Linear modules LoRA can adapt (not those inside ``nn.MultiheadAttention``,
    whose forward reads the weight directly and would bypass an adapter)."""
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, module in encoder.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    return [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and name not in inside_mha
    ]


def _target_names(encoder: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the Linear modules that ``targets`` match; one-line error for a target that
    matches none, listing the encoder's Linear layer names (block indices as ``*``)."""
    linear = _linear_names(encoder)
    chosen: list[str] = []
    for target in targets:
        matched = [n for n in linear if n == target or n.endswith("." + target)]
        if not matched:
            raise ValueError(_no_match(encoder, target, linear))
        chosen += [n for n in matched if n not in chosen]
    return chosen


def _no_match(encoder: nn.Module, target: str, linear: list[str]) -> str:
    """One line for a target that matches nothing: the encoder's Linear names, blocks as ``*``."""
    name = type(encoder).__name__
    if not linear:
        return (
            f"lora.targets entry {target!r} matches nothing: {name} has no Linear module to "
            "adapt (LoRA adapts Linear layers); use a ViT encoder or leave `lora` unset."
        )
    found = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in linear})
    return (
        f"lora.targets entry {target!r} matches no Linear module of {name}; its Linear "
        f"modules: {found}. Set lora.targets to names or dotted suffixes of these."
    )


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: LayerNorm, RmsNorm, GroupNorm, (Frozen)BatchNorm and timm's
    variants, by class name, as there is no common base class."""
    return "norm" in type(module).__name__.lower() and any(
        True for _ in module.parameters(recurse=False)
    )


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    return peft


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the peft adapter layers in ``module`` (none if peft was never
    imported, which no adapter can exist without)."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers."""
    return bool(_lora_layers(module))


def merge_lora(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` with every adapter merged into its base weight (``W + s B A``) and
    the adapter layers replaced by their plain base layers: timm's own key layout again.

    ``encoder`` keeps its adapters (training can go on). An encoder without adapters is copied
    as it is.
    """
    merged = copy.deepcopy(encoder)
    for name, layer in _lora_layers(merged):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged


def _encoder_of(module_or_encoder: nn.Module) -> nn.Module:
    if isinstance(module_or_encoder, L.LightningModule):
        encoder = getattr(module_or_encoder, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(
                f"Expected a SlideModule (with `.encoder`) or an encoder, got "
                f"{type(module_or_encoder).__name__} without an `encoder` module."
            )
        return encoder
    return module_or_encoder


def _safetensors_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"Expected a .safetensors path for the {what}, got {str(path)!r}.")
    return path


def _cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU copies that safetensors can write (no shared storage)."""
    return {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in state.items()
    }


def export_merged_encoder(module_or_encoder: nn.Module, path: str | Path) -> Path:
    """Write the merged encoder's weights to ``path`` (``.safetensors``, timm's key layout).

    ``build_encoder(name, encoder_kwargs=..., checkpoint_path=path)`` then loads them strictly into
    a plain timm model (no peft needed) that gives the LoRA model's features.

    Args:
        module_or_encoder: A ``SlideModule`` (its ``.encoder`` is exported) or an encoder.
        path: Where to write; its folder is created.

    Returns:
        ``path``.
    """
    path = _safetensors_path(path, "merged encoder")
    merged = merge_lora(_encoder_of(module_or_encoder))
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(_cpu_tensors(merged.state_dict()), path, metadata={"format": "pt"})
    return path


def _trainable_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in encoder.named_parameters() if p.requires_grad}


def save_adapters(module_or_encoder: nn.Module, path: str | Path) -> Path:
    """Write only what LoRA trains in the encoder (the adapters, and the norms with
    ``train_norms``) to ``path`` (``.safetensors``): kilobytes to megabytes instead of the base
    model. ``load_adapters`` puts them back into an encoder built the same way.

    Raises:
        ValueError: The encoder has no adapters, or ``path`` is not a ``.safetensors`` path.
    """
    path = _safetensors_path(path, "adapter weights")
    encoder = _encoder_of(module_or_encoder)
    if not has_lora(encoder):
        raise ValueError(
            f"{type(encoder).__name__} has no LoRA adapters to save: build it with `lora` set, "
            "or save the whole state dict instead."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _cpu_tensors(_trainable_state(encoder))
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})
    return path


def load_adapters(module_or_encoder: nn.Module, path: str | Path) -> None:
    """Load weights written by ``save_adapters`` into an encoder with the same LoRA settings
    (in place); the base weights are left as they are.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Not a safetensors file, or its keys or shapes differ from the encoder's
            trainable parameters (built with other ``lora`` settings).
    """
    path = _safetensors_path(path, "adapter weights")
    if not path.is_file():
        raise FileNotFoundError(f"Adapter weights not found: {path}")
    encoder = _encoder_of(module_or_encoder)
    try:
        state = safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"Adapter weights {path} are not a readable safetensors file ({err}); pass a file "
            "written by save_adapters."
        ) from None
    own = _trainable_state(encoder)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"Adapter weights {path} do not fit {type(encoder).__name__}: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of "
            f"another shape {wrong[:3]}; build the encoder with the `lora` settings they were "
            "trained with."
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])
