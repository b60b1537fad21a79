"""Side-by-side speed measurements of the project's data path, loop and service.

    python bench/bench.py --dataset ../shared/datasets/cifar10 [--out docs/benchmarks.md]
    python bench/bench.py --synthetic 20000                      # generated data, no dataset needed

Every figure is the median of --repeats runs, and the two sides of each comparison alternate
within one run, so a busy machine slows both alike. Sections:
  1. data path: decode-once + batched augmentation against per-item `with_transform` with
     torchvision transforms, at 32 and 224 px; the one-time decode of the train split; and
     AutoAugment/RandAugment/random erasing batched (train/policies.py) against torchvision per image
  2. loop overhead: the project's Accelerate loop (train/loop.py) against a minimal PyTorch loop
     over the same decoded tensors, same model, batch and precision
  3. service overhead: an epoch through train/main.py against the same minimal loop
  4. GPU only: per model at 32 and 224 px (bf16, batch 256), train/loop.py's train_one_epoch over
     Accelerate-prepared loaders of GPU-resident data against the same model stepping on one synthetic
     tensor; MobileNetV2's ms/step at batch 16/224 px and 128/32 px eager, compiled and with CUDA graphs
     (--compile-mode reduce-overhead), and the seed preset's projected training time
"""

import argparse
import json
import os
import platform
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from train.augment import MEAN, STD, BatchTransform
from train.config import Config
from train.data import Split, encoded_images, find_columns, make_loader
from train.decode import choose_policy, common_size, decode_all
from train.models import build_model

ROOT = Path(__file__).resolve().parent.parent


class Rows(list):
    """The table's rows, each printed as soon as it is measured: a run cut short keeps what it measured."""

    def append(self, row: tuple) -> None:
        print("| " + " | ".join(row) + " |", flush=True)
        super().append(row)


def median_alternating(sides: dict, repeats: int) -> dict:
    """{name: fn() -> images/s}: run each side once per repeat, in turn; return the medians."""
    results = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            results[name].append(fn())
    return {name: statistics.median(values) for name, values in results.items()}


# ---- data -------------------------------------------------------------------------------------

def load_train_split(args):
    import datasets

    if args.synthetic:
        write_parquet_dataset = runpy.run_path(str(ROOT / "tests" / "synthetic.py"))["write_parquet_dataset"]
        folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
        write_parquet_dataset(folder, n_train=args.synthetic, n_test=16)
        args.dataset = str(folder)
    datasets.disable_progress_bars()
    ds = datasets.load_dataset(args.dataset)["train"]
    image_col, label_col, classes = find_columns(ds.features, SimpleNamespace(dataset=args.dataset, image_column="",
                                                                              label_column=""))
    raw = encoded_images(ds, image_col)
    policy = choose_policy([common_size(raw)], 0, 32)
    seconds, decoded = {}, {}
    for workers in (1, 0):  # serial, then one process per CPU (0): the result must be the same
        start = time.perf_counter()
        decoded[workers], _ = decode_all(raw, policy, "train", skip_bad=False, workers=workers)
        seconds[workers] = time.perf_counter() - start
    assert torch.equal(decoded[0], decoded[1]), "parallel decode differs from serial"
    images = decoded[0]
    labels = torch.tensor(ds[label_col], dtype=torch.long)
    return ds, image_col, label_col, Split(images, labels), seconds


def project_pipeline(split: Split, size: int, images: int, device):
    loader = make_loader(split, 128, shuffle_seed=0)
    transform = BatchTransform(size, train=True)

    def run():
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            x = transform(x.to(device, non_blocking=True))
            seen += len(y)
            if seen >= images:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)
    return run


def per_item_pipeline(ds, image_col, label_col, size: int, images: int):
    from torchvision import transforms as T

    steps = ([T.Resize(size)] if size != 32 else []) + [
        T.RandomCrop(size, padding=4 * size // 32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    tf = T.Compose(steps)

    def apply(batch):
        return {"x": [tf(img.convert("RGB")) for img in batch[image_col]], "y": batch[label_col]}

    loader = torch.utils.data.DataLoader(ds.with_transform(apply), batch_size=128, shuffle=True)

    def run():
        seen, start = 0, time.perf_counter()
        for batch in loader:
            seen += len(batch["y"])
            if seen >= images:
                break
        return seen / (time.perf_counter() - start)
    return run


# ---- augmentation policies ---------------------------------------------------------------------

def images_per_second(transform, batch: torch.Tensor, calls: int = 3):
    """A side for median_alternating: `calls` calls of transform(batch), in images/s."""
    def run():
        start = time.perf_counter()
        for _ in range(calls):
            transform(batch)
        if batch.is_cuda:
            torch.cuda.synchronize()
        return calls * len(batch) / (time.perf_counter() - start)
    return run


def augmentation_policies(rows: Rows, device, repeats: int) -> None:
    """train/policies.py (drawn per image, applied to the batch) against torchvision's transform called per
    image (the path it replaced), batch 256 at 32 px: AutoAugment (CIFAR-10), RandAugment, random erasing."""
    from torchvision.transforms import v2

    from train.policies import AutoAugment, RandAugment, RandomErasing

    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device)
    cases = (("AutoAugment (CIFAR-10)", AutoAugment(), v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), images),
             ("RandAugment (2 ops, magnitude 9)", RandAugment(), v2.RandAugment(), images),
             ("random erasing (p 0.5)", RandomErasing(0.5), v2.RandomErasing(0.5), images.float()))
    for name, batched, torchvision, batch in cases:
        def per_image(batch, torchvision=torchvision):
            return torch.stack([torchvision(image) for image in batch])

        sides = {"batched": images_per_second(batched, batch), "per image": images_per_second(per_image, batch)}
        for run in sides.values():
            run()  # tables, kernels and allocator warm-up
        got = median_alternating(sides, repeats)
        rows.append((f"{name}, batch 256 at 32 px: batched vs per image",
                     f"{got['batched']:,.0f} vs {got['per image']:,.0f} img/s", "",
                     f"{got['batched'] / got['per image']:.1f}×"))


# ---- loops ------------------------------------------------------------------------------------

def plain_loop(split: Split, arch: str, steps: int, device, precision: str):
    """The minimal PyTorch loop: random batches of the decoded tensor, same augmentation, SGD."""
    model = build_model(arch, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    transform = BatchTransform(32, train=True)
    images = split.images.to(device)
    labels = split.labels.to(device)

    def run():
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(labels), (128,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(transform(images[idx])), labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * 128 / (time.perf_counter() - start)
    return run


def loop_sides(accelerator, split: Split, arch: str, size: int, batch: int, steps: int, compile_mode: str = ""):
    """(real, synthetic): functions returning images/s over `steps` batches of `batch`.
    real: train/loop.py's train_one_epoch, as train/main.py drives it, over an Accelerator-prepared loader of
    `split` (GPU-resident when `split` is on the GPU); synthetic: the same prepared model and optimizer stepping
    on one random tensor — the speed of the model alone."""
    from train.loop import Hooks, LoopConfig, Parts, TrainState, train_one_epoch
    from train.optim import build_optimizer, build_scheduler

    device = accelerator.device
    cfg = Config(arch=arch, lr=0.01, weight_decay=0.0, scheduler="none")  # the optimizer's settings
    model = build_model(arch, 10).to(device, memory_format=torch.channels_last if device.type == "cuda" else None)
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    loader = accelerator.prepare(make_loader(split.subset(range(steps * batch)), batch, shuffle_seed=0))
    optimizer = build_optimizer(cfg, model, accelerator.mixed_precision)
    scheduler = build_scheduler(cfg, optimizer, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    parts = Parts(accelerator, model, optimizer, scheduler, loader, None, BatchTransform(size, train=True),
                  BatchTransform(size), [str(i) for i in range(10)])
    state = TrainState()
    x = torch.randn(batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
    y = torch.randint(0, 10, (batch,), device=device)

    def timed(fn):
        def run():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return steps * batch / (time.perf_counter() - start)
        return run

    def real():
        train_one_epoch(parts, LoopConfig(epochs=10**6), state, Hooks())
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def synthetic():
        model.train()
        for _ in range(steps):
            accelerator.backward(F.cross_entropy(model(x), y))  # the prepared model autocasts as in the loop
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return timed(real), timed(synthetic)


def service_epoch(args, arch: str, steps: int, precision: str):
    """A one-epoch run of train/main.py on `steps` batches: its own train-phase images/s and epoch time."""
    def run():
        with tempfile.TemporaryDirectory() as out:
            # Same threads as this process: without the flag `accelerate launch` sets OMP_NUM_THREADS=1.
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
                   "--num_cpu_threads_per_process", str(torch.get_num_threads()),
                   "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", precision,
                   str(ROOT / "train" / "main.py"), "--dataset", args.dataset, "--arch", arch, "--epochs", "1",
                   "--batch-size", "128", "--limit-batches", str(steps), "--output-dir", f"{out}/run",
                   "--no-wandb", "--log-every", "10"]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            record = json.loads((Path(out) / "run" / "metrics.jsonl").read_text().splitlines()[0])
        service.append(record)
        return record["images_per_second"]
    service = []
    return run, service


# ---- the report -------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--synthetic", type=int, default=0, help="generate this many training images instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", default="resnet18", help="model of the loop comparisons")
    parser.add_argument("--steps", type=int, default=40, help="batches of 128 per loop and service measurement")
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "no"
    torch.backends.cudnn.benchmark = True
    rows = Rows()
    ds, image_col, label_col, split, decode_s = load_train_split(args)
    threads = len(os.sched_getaffinity(0))
    rows.append((f"decode the train split once: 1 process vs {threads}",
                 f"{len(split):,} images in {decode_s[1]:.1f} s vs {decode_s[0]:.1f} s "
                 f"({len(split) / decode_s[0]:,.0f} img/s)", "≤ 10 s", f"{decode_s[1] / decode_s[0]:.1f}×"))

    for size, images in ((32, 4096), (224, 1024)):
        got = median_alternating({"ours": project_pipeline(split, size, images * 4, device),
                                  "per-item": per_item_pipeline(ds, image_col, label_col, size, images)},
                                 args.repeats)
        rows.append((f"data path {size} px: ours vs per-item with_transform",
                     f"{got['ours']:,.0f} vs {got['per-item']:,.0f} img/s",
                     "≥ 10×" if size == 32 else "", f"{got['ours'] / got['per-item']:.1f}×"))

    augmentation_policies(rows, device, args.repeats)

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False)
    real, _ = loop_sides(accelerator, split, args.arch, 32, 128, args.steps)
    got = median_alternating({"accelerate": real, "plain": plain_loop(split, args.arch, args.steps, device, precision)},
                             args.repeats)
    rows.append((f"loop: Accelerate loop vs plain PyTorch ({args.arch}, 32 px, batch 128, {precision})",
                 f"{got['accelerate']:,.0f} vs {got['plain']:,.0f} img/s", "≥ 0.97×",
                 f"{got['accelerate'] / got['plain']:.2f}×"))

    service_run, records = service_epoch(args, args.arch, args.steps, precision)
    plain = plain_loop(split, args.arch, args.steps, device, precision)
    got = median_alternating({"service": service_run, "plain": plain}, args.repeats)
    epoch_s = statistics.median(r["epoch_seconds"] for r in records)
    rows.append((f"service: train/main.py epoch ({args.steps} batches) vs plain loop",
                 f"{got['service']:,.0f} vs {got['plain']:,.0f} img/s (epoch with validation: {epoch_s:.1f} s)",
                 "≥ 0.90×", f"{got['service'] / got['plain']:.2f}×"))

    if device.type == "cuda":
        gpu_models(rows, accelerator, split, args.repeats)
    else:
        rows.append(("per-model GPU throughput, pipeline vs synthetic", "needs a GPU", "≥ 0.9×", "not run"))

    table = ["| measurement | result | target | ratio |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    header = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}; torch {torch.__version__}; "
              f"dataset {args.dataset if not args.synthetic else f'{args.synthetic} generated images'}; "
              f"median of {args.repeats}.", "",
              f"Command: `python bench/bench.py {' '.join(sys.argv[1:])}`", ""]
    text = "\n".join(header + table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def gpu_models(rows: Rows, accelerator, split: Split, repeats: int) -> None:
    """The real loop over GPU-resident data against the model alone, per model and input size (bf16, batch 256);
    then ms/step of small-batch steps eager, compiled and with CUDA graphs, and the seed preset's projection."""
    resident = split.to(accelerator.device)
    for arch in ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "resnet18"):
        for size in (32, 224):
            real, synthetic = loop_sides(accelerator, resident, arch, size, 256, 20)
            real(), synthetic()  # cuDNN autotuning and allocator warm-up
            got = median_alternating({"real": real, "synthetic": synthetic}, repeats)
            rows.append((f"GPU {arch} {size} px, {accelerator.mixed_precision}, batch 256: "
                         "train_one_epoch vs model alone",
                         f"{got['real']:,.0f} vs {got['synthetic']:,.0f} img/s "
                         f"({256e3 / got['real']:.1f} vs {256e3 / got['synthetic']:.1f} ms/step)", "≥ 0.9×",
                         f"{got['real'] / got['synthetic']:.2f}×"))
    for batch, size, steps in ((16, 224, 100), (128, 32, 100)):
        ms = {}
        for mode in ("", "default", "reduce-overhead"):
            real, _ = loop_sides(accelerator, resident, "mobilenet_v2", size, batch, steps, compile_mode=mode)
            real()  # compilation, graph capture
            ms[mode or "eager"] = batch * 1e3 / statistics.median(real() for _ in range(repeats))
        best = min(ms, key=ms.get)
        rows.append((f"GPU mobilenet_v2 batch {batch}, {size} px: ms/step eager / compiled / CUDA graphs",
                     " / ".join(f"{v:.2f}" for v in ms.values()), "< 8 ms" if batch == 16 else "",
                     f"best: {best}"))
        if batch == 16:  # configs/seed-mobilenet_v2.yaml: 30 epochs of 2,500 steps
            rows.append(("seed preset (mobilenet_v2, batch 16, 224 px, 75,000 training steps), projected",
                         f"{75_000 * ms[best] / 60e3:.1f} min with {best}", "< 10 min", ""))


if __name__ == "__main__":
    main()
