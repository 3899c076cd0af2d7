"""Where our side's training time goes, at the peer's size: one epoch of `sdm train` under torch.profiler.

    python benchmarks/peers/profile_ours.py [--data benchmarks/peers/.work/data] [--threads 2] [--rows 25]

Runs the `sdm train` command of run.py in this process with `sdm.training.train.train_epoch` wrapped in
torch.profiler (CPU), and prints the operators with the most self CPU time. Profiling adds its own
overhead: read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `sdm` sets it; must precede importing torch
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
import torch  # noqa: E402
from run import PAPER_SIZE  # noqa: E402

import sdm.training.train  # noqa: E402


def profiled(train_epoch, rows: int):
    """train_epoch, run under the profiler; the table is printed when the epoch ends."""

    def wrapper(*args, **kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            result = train_epoch(*args, **kwargs)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE / ".work" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    sdm.training.train.train_epoch = profiled(sdm.training.train.train_epoch, args.rows)  # train_ranks looks it up in the module
    from cli.app import main as sdm_main

    with tempfile.TemporaryDirectory() as run:
        sys.argv = ["sdm", "train", "--data", str(args.data), "--out", str(Path(run) / "run"), *PAPER_SIZE,
                    "--epochs", "1", "--threads", str(args.threads), "--quiet"]
        try:
            sdm_main()
        except SystemExit as done:
            if done.code:
                raise


if __name__ == "__main__":
    main()
