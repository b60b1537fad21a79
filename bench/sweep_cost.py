"""The fixed cost of a sweep trial, with the decode cache warm: from the worker starting a trial to its first
optimizer step, and from the end of its training to the worker starting the next trial.

    python bench/sweep_cost.py --dataset ../shared/datasets/cifar10 [--trials 4] [train/main.py options]

Fills the decode cache with one tiny run, then runs a grid of --trials one-epoch trials (lr values) with one
worker (python -m train.sweep), and timestamps its output lines as they arrive:
- start -> first step: the worker's "trial N: ... -> folder" line (it is about to start the trial's process)
  to the trial's first step line (--log-every 1): process start, imports, the data from the decode cache, the
  model, the first step itself;
- test split: the trial's epoch-end line (trained and validated) to its "test accuracy" line: the best
  model loaded and the test split evaluated (work that grows with the model and the split, not overhead),
  summary, report and plots;
- end -> next trial: that line to the next "trial N:" line: process exit, the worker's tell and ask.
The rest of a trial is its epochs, of which a real trial has many. The default trial is resnet18 at 32 px on
10 batches, so that the model's own work stays small beside the fixed costs.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def grid_file(folder: str, trials: int) -> Path:
    """A grid sweep file of `trials` lr values in `folder`."""
    path = Path(folder) / f"grid-{trials}.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {
        "lr": {"values": [0.01 * (i + 1) for i in range(trials)]}}}))
    return path


def warm_cache(dataset: str, folder: str) -> None:
    """Fill the decode cache with one tiny run, so that no trial measured decodes the dataset."""
    warm = [sys.executable, "-m", "train.main", "--dataset", dataset, "--epochs", "1", "--max-steps", "1",
            "--limit-batches", "1", "--no-wandb", "--output-dir", f"{folder}/warm"]
    subprocess.run(warm, cwd=ROOT, check=True, capture_output=True)


def timed_lines(command: list) -> list:
    """(seconds since start, line) of every stdout line of a command, as it arrives."""
    start, lines = time.monotonic(), []
    with tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
            for line in proc.stdout:
                lines.append((time.monotonic() - start, line.rstrip()))
        if proc.returncode:
            err.seek(0)
            sys.exit(f"the sweep failed (exit {proc.returncode}):\n" + "\n".join(err.read().splitlines()[-20:]))
    return lines


def phases(lines: list) -> dict:
    """{phase: [seconds, one per trial]}: start -> first step, the final test pass, end -> next trial."""
    found, start, tested = {"start -> first step": [], "test split": [], "end -> next trial": []}, None, None
    end = None
    for t, line in lines:
        if re.match(r"trial \d+: .* -> ", line):
            if tested is not None:
                found["end -> next trial"].append(t - tested)
            start, end, tested = t, None, None
        elif start is not None and re.match(r"epoch 1/\d+ step \d+: ", line):
            found["start -> first step"].append(t - start)
            start = None
        elif re.match(r"epoch \d+/\d+: train loss", line):
            end = t
        elif line.startswith("test accuracy ") and end is not None:
            found["test split"].append(t - end)
            tested = t
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--trials", type=int, default=4)
    args, train_args = parser.parse_known_args()
    train_args = train_args or ["--arch", "resnet18", "--limit-batches", "10"]
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache(args.dataset, tmp)
        lines = timed_lines([sys.executable, "-m", "train.sweep", str(grid_file(tmp, args.trials)),
                             "--sweep-dir", f"{tmp}/sweep", "--dataset", args.dataset, "--epochs", "1",
                             "--log-every", "1", "--no-wandb", *train_args])
    print(f"{args.trials} trials ({' '.join(train_args)}), seconds, median (each):")
    for phase, seconds in phases(lines).items():
        print(f"  {phase:22} {statistics.median(seconds):6.2f}  ({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
