"""What fine-tuning a ViT-B/16 foundation encoder costs: memory and speed of one training step.

ViT-B/16 (timm ``vit_base_patch16_224``, random weights: memory and speed do not depend on the
values) x how it trains {frozen, lora, last4, full} x K x {unchunked, chunked (gradient
caching)} x {gradient checkpointing off, on}. Each configuration runs in a fresh process: one
slide of K random tiles, one real ``Trainer`` step (``SlideModule`` + ``SlideParallelStrategy``
on one device, AdamW) after the model and the tiles are allocated. Memory is the peak above that
footprint (so it holds gradients, AdamW state and activations): CPU peak RSS (``VmHWM``, reset
just before the step) here, ``torch.cuda.max_memory_allocated`` on a GPU. Tiles/s is K over the
step's wall time. Prints a table and the key ratios, and writes a PNG.

On the CPU the workers run with glibc's mmap threshold fixed at its initial 128 KiB
(``MALLOC_MMAP_THRESHOLD_``): with the default dynamic threshold, freed large buffers stay in
the heap and RSS measures the allocator's retention, not tensors. peft's adapters make many
short-lived activation-sized temporaries, and ViT-B at K=256 then read 3835 MiB under LoRA
against 2876 MiB fully trained for a bare forward + backward, where with the fixed threshold
both hold 2.5 GiB (the same activations). It costs tiles/s (5-15% in a bare step, up to a
third in chunked runs, which allocate most); ``--default-malloc`` measures with glibc's defaults.

On the CPU the tiles are 64 px (``img_size=64``: 16 patches + the class token instead of
196 + 1 at 224 px), float32, K in {64, 256}, chunks of 32: a ViT-B step at 224 px takes minutes
on 2 cores. ``--gpu``: 224 px, bf16-mixed, K in {1024, 4096, 16384}, chunks of 256, a warm-up
step before the timed one; an unchunked run that does not fit is recorded as OOM and its larger
K are skipped.

    python benchmarks/foundation_tuning.py                       # CPU: 28 runs, about 7 min
    python benchmarks/foundation_tuning.py --modes lora full --ks 256 --checkpointing off
    python benchmarks/foundation_tuning.py --gpu                 # one CUDA device, 42 runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("frozen", "lora", "last4", "full")
# SlideModule arguments per way of tuning: the finetune config group's choices.
_MODE_ARGS: dict[str, dict[str, Any]] = {
    "frozen": {"freeze_encoder": True},
    "lora": {"lora": {"rank": 8, "alpha": 16}},  # qkv, proj, fc1, fc2 (conf/finetune/lora.yaml)
    "last4": {"train_last_n_blocks": 4},
    "full": {},
}
_COLOURS = {"frozen": "tab:gray", "lora": "tab:green", "last4": "tab:orange", "full": "tab:blue"}
_STYLES = {(False, False): "-", (False, True): "--", (True, False): ":", (True, True): "-."}


@dataclass(frozen=True)
class Config:
    """One point of the grid: how the encoder trains, K, chunk size (None: unchunked), ckpt."""

    mode: str
    k: int
    chunk: int | None
    checkpointing: bool

    @property
    def variant(self) -> str:
        chunk = "no chunking" if self.chunk is None else f"chunk {self.chunk}"
        return f"{chunk}, ckpt {'on' if self.checkpointing else 'off'}"


@dataclass(frozen=True)
class Setup:
    """What every configuration shares: encoder, tile size, precision, steps, device."""

    model: str = "vit_base_patch16_224"
    size: int = 64
    precision: str = "32-true"
    steps: int = 1  # the last one is timed; more than one: warm-up steps first
    device: str = "cpu"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0): an earlier peak must not hide the step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _slide(k: int, size: int, device: str) -> dict[str, Any]:
    """One slide of ``k`` random tiles ``[k, 3, size, size]`` already on ``device``."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "tiles": torch.randn(k, 3, size, size, generator=g).to(device),
        "coords": (torch.arange(2 * k).view(k, 2) * size).to(device),
        "target": torch.tensor(1, device=device),
        "slide_id": "s",
    }


def _grad_reached_encoder(module: Any) -> bool:
    """Whether some trainable encoder parameter got a non-zero gradient (guards a setting in
    which checkpointing or adapters silently cut the encoder off the loss)."""
    return any(
        p.grad is not None and bool(p.grad.abs().sum() > 0)
        for p in module.encoder.parameters()
        if p.requires_grad
    )


def worker(config: Config, setup: Setup) -> dict[str, Any]:
    """Run ``setup.steps`` training steps of ``config`` in this process; memory and time.

    Returns ``peak_mib`` (above the footprint before ``fit``), ``seconds`` (the last step),
    ``trainable_m`` (encoder parameters that train, millions), ``grad_ok`` and ``status``.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_wsi import SlideModule, SlideParallelStrategy

    warnings.filterwarnings("ignore")
    cuda = setup.device == "cuda"
    torch.manual_seed(0)
    module = SlideModule(
        setup.model, "gma", "binary", encoder_kwargs={"img_size": setup.size},
        grad_checkpointing=config.checkpointing, lr_schedule="constant",
        **_MODE_ARGS[config.mode],
    )  # fmt: skip
    trainable = sum(p.numel() for p in module.encoder.parameters() if p.requires_grad)
    slide = _slide(config.k, setup.size, setup.device)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=setup.steps,
        precision=setup.precision, strategy=SlideParallelStrategy(encode_chunk_size=config.chunk),
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Timer()],
    )  # fmt: skip
    result = {"trainable_m": trainable / 1e6, "status": "ok"}
    if cuda:
        module.to("cuda")
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result["kind"] = "CUDA peak allocated above the footprint"
    else:
        _reset_cpu_peak()
        baseline = _status_kib("VmRSS") * 1024
        result["kind"] = "CPU peak RSS above the footprint"
    try:
        trainer.fit(module, DataLoader([slide] * setup.steps, batch_size=None))
    except Exception as err:  # the strategy re-raises a rank's OOM as SlideParallelError
        if "out of memory" not in str(err).lower():
            raise
        return {**result, "status": "OOM", "peak_mib": float("nan"), "seconds": float("nan")}
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    result.update(peak_mib=(peak - baseline) / 2**20, seconds=times[-1])
    result["grad_ok"] = config.mode == "frozen" or _grad_reached_encoder(module)
    return result


def _run_one(config: Config, setup: Setup, fixed_malloc: bool) -> dict[str, Any]:
    """``worker`` in a fresh process; a process that dies (the OOM killer) is a failed row."""
    cmd = [sys.executable, __file__, "--worker", json.dumps([asdict(config), asdict(setup)])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if fixed_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:200]
        return {"status": f"failed (exit {done.returncode}: {tail})", "peak_mib": float("nan"),
                "seconds": float("nan"), "trainable_m": float("nan")}  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def grid(modes: list[str], ks: list[int], chunk: int, checkpointing: list[bool]) -> list[Config]:
    """The configurations to run. A frozen encoder builds no graph, so gradient checkpointing
    changes nothing there and is run only off."""
    configs = []
    for mode in modes:
        for chunk_size in (None, chunk):
            for ckpt in checkpointing:
                if mode == "frozen" and ckpt and False in checkpointing:
                    continue
                configs += [Config(mode, k, chunk_size, ckpt) for k in ks]
    return configs


def _row(config: Config, r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{config.mode:>6} {config.variant:>24} {config.k:>6}   {r['status']}"
    grad = "" if r.get("grad_ok", True) else "  NO ENCODER GRADIENT"
    return (
        f"{config.mode:>6} {config.variant:>24} {config.k:>6} {r['trainable_m']:>9.2f} "
        f"{r['peak_mib']:>9.0f} {r['seconds']:>8.2f} {config.k / r['seconds']:>8.1f}{grad}"
    )


def _get(results: dict[Config, dict], config: Config, key: str) -> float:
    r = results.get(config)
    return float("nan") if r is None or r["status"] != "ok" else float(r[key])


def _ratio(results: dict[Config, dict], top: Config, bottom: Config, key: str) -> float:
    return _get(results, top, key) / _get(results, bottom, key)


def ratios(results: dict[Config, dict], k: int, chunk: int) -> list[str]:
    """The ratios that answer the issue, at ``k``: each mode's memory over full fine-tuning's,
    chunked over unchunked (memory, and speed as unchunked s/step over chunked), checkpointing
    on over off."""

    def line(what: str, modes: tuple[str, ...], top: Any, bottom: Any, key: str) -> str:
        speed = key == "seconds"  # tiles/s ratio: the bottom's time over the top's
        cells = []
        for mode in modes:
            a, b = (bottom(mode), top(mode)) if speed else (top(mode), bottom(mode))
            cells.append(f"{mode} {_ratio(results, a, b, key):.2f}")
        return f"K={k}, {what} {'tiles/s' if speed else 'memory'}: " + ", ".join(cells)

    trained = MODES[1:]  # a frozen encoder has no backward to checkpoint
    lines = [
        line("over full (unchunked, ckpt off)", MODES[:-1], lambda m: Config(m, k, None, False),
             lambda m: Config("full", k, None, False), "peak_mib"),
    ]  # fmt: skip
    for ckpt, modes in ((False, MODES), (True, trained)):
        what = f"chunk {chunk} / unchunked, ckpt {'on' if ckpt else 'off'},"
        for key in ("peak_mib", "seconds"):
            lines.append(line(what, modes, lambda m, c=ckpt: Config(m, k, chunk, c),
                              lambda m, c=ckpt: Config(m, k, None, c), key))  # fmt: skip
    for key in ("peak_mib", "seconds"):
        lines.append(line("ckpt on / off, unchunked,", trained, lambda m: Config(m, k, None, True),
                          lambda m: Config(m, k, None, False), key))  # fmt: skip
    return lines


def plot(results: dict[Config, dict], setup: Setup, png: Path) -> None:
    """Peak memory and tiles/s versus K: colour = how the encoder trains, line style =
    chunking and checkpointing."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    series: dict[tuple, list[tuple[int, dict]]] = {}
    for config, r in results.items():
        if r["status"] == "ok":
            key = (config.mode, config.chunk is not None, config.checkpointing, config.variant)
            series.setdefault(key, []).append((config.k, r))
    for (mode, chunked, ckpt, variant), points in series.items():
        points.sort(key=lambda p: p[0])
        ks = [k for k, _ in points]
        style = dict(color=_COLOURS[mode], linestyle=_STYLES[(chunked, ckpt)], marker="o")
        axes[0].plot(ks, [r["peak_mib"] for _, r in points], label=f"{mode}, {variant}", **style)
        axes[1].plot(ks, [k / r["seconds"] for k, r in points], **style)
    kind = next((r["kind"] for r in results.values() if "kind" in r), "peak memory")
    for ax, label in zip(axes, (f"{kind} (MiB)", "tiles / s (one training step)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (tiles per slide)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"ViT-B/16 ({setup.model}, random weights) at {setup.size} px, {setup.precision}, "
        f"{setup.device}: one training step"
    )
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="224 px, bf16-mixed, K 1024..16384")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--ks", type=int, nargs="+", help="default 64 256 (GPU 1024 4096 16384)")
    parser.add_argument("--chunk", type=int, help="tiles per chunk (default 32; GPU 256)")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--size", type=int, help="tile px (default 64; GPU 224)")
    parser.add_argument("--model", default=Setup.model, help="timm ViT (test_vit: a smoke run)")
    parser.add_argument("--png", type=Path, default=Path("benchmarks/foundation_tuning.png"))
    parser.add_argument(
        "--default-malloc", action="store_true", help="glibc's dynamic mmap threshold (CPU)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        config, setup = json.loads(args.worker)
        print(json.dumps(worker(Config(**config), Setup(**setup))))
        return
    if args.gpu:
        setup = Setup(args.model, args.size or 224, "bf16-mixed", steps=2, device="cuda")
        ks, chunk = args.ks or [1024, 4096, 16384], args.chunk or 256
    else:
        setup = Setup(args.model, args.size or 64)
        ks, chunk = args.ks or [64, 256], args.chunk or 32
    configs = grid(args.modes, sorted(ks), chunk, [c == "on" for c in args.checkpointing])
    print(
        f"{setup.model}, random weights, tiles of {setup.size} px, {setup.precision} on "
        f"{setup.device}; {setup.steps} step(s) per fresh process, the last one timed; glibc "
        f"mmap threshold {'dynamic' if args.default_malloc or args.gpu else 'fixed at 128 KiB'}"
    )
    print(f"{'mode':>6} {'variant':>24} {'K':>6} {'train M':>9} {'peak MiB':>9} {'s/step':>8} "
          f"{'tiles/s':>8}")  # fmt: skip
    results: dict[Config, dict] = {}
    started = time.perf_counter()
    for config in configs:
        smaller = [c for c in results if c.k < config.k and results[c]["status"] == "OOM"]
        if any((c.mode, c.chunk, c.checkpointing) == (config.mode, config.chunk,
               config.checkpointing) for c in smaller):  # fmt: skip
            results[config] = {"status": "skipped (a smaller K did not fit)"}
        else:
            results[config] = _run_one(config, setup, not (args.default_malloc or args.gpu))
        print(_row(config, results[config]), flush=True)
    print(f"grid: {len(configs)} configurations in {time.perf_counter() - started:.0f} s")
    if set(args.modes) == set(MODES):
        for line in ratios(results, max(ks), chunk):
            print(line)
    plot(results, setup, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
