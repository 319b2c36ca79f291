"""Peak memory and throughput of a training step versus K, with and without gradient caching.

Each configuration (K, chunk, precision) runs in a fresh process: one slide of K tiles, a real
``Trainer`` step with ``SlideParallelStrategy(encode_chunk_size=chunk)`` on one device. Memory is
the peak above the process's footprint just before training (model, optimiser-free, and the
tiles themselves already allocated): CPU peak RSS (``VmHWM``) here, CUDA peak allocated memory on
a GPU. Prints a table, the two ratios the design asks for (peak at the largest K over the peak at
the smallest K for the same chunk; chunked over unchunked tiles per second at the same K) and
writes a PNG of memory versus K, like the paper's Fig. 1.

    python benchmarks/chunked_memory.py [--ks 32 64 128 256 512] [--chunk 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(model: str, k: int, size: int, chunk: int | None, precision: str) -> dict:
    """One configuration, in this process: peak memory above the pre-training footprint."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_wsi import SlideModule, SlideParallelStrategy

    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    module = SlideModule(model, "gma", "binary", lr_schedule="constant")
    g = torch.Generator().manual_seed(0)
    slide = {
        "tiles": torch.randn(k, 3, size, size, generator=g),
        "coords": torch.arange(2 * k).view(k, 2) * size,
        "target": torch.tensor(1),
        "slide_id": "s",
    }
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=2, precision=precision,
        strategy=SlideParallelStrategy(encode_chunk_size=chunk), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()],
    )  # fmt: skip
    baseline = _rss_kib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, DataLoader([slide, slide], batch_size=None))
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        kind = "CUDA peak allocated"
    else:
        peak_mib = (_rss_kib("VmHWM") - baseline) / 1024
        kind = "CPU peak RSS above baseline"
    return {"peak_mib": peak_mib, "seconds": times[-1], "kind": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--png", type=Path, default=Path("benchmarks/chunked_memory.png"))
    parser.add_argument("--worker", nargs=4, metavar=("K", "CHUNK", "PRECISION", "MODEL"))
    args = parser.parse_args()
    if args.worker:
        k, chunk, precision, model = args.worker
        chunk_size = None if chunk == "none" else int(chunk)
        print(json.dumps(worker(model, int(k), args.size, chunk_size, precision)))
        return

    results: dict[tuple[str, str], dict[int, dict]] = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    print(f"{args.model}, tiles of {args.size} px, one device; one step after one warm-up step")
    print(f"{'precision':>11} {'chunk':>6} {'K':>5} {'peak MiB':>9} {'s/step':>7} {'tiles/s':>8}")
    for precision in args.precisions:
        for chunk in (None, args.chunk):
            label = (precision, "none" if chunk is None else str(chunk))
            results[label] = {}
            for k in args.ks:
                cmd = [sys.executable, __file__, "--size", str(args.size), "--worker", str(k)]
                cmd += [label[1], precision, args.model]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results[label][k] = r
                print(
                    f"{precision:>11} {label[1]:>6} {k:>5} {r['peak_mib']:>9.0f} "
                    f"{r['seconds']:>7.2f} {k / r['seconds']:>8.1f}",
                    flush=True,
                )
    kind = next(iter(next(iter(results.values())).values()))["kind"]
    small, large = min(args.ks), max(args.ks)
    for precision in args.precisions:
        chunked = results[(precision, str(args.chunk))]
        plain = results[(precision, "none")]
        print(
            f"{precision}: chunk {args.chunk}: peak K={large} / K={small} = "
            f"{chunked[large]['peak_mib'] / chunked[small]['peak_mib']:.2f} "
            f"(unchunked: {plain[large]['peak_mib'] / plain[small]['peak_mib']:.2f}); "
            f"throughput chunked / unchunked at K={large}: "
            f"{plain[large]['seconds'] / chunked[large]['seconds']:.2f}"
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for (precision, chunk), by_k in results.items():
        label = f"{precision}, " + ("no chunking" if chunk == "none" else f"chunk {chunk}")
        ax.plot(list(by_k), [r["peak_mib"] for r in by_k.values()], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (tiles per slide)")
    ax.set_ylabel(f"{kind} (MiB)")
    ax.set_title(f"Memory of one training step, {args.model} at {args.size} px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
