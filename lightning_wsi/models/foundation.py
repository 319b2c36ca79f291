"""Published pathology foundation encoders: layer names, token pooling and offline weights.

The presets in ``conf/encoder/`` (``uni``, ``uni2_h``, ``virchow2``, ``h_optimus_0``, ...) give the
publisher's timm architecture and keyword arguments. Three things there are not plain timm
arguments, and this module handles them:

- layer classes (``mlp_layer: timm.layers.SwiGLUPacked``, ``act_layer: torch.nn.SiLU``) are
  written as names and looked up in ``LAYER_NAMES``, a fixed table: a config never imports or
  evaluates a string;
- ``feature_pool: cls_mean_patch`` (Virchow's embedding): the class token concatenated with the
  mean of the patch tokens, register tokens excluded, ``[k, 2 * embed_dim]``;
- ``preset: {name, hf_repo | url, file, gated, hf_cache}``: where the publisher distributes the
  weights, so they can be found on disk without any network call, or the error can say where
  to get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from huggingface_hub import try_to_load_from_cache
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked
from torch import nn

__all__ = [
    "FEATURE_POOLS",
    "LAYER_NAMES",
    "PresetWeights",
    "attach_feature_pool",
    "check_feature_pool",
    "default_hf_hub_cache",
    "find_preset_weights",
    "hf_cache_dir",
    "missing_weights_message",
    "resolve_layer_names",
    "torch_hub_checkpoints",
]

# Layer classes a config may name (as the publishers' model cards write them). Looked up, never
# imported: a config from elsewhere cannot make this load or run anything else.
LAYER_NAMES: Mapping[str, Callable[..., nn.Module]] = {
    "timm.layers.SwiGLUPacked": SwiGLUPacked,
    "timm.layers.SwiGLU": SwiGLU,
    "timm.layers.GluMlp": GluMlp,
    "timm.layers.Mlp": Mlp,
    "torch.nn.SiLU": nn.SiLU,
    "torch.nn.GELU": nn.GELU,
    "torch.nn.LayerNorm": nn.LayerNorm,
}
FEATURE_POOLS = ("cls_mean_patch",)
_HF = "https://huggingface.co"
_SAFETENSORS_TWIN = {"pytorch_model.bin": "model.safetensors"}  # what timm's hub loader prefers
_PRESET_KEYS = {"name", "hf_repo", "url", "file", "gated", "hf_cache"}


def resolve_layer_names(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every dotted ``*_layer`` name replaced by its class from ``LAYER_NAMES``.

    timm's own short names (``act_layer: silu``) have no dot and pass through to timm.

    Raises:
        ValueError: A dotted ``*_layer`` name is not in ``LAYER_NAMES``.
    """
    out = dict(kwargs)
    for key, value in kwargs.items():
        if not (key.endswith("_layer") and isinstance(value, str) and "." in value):
            continue
        if value not in LAYER_NAMES:
            raise ValueError(
                f"encoder.kwargs.{key}={value!r} is not a known layer name (names are looked "
                f"up, never imported); use one of {sorted(LAYER_NAMES)} or a timm name such as "
                "'silu'."
            )
        out[key] = LAYER_NAMES[value]
    return out


def check_feature_pool(pool: str, kwargs: Mapping[str, Any]) -> None:
    """Raise before a (possibly billion-parameter) build if ``pool`` cannot apply to ``kwargs``.

    Raises:
        ValueError: Unknown ``pool``, or ``kwargs`` without ``global_pool: ""`` (token output).
    """
    if pool not in FEATURE_POOLS:
        raise ValueError(
            f"encoder.kwargs.feature_pool must be one of {FEATURE_POOLS}, got {pool!r}."
        )
    if kwargs.get("global_pool") != "":
        raise ValueError(
            f"encoder.kwargs.feature_pool={pool!r} pools the tokens itself: it needs "
            f"encoder.kwargs.global_pool: '' (token output), got {kwargs.get('global_pool')!r}."
        )


def attach_feature_pool(model: nn.Module, pool: str) -> nn.Module:
    """Make ``model`` return pooled features ``[k, D]`` from its token output (in place).

    ``cls_mean_patch`` (Virchow, Virchow2): concat(class token, mean of the patch tokens), the
    register tokens left out, so ``D = 2 * embed_dim``. The model must be a timm ViT built with
    ``global_pool=""`` (its forward then returns the normalised tokens ``[k, T, embed_dim]``).
    A forward hook does the pooling, so parameter names, ``blocks``, ``group_matcher`` and
    ``set_grad_checkpointing`` stay timm's; ``num_features`` becomes ``D``.

    Raises:
        ValueError: Unknown ``pool``, or a model that does not return tokens with a class token.
    """
    if pool not in FEATURE_POOLS:
        raise ValueError(
            f"encoder.kwargs.feature_pool must be one of {FEATURE_POOLS}, got {pool!r}."
        )
    if getattr(model, "global_pool", None) != "" or not getattr(model, "has_class_token", False):
        raise ValueError(
            f"encoder.kwargs.feature_pool={pool!r} needs a timm ViT with a class token built with "
            f"global_pool: '' (token output), got {type(model).__name__} with global_pool="
            f"{getattr(model, 'global_pool', None)!r}; set encoder.kwargs.global_pool=''."
        )
    model.register_forward_hook(_cls_mean_patch)
    model.num_features = model.head_hidden_size = 2 * model.embed_dim
    return model


def _cls_mean_patch(module: nn.Module, args: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Forward hook: tokens ``[k, T, E]`` to ``[k, 2E]`` (class token, mean patch token)."""
    patches = tokens[:, module.num_prefix_tokens :]
    return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


@dataclass(frozen=True)
class PresetWeights:
    """Where a preset's publisher distributes its weights (``encoder.kwargs.preset``).

    Attributes:
        name: The preset (``conf/encoder/<name>.yaml``), named in errors.
        file: The publisher's weights file name (``pytorch_model.bin``).
        hf_repo: Hugging Face repository id, or None for a ``url`` download.
        url: Direct download address (e.g. a GitHub release), or None.
        gated: The repository needs the user's own accepted access.
        hf_cache: Hugging Face hub cache folder to look in (None: the environment's).
    """

    name: str
    file: str
    hf_repo: str | None = None
    url: str | None = None
    gated: bool = False
    hf_cache: str | None = None

    @classmethod
    def from_config(cls, spec: Mapping[str, Any]) -> PresetWeights:
        """Validate ``encoder.kwargs.preset`` (a mapping from a config: untrusted)."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"encoder.kwargs.preset must be a mapping, got {type(spec).__name__}.")
        unknown = sorted(set(spec) - _PRESET_KEYS)
        if unknown or not isinstance(spec.get("name"), str):
            raise ValueError(
                f"encoder.kwargs.preset needs a `name` and only the keys {sorted(_PRESET_KEYS)}, "
                f"got {sorted(spec)}."
            )
        name, hf_repo, url = spec["name"], spec.get("hf_repo"), spec.get("url")
        if (hf_repo is None) == (url is None):
            raise ValueError(f"encoder.kwargs.preset of {name!r} needs one of hf_repo and url.")
        file = spec.get("file") or os.path.basename(urlsplit(str(url)).path)
        if not _plain_name(file) or (hf_repo is not None and not _repo_id(hf_repo)):
            raise ValueError(
                f"encoder.kwargs.preset of {name!r}: file {file!r} must be a plain file name and "
                f"hf_repo {hf_repo!r} an 'owner/name' id."
            )
        cache = spec.get("hf_cache")
        return cls(name, file, hf_repo, url, bool(spec.get("gated")), str(cache) if cache else None)

    @property
    def source(self) -> str:
        """Where the publisher distributes the file (a web address)."""
        return f"{_HF}/{self.hf_repo}" if self.hf_repo else str(self.url)


def _plain_name(file: Any) -> bool:
    return isinstance(file, str) and bool(file) and Path(file).name == file and file != ".."


def _repo_id(repo: Any) -> bool:
    parts = repo.split("/") if isinstance(repo, str) else []
    return len(parts) == 2 and all(p and p not in {".", ".."} for p in parts)


def find_preset_weights(weights: PresetWeights) -> Path | None:
    """The preset's weights file already on disk, or None; never a network call.

    Hugging Face repositories: the hub cache (``weights.hf_cache``, else ``HF_HUB_CACHE`` /
    ``HF_HOME``), the safetensors twin of ``pytorch_model.bin`` first as timm does. Direct
    downloads: torch's hub cache (``<torch.hub.get_dir()>/checkpoints``), where timm and
    ``torch.hub`` keep them.
    """
    if weights.hf_repo is None:
        path = torch_hub_checkpoints() / weights.file
        return path if path.is_file() else None
    for file in _hf_files(weights.file):
        found = try_to_load_from_cache(weights.hf_repo, file, cache_dir=hf_cache_dir(weights))
        if isinstance(found, str):
            return Path(found)
    return None


def _hf_files(file: str) -> list[str]:
    twin = _SAFETENSORS_TWIN.get(file)
    return [twin, file] if twin else [file]


def hf_cache_dir(weights: PresetWeights) -> Path:
    """The Hugging Face hub cache to look in: the preset's ``hf_cache``, else the environment's."""
    if weights.hf_cache:
        return Path(weights.hf_cache).expanduser()
    return default_hf_hub_cache()


def default_hf_hub_cache() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def torch_hub_checkpoints() -> Path:
    """Where ``torch.hub`` and timm keep files downloaded from a web address."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def missing_weights_message(weights: PresetWeights, checkpoint_path: str | Path | None) -> str:
    """One line: the preset, the expected file, where it was looked for, where to get it."""
    if checkpoint_path is not None:
        looked = f"encoder.checkpoint_path={checkpoint_path} does not exist"
    elif weights.hf_repo:
        looked = (
            f"it is not in the Hugging Face cache {hf_cache_dir(weights)} (encoder.hf_cache, "
            "else HF_HUB_CACHE or HF_HOME) and no encoder.checkpoint_path is given"
        )
    else:
        looked = (
            f"it is not in torch's hub cache {torch_hub_checkpoints()} and no "
            "encoder.checkpoint_path is given"
        )
    elsewhere = (
        "encoder.hf_cache=/path/to/hub"
        if weights.hf_repo
        else f"put it in {torch_hub_checkpoints()}"
    )
    return (
        f"Weights of encoder preset {weights.name!r} not found: expected {weights.file} from "
        f"{weights.source}, but {looked}. {_how_to_get(weights)}; then pass "
        f"encoder.checkpoint_path=/path/to/{weights.file} or {elsewhere}, or train from random "
        "weights with encoder.pretrained=false."
    )


def _how_to_get(weights: PresetWeights) -> str:
    if weights.hf_repo is None:
        return f"Download it (not gated) on a machine with internet: curl -LO {weights.url}"
    fetch = f"`huggingface-cli download {weights.hf_repo} {weights.file}`"
    if not weights.gated:
        return f"Download it on a machine with internet: {fetch}"
    return (
        f"The repository is gated: accept its terms at {weights.source} with your own Hugging "
        f"Face account, log in (`huggingface-cli login`) and run {fetch} on a machine with "
        "internet (no weights are downloaded at run time)"
    )
