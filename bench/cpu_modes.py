"""Training speed of the cpu-smoke preset on this CPU: eager or torch.compile, fp32 or bf16 autocast.

    python bench/cpu_modes.py --dataset ../shared/datasets/cifar10 [--steps 30] [--repeats 3]

The real loop (train/loop.py's train_one_epoch over Accelerate-prepared loaders, as bench.py's loop row)
with configs/cpu-smoke.yaml's model and batch. Each variant runs in its own process, since Accelerate's
mixed precision is set once per process; compilation happens in an untimed first epoch.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = [("no", ""), ("bf16", ""), ("no", "default"), ("bf16", "default")]


def measure(args) -> dict:
    import torch
    from accelerate import Accelerator
    from bench import loop_sides  # bench/ is this script's folder

    from train.config import Config
    from train.data import load_image_data

    data = load_image_data(Config(dataset=args.dataset))  # decoded once, then from the decode cache
    accelerator = Accelerator(mixed_precision=args.precision, step_scheduler_with_optimizer=False)
    real, _ = loop_sides(accelerator, data.train, "resnet18", 32, 128, args.steps, compile_mode=args.compile_mode)
    real()  # compilation, first-touch allocations
    return {"img_s": statistics.median(real() for _ in range(args.repeats)), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="", help=argparse.SUPPRESS)  # set for one variant's process
    parser.add_argument("--compile-mode", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision:
        print(json.dumps(measure(args)))
        return
    rows = ["| precision | torch.compile | img/s | ms/step (batch 128) | vs eager fp32 |", "|---|---|---|---|---|"]
    base = None
    for precision, mode in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--dataset", args.dataset, "--steps", str(args.steps),
                              "--repeats", str(args.repeats), "--precision", precision, "--compile-mode", mode],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        got = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or got["img_s"]
        rows.append(f"| {precision} | {mode or 'off'} | {got['img_s']:,.0f} | {128e3 / got['img_s']:.0f} | "
                    f"{got['img_s'] / base:.2f}× |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
