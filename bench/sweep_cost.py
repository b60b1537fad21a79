"""The fixed cost of a sweep trial: what a trial spends outside its epochs, and the worker's gap between trials.

    python bench/sweep_cost.py --dataset ../shared/datasets/cifar10 [--trials 4] [-- train/main.py options]

Runs a grid of --trials one-epoch trials (lr values; the decode cache warmed by a first run) with one worker,
then reads the study and the trials' run folders: per trial, its time from the worker asking for it to
its end minus its epoch (training and validation, from metrics.jsonl) — process start, imports, the data
from the decode cache, the model, the final test, report and tell — and the gap from one trial's end to
the next one's start (the worker's tell and ask).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--trials", type=int, default=4)
    args, train_args = parser.parse_known_args()
    train_args = train_args or ["--arch", "resnet18", "--limit-batches", "20", "--no-wandb"]
    import optuna

    from train.study import STUDY, storage_for

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "cost.yaml"
        sweep.write_text(yaml.safe_dump({"method": "grid", "parameters": {
            "lr": {"values": [0.01 * (i + 1) for i in range(args.trials)]}}}))
        warm = [sys.executable, "-m", "train.main", "--dataset", args.dataset, "--epochs", "1", "--max-steps", "1",
                "--limit-batches", "1", "--no-wandb", "--output-dir", f"{tmp}/warm"]
        subprocess.run(warm, cwd=ROOT, check=True, capture_output=True)  # the decode cache, filled once
        folder = Path(tmp) / "sweep"
        subprocess.run([sys.executable, "-m", "train.sweep", str(sweep), "--sweep-dir", str(folder), "--dataset",
                        args.dataset, "--epochs", "1", *train_args], cwd=ROOT, check=True, capture_output=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trials = optuna.load_study(study_name=STUDY, storage=storage_for(folder)).get_trials()
        outside, gaps = [], []
        for t in trials:
            records = [json.loads(line) for line in
                       (folder / Path(t.user_attrs["run_folder"]).name / "metrics.jsonl").read_text().splitlines()]
            total = (t.datetime_complete - t.datetime_start).total_seconds()
            outside.append(total - sum(r["epoch_seconds"] for r in records))
        for before, after in zip(trials, trials[1:]):
            gaps.append((after.datetime_start - before.datetime_complete).total_seconds())
    print(f"{len(trials)} trials: outside the epoch {statistics.median(outside):.1f} s a trial (median; "
          f"{', '.join(f'{s:.1f}' for s in outside)}); between trials {statistics.median(gaps):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in gaps)})")


if __name__ == "__main__":
    main()
