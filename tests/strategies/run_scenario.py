"""Train one harness scenario as a script, for launchers that start processes themselves.

    python run_scenario.py OUT_DIR SCENARIO --devices N [--num-nodes M] [--strategy NAME]

Run by Lightning's own launcher (``strategy="slide_parallel"`` re-runs this script once per extra
device) or by ``torchrun`` (one process per node here); every rank writes its result to OUT_DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from harness import Scenario, train  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("scenario")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="slide_parallel")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    aggregator = args.scenario.split("-")[0]
    scenario = Scenario(args.scenario, aggregator=aggregator)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    train(scenario, args.devices, args.out, rank, args.strategy, args.num_nodes)
