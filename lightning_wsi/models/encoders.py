"""Tile encoders: a timm model by name, or any ``nn.Module`` from ``[k, 3, H, W]`` to ``[k, D]``.

Besides timm's own arguments, ``encoder_kwargs`` may hold lightning-wsi's keys for the published
pathology encoders (``conf/encoder/uni.yaml`` and the others, see ``foundation.py``): layer
names such as ``mlp_layer: timm.layers.SwiGLUPacked``, ``feature_pool: cls_mean_patch`` and
``preset`` (where the publisher's weights live). They are resolved or removed before timm.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import safetensors.torch
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import group_parameters, resolve_pretrained_cfg, split_model_name_tag
from torch import nn

from lightning_wsi.models.batchnorm import freeze_batchnorm as _freeze_batchnorm
from lightning_wsi.models.foundation import (
    PresetWeights,
    attach_feature_pool,
    check_feature_pool,
    default_hf_hub_cache,
    find_preset_weights,
    missing_weights_message,
    resolve_layer_names,
    torch_hub_checkpoints,
)

__all__ = [
    "PretrainedWeightsUnavailableError",
    "UnsafeWeightsError",
    "build_encoder",
    "create_encoder",
    "encoder_feature_dim",
    "freeze_all_but_last_blocks",
    "load_encoder_weights",
]

# Seconds to wait for a model hub to answer before saying it cannot be reached; huggingface_hub's
# own retries take about 45 s before they give up on a machine without internet.
_PROBE_TIMEOUT_S = 2.0
_HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_HF_WEIGHTS = "pytorch_model.bin"  # timm's default hub file; a .safetensors twin is preferred
_TRUE = {"1", "ON", "YES", "TRUE"}
_OFFLINE_FIX = (
    "pass a local weights file with encoder.checkpoint_path=/path/to/weights, "
    "or train from random weights with encoder.pretrained=false"
)
# Classes a weights file may hold besides tensors and plain containers. A Lightning checkpoint
# records the data module's hyper-parameters, and `SlideDataModule(manifest=Path(...))` (the
# README's and the notebook's way, with `make_synthetic_dataset`'s Path) stored a Path there until
# it began storing text. Unpickling a Path only builds the path object: no I/O, no code.
_SAFE_CLASSES = [type(Path())]
_RESAVE_FIX = (
    "if you trust its source, re-save it as a plain state dict with "
    "torch.save(model.state_dict(), path) or as safetensors (safetensors.torch.save_file) "
    "and pass that file"
)


class UnsafeWeightsError(ValueError):
    """A weights file the safe unpickler refused: it holds pickled objects other than tensors."""


class PretrainedWeightsUnavailableError(FileNotFoundError):
    """timm's pretrained weights are not in the local cache and cannot be downloaded."""


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
        pretrained: Load timm's pretrained weights (names only): from the local cache when they
            are there, else from the model hub (see ``create_encoder``). With a ``preset`` in
            ``encoder_kwargs``, the publisher's weights instead, from the local Hugging Face (or
            torch hub) cache only, never downloaded. Ignored when ``checkpoint_path`` is given,
            whose weights replace them all.
        checkpoint_path: A local weights file loaded after creation (see ``load_encoder_weights``).
        encoder_kwargs: Extra keyword arguments for ``timm.create_model`` (names only), plus
            ``feature_pool`` and layer names (see ``create_encoder``) and ``preset``: a mapping
            ``{name, hf_repo | url, file, gated, hf_cache}`` saying where the publisher's weights
            live (``foundation.PresetWeights``).
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
        PretrainedWeightsUnavailableError: ``pretrained`` weights are neither cached nor
            downloadable; for a preset, not on disk (one line naming the preset, the file and
            where its publisher distributes it).
        FileNotFoundError: ``checkpoint_path`` does not exist.

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
    kwargs = dict(encoder_kwargs or {})
    preset = _preset(kwargs.pop("preset", None))
    # Before building: a missing file should not cost a billion-parameter initialisation first.
    weights_file = _weights_file(preset, pretrained, checkpoint_path)
    if isinstance(encoder, str):
        # A local file replaces every weight (it must match all keys), so the hub is not needed.
        from_hub = pretrained and checkpoint_path is None and preset is None
        encoder = create_encoder(encoder, pretrained=from_hub, **kwargs)
    elif not isinstance(encoder, nn.Module):
        raise TypeError(
            f"Expected `encoder` to be a timm model name or an nn.Module, got {encoder!r}"
        )
    elif pretrained or encoder_kwargs:
        raise ValueError("`pretrained` and `encoder_kwargs` apply to a timm model name only.")
    if weights_file is not None:
        load_encoder_weights(encoder, weights_file)
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


def _preset(spec: Mapping[str, Any] | None) -> PresetWeights | None:
    return None if spec is None else PresetWeights.from_config(spec)


def _weights_file(
    preset: PresetWeights | None, pretrained: bool, checkpoint_path: str | Path | None
) -> str | Path | None:
    """The weights file to load after creation: ``checkpoint_path``, or a preset's cached file.

    Raises one line naming the preset, the expected file and its publisher when it is missing.
    """
    if preset is None:
        return checkpoint_path
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(missing_weights_message(preset, checkpoint_path))
        return checkpoint_path
    if not pretrained:
        return None
    found = find_preset_weights(preset)
    if found is None:
        raise PretrainedWeightsUnavailableError(missing_weights_message(preset, None))
    return found


def create_encoder(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a timm model as a feature extractor (``num_classes=0``: pooled ``[k, D]`` features).

    Pretrained weights come from the local cache when they are there (the Hugging Face hub cache
    for timm's ``hf_hub_id``, torch's hub cache for its ``url``), without any network call.
    Otherwise the hub must answer within a couple of seconds and ``HF_HUB_OFFLINE`` must be unset;
    if not, this fails at once rather than after huggingface_hub's retries (hospital GPU nodes
    often have no internet).

    Args:
        name: A timm model name (``timm.list_models()``).
        pretrained: Load timm's pretrained weights.
        **kwargs: Passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...), with
            dotted ``*_layer`` names (``mlp_layer: timm.layers.SwiGLUPacked``) looked up in
            ``foundation.LAYER_NAMES``, and ``feature_pool`` (``cls_mean_patch``: Virchow's
            class token + mean patch token, ``D = 2 * embed_dim``) applied after creation.

    Returns:
        The model; ``model.num_features`` is ``D``.

    Raises:
        PretrainedWeightsUnavailableError: ``pretrained`` weights are not cached and the hub is
            offline or cannot be reached.
        ValueError: An unknown model, layer name or ``feature_pool``, or a ``preset`` with
            ``pretrained`` (a preset's weights are loaded by ``build_encoder``).

    Example:
        >>> create_encoder("test_vit", img_size=32).num_features
        64
        >>> create_encoder("test_vit", img_size=32, global_pool="", feature_pool="cls_mean_patch")(
        ...     torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """
    if not timm.is_model(name):
        raise ValueError(f"Expected a timm model name (see timm.list_models()), got {name!r}.")
    if kwargs.pop("preset", None) is not None and pretrained:
        raise ValueError(
            "A preset's weights come from its publisher's file: load them with build_encoder "
            "(encoder.pretrained=true), not timm's pretrained=True."
        )
    feature_pool = kwargs.pop("feature_pool", None)
    if feature_pool is not None:
        check_feature_pool(feature_pool, kwargs)
    kwargs = resolve_layer_names(kwargs)
    kwargs.setdefault("num_classes", 0)
    model = _create_timm_model(name, pretrained, kwargs)
    return model if feature_pool is None else attach_feature_pool(model, feature_pool)


def _create_timm_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``; pretrained weights from the cache, or a reachable hub, or a fix."""
    if not pretrained:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(
            name, pretrained=True, **_with_local_or_reachable_weights(name, kwargs)
        )
    except (LocalEntryNotFoundError, urllib.error.URLError) as err:
        reason = f"the download failed ({_one_line(err)})"
        raise PretrainedWeightsUnavailableError(_unavailable(name, kwargs, reason)) from err


def _with_local_or_reachable_weights(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` kwargs that load cached weights offline, or raise if a download would fail.

    Follows timm's choice of source (``_resolve_pretrained_source``): an explicit ``file``,
    ``state_dict`` or ``source`` is left to timm; else the hub's ``hf_hub_id``, else ``url``.
    """
    cfg = _pretrained_cfg(name, kwargs)
    if cfg.source or cfg.file or cfg.state_dict or not (cfg.hf_hub_id or cfg.url):
        return kwargs  # local weights, or none at all (timm says so)
    cached = _cached_weights(cfg, kwargs.get("cache_dir"))
    if cached is not None:
        path, custom_load = cached
        overlay = {**(kwargs.get("pretrained_cfg_overlay") or {})}
        overlay.update(file=str(path), custom_load=custom_load)
        return {**kwargs, "pretrained_cfg_overlay": overlay}
    origin = _hf_endpoint() if cfg.hf_hub_id else _origin(cfg.url)
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise PretrainedWeightsUnavailableError(
            _unavailable(name, kwargs, "HF_HUB_OFFLINE=1 (offline mode) is set")
        )
    if not _reachable(origin):
        reason = f"{origin} cannot be reached (no answer within {_PROBE_TIMEOUT_S:g} s)"
        raise PretrainedWeightsUnavailableError(_unavailable(name, kwargs, reason))
    if cfg.hf_hub_id and kwargs.get("cache_dir") is None:
        kwargs = {**kwargs, "cache_dir": str(default_hf_hub_cache())}  # download where we look
    return kwargs


def _pretrained_cfg(name: str, kwargs: Mapping[str, Any]) -> Any:
    """timm's resolved ``PretrainedCfg`` for ``name`` (a tag such as ``resnet10t.a1_in1k`` too)."""
    arch, tag = split_model_name_tag(name)
    return resolve_pretrained_cfg(
        arch, kwargs.get("pretrained_cfg") or tag or None, kwargs.get("pretrained_cfg_overlay")
    )


def _cached_weights(cfg: Any, cache_dir: str | Path | None) -> tuple[Path, bool] | None:
    """A cached weights file for ``cfg`` and whether timm loads it with ``custom_load``, or None."""
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        hub_cache = cache_dir or default_hf_hub_cache()
        for filename in _hf_weight_files(cfg):
            found = try_to_load_from_cache(
                repo, filename, cache_dir=hub_cache, revision=revision or None
            )
            if isinstance(found, str):
                return Path(found), cfg.custom_load == "hf"
    if cfg.url:
        path = _url_cache(cache_dir) / os.path.basename(urlsplit(cfg.url).path)
        if path.is_file():
            return path, bool(cfg.custom_load)
    return None


def _hf_weight_files(cfg: Any) -> list[str]:
    """Hub file names timm would download for ``cfg``, in its order (safetensors first)."""
    filename = cfg.hf_hub_filename or _HF_WEIGHTS
    if cfg.custom_load == "hf" or filename.endswith(".safetensors"):
        return [filename]
    if filename == _HF_WEIGHTS:
        return ["model.safetensors", filename]
    if filename.endswith(".bin"):
        return [filename.removesuffix(".bin") + ".safetensors", filename]
    return [filename]


def _url_cache(cache_dir: str | Path | None) -> Path:
    """Where timm (``load_state_dict_from_url``) keeps weights downloaded from a url."""
    return Path(cache_dir) if cache_dir else torch_hub_checkpoints()


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", _HF_DEFAULT_ENDPOINT).rstrip("/")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _env_true(key: str) -> bool:
    return os.environ.get(key, "").upper() in _TRUE


def _reachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a server answers a HEAD request to ``url`` within ``timeout`` seconds.

    Any HTTP answer below 500 counts (a 404 too); a 5xx is a proxy or gateway saying the hub is
    out of reach. The request runs in a daemon thread, as name resolution ignores socket timeouts
    and can hang far longer on a machine without DNS. Proxies come from the environment.
    """
    answered: list[bool] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError as err:
            answered.append(err.code < 500)
        except Exception:  # any other failure: no answer
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]


def _unavailable(name: str, kwargs: Mapping[str, Any], reason: str) -> str:
    """One line: which weights are missing, where we looked, why they cannot come, and the fixes."""
    cfg = _pretrained_cfg(name, kwargs)
    cache_dir = kwargs.get("cache_dir")
    source = f"{_hf_endpoint()}/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    places = [str(cache_dir or default_hf_hub_cache())] if cfg.hf_hub_id else []
    places += [str(_url_cache(cache_dir))] if cfg.url else []
    return (
        f"Pretrained weights of timm model {name!r} ({source}) are not in the local cache "
        f"({', '.join(places)}) and {reason}: {_OFFLINE_FIX}."
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


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

    Loading never runs code from the file: a received ``.pth`` is treated as hostile. A
    ``.safetensors`` file is read with safetensors, anything else with ``torch.load``'s
    weights-only unpickler (tensors and plain containers: a state dict, a Lightning checkpoint of
    this project, a timm training checkpoint). A file that needs any other class is refused.

    Args:
        encoder: The module to load into.
        path: A ``.safetensors`` file or a file written by ``torch.save``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeWeightsError: The file holds pickled objects other than tensors (not loaded).
        ValueError: The file is not a weights file, or its keys do not match the encoder's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Encoder checkpoint not found: {path}")
    state = _unwrap_state_dict(_read_weights(path), encoder)
    classifier = getattr(encoder, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = set(encoder.state_dict())
    state = {
        k: v for k, v in state.items() if k in own or not any(k.startswith(c) for c in classifier)
    }
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        lora = any(".lora_A." in k for k in unexpected)
        raise ValueError(
            f"Encoder checkpoint {path} does not match {type(encoder).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}."
            + (" It is a LoRA checkpoint: export its merged encoder with "
               "lightning_wsi.models.export_merged_encoder(module, 'encoder.safetensors') "
               "and pass that file." if lora else "")  # fmt: skip
        )
    encoder.load_state_dict(state)


def _read_weights(path: Path) -> Any:
    """What a weights file holds, read without running code from it."""
    if path.suffix.lower() == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"Encoder checkpoint {path} is not a readable safetensors file "
                f"({_one_line(err)}); pass a file written by safetensors.torch.save_file."
            ) from None
    try:
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(_refused(path, err)) from None
    except (EOFError, KeyError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"Encoder checkpoint {path} is not a file written by torch.save "
            f"({type(err).__name__}: {_one_line(err)}); pass a state dict saved with "
            "torch.save(model.state_dict(), path) or a .safetensors file."
        ) from None


def _refused(path: Path, err: pickle.UnpicklingError) -> str:
    """One line for a file the weights-only unpickler refused: what it holds and the fix."""
    names = _unsafe_globals(path, str(err))
    if names:
        return (
            f"Encoder checkpoint {path} holds pickled objects other than tensors "
            f"({', '.join(names[:5])}) and was not loaded, as unpickling them can run code; "
            f"{_RESAVE_FIX}."
        )
    opcode = re.search(r"Unsupported operand (\d+)", str(err))
    detail = f"pickle opcode {opcode.group(1)}" if opcode else _one_line(err)[:120]
    return (
        f"Encoder checkpoint {path} holds pickled data other than tensors ({detail}) and was "
        f"not loaded, as unpickling it can run code; {_RESAVE_FIX}."
    )


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """The non-allowed classes and functions a checkpoint's pickle names (read, never run)."""
    try:  # zip checkpoints: every global, from the opcodes
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy format: the first one, from the message
        return re.findall(r"Unsupported global: GLOBAL (\S+)", message)


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
