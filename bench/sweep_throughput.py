"""Sweep throughput on one GPU with 1, 2 and 4 workers sharing it (`python -m train.sweep --workers-per-gpu K`).

    python bench/sweep_throughput.py --dataset DIR [--per-gpu 1,2,4] [--trials 4] [--out FILE] [train options]

A CIFAR model rarely fills a large GPU by itself; several workers on one GPU overlap one trial's fixed costs
(process start, data, test split) and small kernels with another's. For each K, the same grid of --trials
trials (lr values) runs with K workers on the first visible GPU, the decode cache warm; a row gives the wall
time from the sweep's start to its end, the trials finished per minute, the training images per second of
all trials together over that time (each trial's epochs, from its metrics.jsonl), the median epoch's own
img/s (how much trials sharing the GPU slow each other down) and the all-trials figure against the first
row. The default trial is the seed recipe's model, MobileNetV2 with the CIFAR stem at 32 px, batch 128,
2 epochs. Rows are printed, and --out rewritten, as each K finishes. Without a GPU, K workers share the
CPU (a rehearsal: that it runs).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep_cost import ROOT, grid_file, warm_cache  # bench/ is this script's folder

from train import run_dir
from train.supervise import _gpus

HEADER = ["| workers per GPU | trials | wall s | trials / min | img/s, all trials | one trial's epoch img/s (median) "
          "| vs the first row |", "|---|---|---|---|---|---|---|"]
TRIAL = ["--arch", "mobilenet_v2", "--cifar-stem", "--batch-size", "128", "--epochs", "2"]


def one_sweep(args, train_args: list, per_gpu: int, tmp: str, gpu: str) -> tuple:
    """(wall seconds, training images of all trials, each epoch's img/s) of the grid run by per_gpu workers on
    GPU `gpu` ("": none, the CPU)."""
    folder = Path(tmp) / f"sweep-{per_gpu}"
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
    command = [sys.executable, "-m", "train.sweep", str(grid_file(tmp, args.trials)), "--sweep-dir", str(folder),
               "--workers-per-gpu", str(per_gpu), "--dataset", args.dataset, "--no-wandb", "--log-every", "50",
               *train_args]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                                                stderr=err) as proc:
        try:
            proc.wait()
        except KeyboardInterrupt:  # the sweep got the same SIGINT: its trials stop at a checkpoint; let them
            try:
                proc.wait(timeout=12)
            except subprocess.TimeoutExpired:
                proc.kill()  # its workers, which watch it, stop their trials at a checkpoint
            raise
        wall = time.monotonic() - start
        if proc.returncode:
            err.seek(0)
            sys.exit(f"the sweep with {per_gpu} workers failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
    epochs = [r for trial in sorted(folder.glob("trial-*")) for r in run_dir.read_metrics(trial)]
    return wall, sum(r["images_per_second"] * r["epoch_seconds"] for r in epochs), [r["images_per_second"]
                                                                                     for r in epochs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--per-gpu", default="1,2,4", help="workers per GPU to compare, comma-separated")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--out", default="", help="a markdown file rewritten with the table as each row is measured")
    args, train_args = parser.parse_known_args()
    train_args = train_args or TRIAL
    rows, base, gpu = [], None, next(iter(_gpus()), "")  # the first visible GPU, as train.sweep sees them
    print(f"{args.trials} trials of {' '.join(train_args)} on {f'GPU {gpu}' if gpu else 'the CPU'}")
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache(args.dataset, tmp)
        for k in (int(k) for k in args.per_gpu.split(",")):
            try:
                wall, images, epoch_rates = one_sweep(args, train_args, k, tmp, gpu)
            except KeyboardInterrupt:  # gpu_check.sh's budget: what was measured is printed and in --out
                sys.exit(f"cut while {k} workers per GPU ran; {len(rows)} rows measured")
            rate = images / wall
            base = base or rate
            rows.append(f"| {k} | {args.trials} | {wall:.1f} | {60 * args.trials / wall:.1f} | {rate:.0f} | "
                        f"{statistics.median(epoch_rates):.0f} | {rate / base:.2f}x |")
            print(rows[-1], flush=True)
            if args.out:
                Path(args.out).write_text("\n".join([*HEADER, *rows]) + "\n")


if __name__ == "__main__":
    main()
