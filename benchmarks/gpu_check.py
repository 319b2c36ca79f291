"""A GPU check, ready for the day a GPU is lent: what the CPU tests cannot show, on one CUDA device.

Every check trains with the real Lightning ``Trainer`` and ``lightning_wsi.SlideModule`` on
in-memory slides (random tiles with a learnable signal), ``SlideParallelStrategy`` with
``devices=1`` where the strategy is under test; plain torch where simpler. Each check prints one
line ``[x] PASS|FAIL|SKIP  what: measured figures (bound)``, details indented below it; a
summary table ends the run, and the exit code is 1 if any check failed.

  a  bf16-mixed, chunked (``encode_chunk_size``) vs unchunked: the parameters after a few steps
     are bit-equal when the chunk equals the shard (all K tiles on one device); with smaller
     chunks the normalised L1 (sum |a - b| / sum |a|) of the parameters per module (encoder,
     aggregator) is at most 1e-3. An unchunked repeat shows whether the device is deterministic
     at all (the equality checks run with deterministic algorithms, warn-only).
  b  ``SlideModule(channels_last=True)`` under the slide-parallel strategy vs Lightning's
     default single-device strategy: normalised L1 of the parameter update (final - initial) per
     module, at most 1e-5 in 32-true and 1e-3 in bf16-mixed.
  c  ``gradient_clip_val=1.0`` with 16-mixed (CUDA; on CPU Lightning turns 16-mixed into
     bf16-mixed, so it is skipped) and with bf16-mixed: 2 steps, all parameters finite.
  d  host syncs: steps 1.. (after a warm-up step) under ``torch.cuda.set_sync_debug_mode("error")``
     around exactly ``SlideParallelStrategy.training_step`` and ``.backward`` (encode, gather,
     aggregator and loss, scatter, encoder backward, gradient sum); not the batch transfer,
     Lightning's loop, clipping or the optimiser step. If it raises, a "warn" pass lists every
     sync site. CUDA only.
  e  peak CUDA memory (``max_memory_allocated`` above the footprint before ``fit``, tiles already
     on the device) vs K, with and without chunking (the paper's Fig. 1): chunked, the peak at the
     largest K is at most 1.3x the peak at the smallest. On CPU the steps run, memory is "n/a".
  f  ViT-B/16 (timm ``vit_base_patch16_224``, random weights, bf16 autocast) training tiles/s:
     bare encoder forward + backward and a slide-parallel Trainer step, and as a fraction of the
     device's dense bf16 peak (FLOPs per tile from ``FlopCounterMode`` on one forward + backward;
     peak from a table by device name, unknown devices absolute only). ``--tiny``: test_vit.

    python benchmarks/gpu_check.py                  # one CUDA device, about 5 minutes on an H200
    python benchmarks/gpu_check.py --tiny           # CPU, tiny sizes, one thread: about 10 s
    python benchmarks/gpu_check.py --only a b       # some checks
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule, SlideParallelStrategy

CHECKS = {
    "a": "bf16-mixed chunked vs unchunked",
    "b": "channels_last, slide_parallel vs single device",
    "c": "mixed precision + gradient_clip_val=1.0",
    "d": "host syncs in the strategy's step + backward",
    "e": "peak memory vs K, chunked and unchunked",
    "f": "ViT-B/16 training throughput",
}

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, by a substring of the device name; the
# first match wins, so more specific names come first.
BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)

AGGREGATOR = {"hidden_dim": 64, "attention_dim": 32, "dropout": 0.0}


@dataclass
class Sizes:
    """Every size a check uses; ``--tiny`` gives CPU sizes, the defaults fill a GPU."""

    model: str = "resnet18"
    tile: int = 224
    k: int = 64
    chunk: int = 16
    steps: int = 3
    mem_ks: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])
    mem_chunk: int = 64
    vit: str = "vit_base_patch16_224"
    vit_tile: int = 224
    vit_k: int = 256
    vit_steps: int = 6

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(
            model="test_resnet", tile=32, k=8, chunk=3, steps=2, mem_ks=[8, 24], mem_chunk=4,
            vit="test_vit", vit_tile=32, vit_k=16, vit_steps=2,
        )  # fmt: skip


@dataclass
class Result:
    """One check's verdict and the figure printed for it."""

    status: str  # PASS, FAIL or SKIP
    figure: str
    details: list[str] = field(default_factory=list)


@dataclass
class Run:
    """Parameters (float32, CPU) before and after training, and the loss of every step."""

    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    losses: list[float]
    seconds: list[float]


# ------------------------------------------------------------------------------- helpers


def make_slides(
    n: int, k: int, tile: int, seed: int = 0, device: str = "cpu"
) -> list[dict[str, Any]]:
    """``n`` slides of ``k`` noise tiles (drawn on ``device``: 4096 tiles of 224 px are 2.4 GB);
    odd slides are positive, a quarter of their tiles has a raised red channel (the "lesion")."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.Generator(device=device).manual_seed(seed)
    slides = []
    for i in range(n):
        tiles = torch.randn(k, 3, tile, tile, generator=pixels, device=device) * 0.5
        label = i % 2
        if label:
            tiles[torch.randperm(k, generator=g)[: max(1, k // 4)].to(device), 0] += 2.0
        cells = torch.randperm(max(k, 64 * 64), generator=g)[:k]
        coords = torch.stack([cells % 64, cells // 64], dim=1).long() * 448
        slides.append({"tiles": tiles, "coords": coords.to(device), "target": torch.tensor(label),
                       "slide_id": f"s{i}"})  # fmt: skip
    return slides


def build_module(model: str, tile: int, channels_last: bool = False, seed: int = 0) -> SlideModule:
    """The same initial weights for the same ``seed``; constant learning rates."""
    torch.manual_seed(seed)
    kwargs = {"img_size": tile} if "vit" in model and tile != 224 else None
    return SlideModule(
        model, "gma", "binary", encoder_kwargs=kwargs, aggregator_kwargs=AGGREGATOR,
        channels_last=channels_last, encoder_lr=1e-3, aggregator_lr=1e-3, lr_schedule="constant",
    )  # fmt: skip


class Record(L.Callback):
    """Initial parameters, the loss and the wall time of every step (synchronised on CUDA)."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.initial = _params(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _sync(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _sync(module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def train(
    device: str,
    module: SlideModule,
    slides: list[dict[str, Any]],
    steps: int,
    strategy: Any = "auto",
    precision: str = "32-true",
    callbacks: tuple[L.Callback, ...] = (),
    **trainer_kwargs: Any,
) -> Run:
    """Fit ``steps`` optimiser steps on ``slides`` (cycled) with a real Trainer on one device."""
    record = Record()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy=strategy,
        precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[record, *callbacks], **trainer_kwargs,
    )  # fmt: skip
    data = [slides[i % len(slides)] for i in range(steps)]
    trainer.fit(module, DataLoader(data, batch_size=None))
    return Run(record.initial, _params(module), record.losses, record.seconds)


def norm_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b| / sum |a|; 0 where both are exactly zero."""
    diff, norm = float((a - b).abs().sum()), float(a.abs().sum())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def by_module(
    ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
) -> dict[str, float]:  # fmt: skip
    """Normalised L1 over all parameters of the encoder, and of the aggregator (with head)."""
    out = {}
    for part in ("encoder", "aggregator"):
        names = [n for n in ref if n.startswith(part + ".")]
        a = torch.cat([ref[n].reshape(-1) for n in names])
        b = torch.cat([other[n].reshape(-1) for n in names])
        out[part] = norm_l1(a, b)
    return out


def update(run: Run) -> dict[str, torch.Tensor]:
    return {n: run.final[n] - run.initial[n] for n in run.final}


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """Whether every tensor is identical, and the largest absolute difference."""
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    return all(torch.equal(a[n], b[n]) for n in a), worst


def fmt_l1(values: dict[str, float]) -> str:
    return f"enc {values['encoder']:.1e} agg {values['aggregator']:.1e}"


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels (warn-only where none exists), then the previous settings back, so
    the memory and throughput checks run as users do."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def free(device: str) -> None:
    """Return cached CUDA blocks between runs (the memory check starts each from a clean slate)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


# -------------------------------------------------------------------------------- checks


def check_a(device: str, s: Sizes) -> Result:
    slides = make_slides(2, s.k, s.tile)

    def run(chunk: int | None) -> Run:
        strategy = SlideParallelStrategy(encode_chunk_size=chunk)
        module = build_module(s.model, s.tile)
        return train(device, module, slides, s.steps, strategy, "bf16-mixed")

    with deterministic():
        ref, repeat, whole, chunked = run(None), run(None), run(s.k), run(s.chunk)
    same, worst = bit_equal(ref.final, whole.final)
    control, control_worst = bit_equal(ref.final, repeat.final)
    whole_l1 = by_module(ref.final, whole.final)
    params = by_module(ref.final, chunked.final)
    updates = by_module(update(ref), update(chunked))
    if same:
        shard = f"chunk={s.k} (=shard) bit-equal"
    elif control:
        shard = f"chunk={s.k} (=shard) NOT bit-equal (max|diff| {worst:.1e})"
    else:  # the device itself is not repeatable: bit-equality cannot be asked for
        shard = f"chunk={s.k} (=shard) params L1 {fmt_l1(whole_l1)} (<= 1e-3, repeat not bit-equal)"
    ok = same or (not control and max(whole_l1.values()) <= 1e-3)
    ok = ok and max(params.values()) <= 1e-3
    figure = f"{shard}; chunk={s.chunk}: params L1 {fmt_l1(params)} (<= 1e-3)"
    details = [
        f"{s.model}, K={s.k} tiles of {s.tile} px, {s.steps} AdamW steps, bf16-mixed",
        "unchunked repeat: "
        + ("bit-equal" if control else f"differs, max|diff| {control_worst:.1e}"),
        f"chunk={s.chunk}: update (final - initial) L1 {fmt_l1(updates)} (reported, no bound)",
    ]
    return Result("PASS" if ok else "FAIL", figure, details)


def check_b(device: str, s: Sizes) -> Result:
    slides = make_slides(2, s.k, s.tile)
    bounds = {"32-true": 1e-5, "bf16-mixed": 1e-3}
    parts, details, ok = [], [f"{s.model}, K={s.k}, {s.steps} AdamW steps"], True
    for precision, bound in bounds.items():
        runs = {}
        try:
            with deterministic():
                for name, strategy in (("single", "auto"), ("slide", SlideParallelStrategy())):
                    module = build_module(s.model, s.tile, channels_last=True)
                    runs[name] = train(device, module, slides, s.steps, strategy, precision)
        except Exception as err:  # noqa: BLE001 - a failed run is the check's finding
            ok = False
            failed = "slide_parallel" if "single" in runs else "single device"
            parts.append(f"{precision}: {failed} run raised")
            details.append(f"{precision}: {short(err)}")
            continue
        values = by_module(update(runs["single"]), update(runs["slide"]))
        ok = ok and max(values.values()) <= bound
        parts.append(f"{precision} update L1 {fmt_l1(values)} (<= {bound:.0e})")
    return Result("PASS" if ok else "FAIL", "; ".join(parts), details)


def check_c(device: str, s: Sizes) -> Result:
    slides = make_slides(2, s.k, s.tile)
    parts, details, statuses = [], [], []
    for precision in ("16-mixed", "bf16-mixed"):
        if precision == "16-mixed" and device != "cuda":
            statuses.append("SKIP")
            parts.append("16-mixed: SKIP (Lightning runs 16-mixed as bf16-mixed on CPU)")
            continue
        try:
            module = build_module(s.model, s.tile)
            run = train(
                device, module, slides, 2, SlideParallelStrategy(), precision,
                gradient_clip_val=1.0,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001
            statuses.append("FAIL")
            parts.append(f"{precision}: raised")
            details.append(f"{precision}: {short(err)}")
            continue
        finite = all(bool(torch.isfinite(p).all()) for p in run.final.values())
        moved = any(not torch.equal(run.initial[n], run.final[n]) for n in run.final)
        statuses.append("PASS" if finite and len(run.losses) == 2 else "FAIL")
        parts.append(
            f"{precision}: {len(run.losses)} steps, parameters "
            f"{'finite' if finite else 'NOT finite'}"
            + ("" if moved else ", none moved (the loss scaler skipped both steps?)")
        )
    status = "FAIL" if "FAIL" in statuses else ("PASS" if "PASS" in statuses else "SKIP")
    return Result(status, "; ".join(parts), details)


class _Arm(L.Callback):
    """Arms the guard from the second step on (the first one builds buckets, picks kernels)."""

    def __init__(self) -> None:
        self.armed = False
        self.guarded_steps = 0
        self.guarded_calls = 0  # strategy methods run under the mode: proof of coverage

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.armed = batch_idx >= 1
        self.guarded_steps += int(self.armed)


def _guard(strategy: SlideParallelStrategy, arm: _Arm, mode: str) -> None:
    """Run the strategy's ``training_step`` and ``backward`` (only) under the sync debug mode."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not arm.armed:
                return method(*args, **kwargs)
            arm.guarded_calls += 1
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return guarded

    strategy.training_step = wrap(strategy.training_step)  # type: ignore[method-assign]
    strategy.backward = wrap(strategy.backward)  # type: ignore[method-assign]


def _site(tb: traceback.StackSummary) -> str:
    """The innermost frame outside torch itself: the line that asked for the sync."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in tb if not f.filename.startswith(torch_dir)] or list(tb)
    f = frames[-1]
    return f"{_relative(f.filename)}:{f.lineno} in {f.name}"


def _relative(path: str) -> str:
    for marker in ("site-packages/", "lightning_wsi/"):
        if marker in path:
            head = "" if marker == "site-packages/" else "lightning_wsi/"
            return head + path.split(marker, 1)[1]
    return path


def _sync_run(device: str, s: Sizes, chunk: int | None, mode: str) -> _Arm:
    """Train ``max(3, steps)`` steps, the strategy's step + backward guarded from step 1 on."""
    arm = _Arm()
    strategy = SlideParallelStrategy(encode_chunk_size=chunk)
    _guard(strategy, arm, mode)
    slides = make_slides(2, s.k, s.tile)
    module = build_module(s.model, s.tile)
    train(device, module, slides, max(3, s.steps), strategy, "bf16-mixed", callbacks=(arm,))
    return arm


def _sync_sites(device: str, s: Sizes, chunk: int | None) -> tuple[str, list[str]]:
    """Under "error": the first sync (or none); if one, every site from a "warn" pass."""
    try:
        arm = _sync_run(device, s, chunk, "error")
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        first = _site(traceback.extract_tb(err.__traceback__))
    else:
        if arm.guarded_calls < 2 * arm.guarded_steps:
            raise RuntimeError(
                f"the guard ran {arm.guarded_calls} strategy calls in {arm.guarded_steps} steps: "
                "Lightning no longer calls strategy.training_step/backward as wrapped"
            )
        return f"none in {arm.guarded_steps} steps ({arm.guarded_calls} guarded calls)", []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arm = _sync_run(device, s, chunk, "warn")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{_relative(w.filename)}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    total = sum(sites.values())
    listing = [f"  {n}x {site}" for site, n in sorted(sites.items(), key=lambda kv: -kv[1])]
    return f"{total} in {arm.guarded_steps} steps, first at {first}", listing


def check_d(device: str, s: Sizes) -> Result:
    if device != "cuda":
        return Result("SKIP", "needs CUDA (torch.cuda.set_sync_debug_mode)")
    details = [
        f"covers SlideParallelStrategy.training_step + backward of steps 1..{max(3, s.steps) - 1}"
        " (bf16-mixed); not the batch transfer, Lightning's loop, clipping or the optimiser step"
    ]
    parts, clean = [], True
    for chunk in (None, s.chunk):
        label = "unchunked" if chunk is None else f"chunk {chunk}"
        found, listing = _sync_sites(device, s, chunk)
        clean = clean and not listing
        parts.append(f"{label}: {found}")
        details += [f"{label}:", *listing] if listing else []
    return Result("PASS" if clean else "FAIL", "host syncs " + "; ".join(parts), details)


def check_e(device: str, s: Sizes) -> Result:
    cuda = device == "cuda"
    labels = {None: "none", s.mem_chunk: str(s.mem_chunk)}
    rows: dict[str, dict[int, str]] = {label: {} for label in labels.values()}
    peaks: dict[str, dict[int, float]] = {label: {} for label in labels.values()}
    failed = []
    for k in s.mem_ks:
        free(device)
        slide = make_slides(1, k, s.tile, seed=k, device=device)[0]  # counted in the footprint
        for chunk, label in labels.items():
            free(device)
            module = build_module(s.model, s.tile)
            base = torch.cuda.memory_allocated() if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            strategy = SlideParallelStrategy(encode_chunk_size=chunk)
            try:
                run = train(device, module, [slide], 2, strategy, "bf16-mixed")
            except torch.cuda.OutOfMemoryError:
                rows[label][k] = "OOM"
                if chunk is not None:
                    failed.append(f"chunk {chunk} K={k} ran out of memory")
                continue
            finally:
                del module, strategy
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else math.nan
            peaks[label][k] = peak
            memory = f"{peak:.0f} MiB" if cuda else "n/a"
            rows[label][k] = f"{memory}, {k / run.seconds[-1]:.0f} tiles/s"
        del slide
    details = [f"{s.model}, tiles of {s.tile} px, bf16-mixed, one step after a warm-up step"]
    details += [f"chunk {label:>4}: " + "; ".join(f"K={k} {v}" for k, v in by_k.items())
                for label, by_k in rows.items()]  # fmt: skip
    if not cuda:
        return Result("SKIP", f"memory n/a on cpu; steps ran for K={s.mem_ks}", details)
    small, large = min(s.mem_ks), max(s.mem_ks)
    chunked, plain = peaks[labels[s.mem_chunk]], peaks["none"]
    if failed or large not in chunked or small not in chunked:
        return Result("FAIL", "; ".join(failed) or "chunked runs incomplete", details)
    ratio = chunked[large] / chunked[small]
    plain_text = (
        f"{plain[large] / plain[small]:.2f}" if large in plain and small in plain
        else f"OOM at K={large}"
    )  # fmt: skip
    figure = (
        f"peak K={large}/K={small}: chunk {s.mem_chunk} {ratio:.2f} (<= 1.3), "
        f"unchunked {plain_text}"
    )
    return Result("PASS" if ratio <= 1.3 else "FAIL", figure, details)


def _peak(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for key, v in BF16_PEAK if key in name), None)


def check_f(device: str, s: Sizes) -> Result:
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(device)
    module = build_module(s.vit, s.vit_tile)
    encoder = module.encoder.to(dev)
    sample = torch.randn(min(4, s.vit_k), 3, s.vit_tile, s.vit_tile, device=dev)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=torch.bfloat16):
            features = encoder(sample)
        features.float().sum().backward()
    flops = counter.get_total_flops() / len(sample)
    encoder.zero_grad(set_to_none=True)
    # The rule of thumb beside it: forward 2 * parameters * tokens, backward twice that.
    patch_embed = getattr(encoder, "patch_embed", None)
    tokens = getattr(patch_embed, "num_patches", 0) + getattr(encoder, "num_prefix_tokens", 0)
    rule = 6 * sum(p.numel() for p in encoder.parameters()) * tokens

    # Bare encoder forward + backward, plain torch.
    tiles = torch.randn(s.vit_k, 3, s.vit_tile, s.vit_tile, device=dev)
    times = []
    for i in range(2 + s.vit_steps):
        _sync(dev)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            features = encoder(tiles)
        features.float().sum().backward()
        encoder.zero_grad(set_to_none=True)
        _sync(dev)
        if i >= 2:
            times.append(time.perf_counter() - start)
    bare = s.vit_k / statistics.median(times)
    del tiles, features
    free(device)

    # A slide-parallel Trainer step: encode, aggregate, loss, backward, AdamW.
    slides = make_slides(2, s.vit_k, s.vit_tile)
    run = train(device, module, slides, 2 + s.vit_steps, SlideParallelStrategy(), "bf16-mixed")
    step = s.vit_k / statistics.median(run.seconds[2:])
    finite = all(math.isfinite(v) for v in run.losses)
    name, peak = _peak(device)

    def share(rate: float) -> str:
        return f" = {rate * flops / peak:.2f} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""

    figure = f"Trainer step {step:.0f} tiles/s{share(step)}; bare fwd+bwd {bare:.0f}{share(bare)}"
    details = [
        f"{s.vit}, K={s.vit_k} tiles of {s.vit_tile} px, bf16 autocast, median of "
        f"{s.vit_steps} steps after 2 warm-up; {flops / 1e9:.2f} GFLOP per tile forward+backward "
        f"(FlopCounterMode; 6 * params * tokens: {rule / 1e9:.2f}); device {name}"
        + ("" if peak or device != "cuda" else " (no peak in the table: absolute only)"),
    ]
    return Result("PASS" if finite else "FAIL", figure, details)


RUNNERS: dict[str, Callable[[str, Sizes], Result]] = {
    "a": check_a, "b": check_b, "c": check_c, "d": check_d, "e": check_e, "f": check_f,
}  # fmt: skip


# ---------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda if available (cpu with --tiny)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=sorted(CHECKS))
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (--tiny: 1; two threads on a loaded 2-core box took 9-80 s)",
    )  # fmt: skip
    defaults = Sizes()
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, type=int, nargs="+", default=None)
        else:
            parser.add_argument(flag, type=type(value), default=None)
    args = parser.parse_args(argv)
    sizes = Sizes.tiny() if args.tiny else defaults
    for name in vars(defaults):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.threads is None and args.tiny:
        args.threads = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu (or --tiny)")
    return args, sizes


def main(argv: list[str] | None = None) -> int:
    args, sizes = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    name, _ = _peak(args.device)
    print(
        f"gpu_check on {args.device} ({name}), torch {torch.__version__}, lightning "
        f"{L.__version__}; sizes {vars(sizes)}",
        flush=True,
    )
    results: dict[str, Result] = {}
    start = time.perf_counter()
    for check in args.only:
        began = time.perf_counter()
        try:
            result = RUNNERS[check](args.device, sizes)
        except Exception as err:  # noqa: BLE001 - report and go on with the other checks
            result = Result("FAIL", f"raised {short(err)}", traceback.format_exc().splitlines())
        free(args.device)
        results[check] = result
        print(f"[{check}] {result.status:<4}  {CHECKS[check]}: {result.figure}"
              f"  ({time.perf_counter() - began:.1f} s)", flush=True)  # fmt: skip
        for line in result.details:
            print(f"      {line}", flush=True)
    print(f"\nsummary ({time.perf_counter() - start:.0f} s on {args.device}, {name})")
    print(f"{'check':<6} {'status':<6} {'what':<47} figure")
    for check, result in results.items():
        print(f"{check:<6} {result.status:<6} {CHECKS[check]:<47} {result.figure}")
    return 1 if any(r.status == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
