"""Side-by-side speed measurements of the project's data path, loop and service.

    python bench/bench.py --dataset ../shared/datasets/cifar10 [--out docs/benchmarks.md]
    python bench/bench.py --synthetic 20000                      # generated data, no dataset needed
    python bench/bench.py --synthetic 20000 --sections gpu-models,small-batch   # some sections, in this order

Every figure is the median of --repeats runs, and the two sides of each comparison alternate
within one run, so a busy machine slows both alike. Each row is printed, and --out rewritten, as soon
as it is measured: a run cut short keeps what it measured. Sections (--sections, default all):
  decode       the one-time decode of the train split, one process against one per CPU
  data         decode-once + batched augmentation against per-item `with_transform` with torchvision
               transforms, at 32 and 224 px
  policies     AutoAugment/RandAugment/random erasing batched (train/policies.py) against torchvision per image
  loop         the project's Accelerate loop (train/loop.py) against a minimal PyTorch loop; both sides
               have the same model, optimizer, memory format, precision and data placement
  service      a marginal epoch of train/main.py (a 3-epoch run minus a 1-epoch run: no start-up, no
               autotuning) against the same minimal loop
  gpu-models   GPU only: per model at 32 and 224 px (bf16, batch 256), train_one_epoch over
               Accelerate-prepared loaders of GPU-resident data against the same model stepping on one tensor
  small-batch  GPU only: MobileNetV2's ms/step at batch 16/224 px (the seed recipe, with its projected
               training time) and 128/32 px, eager, compiled and with CUDA graphs (--compile-mode
               reduce-overhead), dynamo reset between configurations
"""

import argparse
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
    """The table's rows, each printed, and written to `out` with its header, as soon as it is measured:
    a run cut short keeps what it measured."""

    def __init__(self, out: str = "", header: tuple = ()):
        super().__init__()
        self.out, self.header = out, list(header)

    def append(self, row: tuple) -> None:
        print("| " + " | ".join(row) + " |", flush=True)
        super().append(row)
        self.write()

    def write(self) -> None:
        if self.out:
            table = ["| measurement | result | target | ratio |", "|---|---|---|---|"]
            Path(self.out).write_text("\n".join(self.header + table + [f"| {' | '.join(r)} |" for r in self]) + "\n")


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
    for workers in (1, 0) if args.time_decode else (0,):  # serial, then one process per CPU: the same result
        start = time.perf_counter()
        decoded[workers], _ = decode_all(raw, policy, "train", skip_bad=False, workers=workers)
        seconds[workers] = time.perf_counter() - start
    if args.time_decode:
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

def model_and_optimizer(arch: str, device, mixed_precision: str):
    """The model and optimizer as train/main.py builds them on `device`: channels_last and fused SGD on CUDA."""
    from train.optim import build_optimizer

    cfg = Config(arch=arch, lr=0.01, weight_decay=0.0, scheduler="none")  # the optimizer's settings
    model = build_model(arch, 10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, build_optimizer(cfg, model, mixed_precision), cfg


def plain_loop(split: Split, arch: str, steps: int, device, precision: str):
    """The minimal PyTorch loop: random batches of the decoded tensor (wherever `split` lives), the same
    augmentation, model, optimizer and autocast as the loop it is compared with."""
    model, opt, _ = model_and_optimizer(arch, device, precision)
    transform = BatchTransform(32, train=True)
    images, labels = split.images, split.labels

    def run():
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(labels), (128,), device=labels.device)
            x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(transform(x)), y)
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
    on one random tensor — the speed of the model alone. A compile mode compiles as train/main.py does."""
    from train.loop import Hooks, LoopConfig, Parts, TrainState, train_one_epoch
    from train.optim import build_scheduler
    from train.runner import compile_model

    device = accelerator.device
    model, optimizer, cfg = model_and_optimizer(arch, device, accelerator.mixed_precision)
    loader = accelerator.prepare(make_loader(split.subset(range(steps * batch)), batch, shuffle_seed=0))
    scheduler = build_scheduler(cfg, optimizer, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if compile_mode:
        model = compile_model(model, compile_mode)
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


def fresh(accelerator) -> None:
    """Between configurations: drop the Accelerator's references to earlier models and dynamo's shape history
    (which would make the next configuration compile dynamic-shape graphs)."""
    accelerator.free_memory()
    torch._dynamo.reset()


def service_epoch(args, arch: str, steps: int, precision: str):
    """A marginal epoch of train/main.py: a 3-epoch run minus a 1-epoch run, both of `steps` batches of 128 an
    epoch, divided by 2. Start-up, CUDA initialisation and cuDNN autotuning fall in both and cancel; what is left
    is an epoch as the service runs it: training, validation (a ninth of the training images, as CIFAR-10's
    45,000/5,000), metrics, checkpoint. Returns images/s of training per marginal epoch."""
    def seconds(epochs: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            # Same threads as this process: without the flag `accelerate launch` sets OMP_NUM_THREADS=1.
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
                   "--num_cpu_threads_per_process", str(torch.get_num_threads()),
                   "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", precision,
                   str(ROOT / "train" / "main.py"), "--dataset", args.dataset, "--arch", arch, "--epochs", str(epochs),
                   "--batch-size", "128", "--limit-batches", str(steps), "--val-images", str(max(64, steps * 128 // 9)),
                   "--output-dir", f"{out}/run", "--no-wandb", "--log-every", "10"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            return time.perf_counter() - start

    def run():
        marginal = (seconds(3) - seconds(1)) / 2
        epochs.append(marginal)
        return steps * 128 / marginal
    epochs = []
    return run, epochs


# ---- sections ----------------------------------------------------------------------------------

SECTIONS = ("decode", "data", "policies", "loop", "service", "gpu-models", "small-batch")


def section_decode(ctx) -> None:
    seconds = ctx.decode_seconds
    ctx.rows.append((f"decode the train split once: 1 process vs {len(os.sched_getaffinity(0))}",
                     f"{len(ctx.split):,} images in {seconds[1]:.1f} s vs {seconds[0]:.1f} s "
                     f"({len(ctx.split) / seconds[0]:,.0f} img/s)", "≤ 10 s", f"{seconds[1] / seconds[0]:.1f}×"))


def section_data(ctx) -> None:
    for size, images in ((32, 4096), (224, 1024)):
        got = median_alternating({"ours": project_pipeline(ctx.split, size, images * 4, ctx.device),
                                  "per-item": per_item_pipeline(ctx.ds, ctx.image_col, ctx.label_col, size, images)},
                                 ctx.args.repeats)
        ctx.rows.append((f"data path {size} px: ours vs per-item with_transform",
                         f"{got['ours']:,.0f} vs {got['per-item']:,.0f} img/s",
                         "≥ 10×" if size == 32 else "", f"{got['ours'] / got['per-item']:.1f}×"))


def section_policies(ctx) -> None:
    augmentation_policies(ctx.rows, ctx.device, ctx.args.repeats)


def section_loop(ctx) -> None:
    args, accelerator = ctx.args, ctx.accelerator()
    real, _ = loop_sides(accelerator, ctx.placed(), args.arch, 32, 128, args.steps)
    plain = plain_loop(ctx.placed(), args.arch, args.steps, ctx.device, ctx.precision)
    real(), plain()  # cuDNN autotuning and allocator warm-up, for both
    got = median_alternating({"accelerate": real, "plain": plain}, args.repeats)
    ctx.rows.append((f"loop: Accelerate loop vs plain PyTorch ({args.arch}, 32 px, batch 128, {ctx.precision})",
                     f"{got['accelerate']:,.0f} vs {got['plain']:,.0f} img/s", "≥ 0.97×",
                     f"{got['accelerate'] / got['plain']:.2f}×"))
    fresh(accelerator)


def section_service(ctx) -> None:
    args = ctx.args
    service_run, epochs = service_epoch(args, args.arch, args.steps, ctx.precision)
    plain = plain_loop(ctx.placed(), args.arch, args.steps, ctx.device, ctx.precision)
    plain()  # warm-up
    got = median_alternating({"service": service_run, "plain": plain}, args.repeats)
    ctx.rows.append((f"service: a marginal train/main.py epoch ({args.steps} batches + validation) vs plain loop",
                     f"{got['service']:,.0f} vs {got['plain']:,.0f} img/s (marginal epoch: "
                     f"{statistics.median(epochs):.2f} s)", "≥ 0.90×", f"{got['service'] / got['plain']:.2f}×"))


def section_gpu_models(ctx) -> None:
    """The real loop over GPU-resident data against the model alone, per model and input size (bf16, batch 256)."""
    if ctx.device.type != "cuda":
        ctx.rows.append(("per-model GPU throughput, pipeline vs synthetic", "needs a GPU", "≥ 0.9×", "not run"))
        return
    accelerator = ctx.accelerator()
    for arch in ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "resnet18"):
        for size in (32, 224):
            real, synthetic = loop_sides(accelerator, ctx.placed(), arch, size, 256, 20)
            real(), synthetic()  # cuDNN autotuning and allocator warm-up
            got = median_alternating({"real": real, "synthetic": synthetic}, ctx.args.repeats)
            ctx.rows.append((f"GPU {arch} {size} px, {accelerator.mixed_precision}, batch 256: "
                             "train_one_epoch vs model alone",
                             f"{got['real']:,.0f} vs {got['synthetic']:,.0f} img/s "
                             f"({256e3 / got['real']:.1f} vs {256e3 / got['synthetic']:.1f} ms/step)", "≥ 0.9×",
                             f"{got['real'] / got['synthetic']:.2f}×"))
            fresh(accelerator)


def section_small_batch(ctx) -> None:
    """ms/step of small-batch steps eager, compiled and with CUDA graphs; the seed preset's projection first."""
    if ctx.device.type != "cuda":
        ctx.rows.append(("small-batch ms/step: eager / compiled / CUDA graphs", "needs a GPU", "< 8 ms", "not run"))
        return
    accelerator = ctx.accelerator()
    for batch, size, steps in ((16, 224, 100), (128, 32, 100)):
        ms = {}
        for mode in ("", "default", "reduce-overhead"):
            fresh(accelerator)  # each configuration compiles static graphs from scratch
            real, _ = loop_sides(accelerator, ctx.placed(), "mobilenet_v2", size, batch, steps, compile_mode=mode)
            real()  # compilation, graph capture
            ms[mode or "eager"] = batch * 1e3 / statistics.median(real() for _ in range(ctx.args.repeats))
            print(f"  mobilenet_v2 batch {batch}, {size} px, {mode or 'eager'}: {ms[mode or 'eager']:.2f} ms/step",
                  flush=True)
        best = min(ms, key=ms.get)
        ctx.rows.append((f"GPU mobilenet_v2 batch {batch}, {size} px: ms/step eager / compiled / CUDA graphs",
                         " / ".join(f"{v:.2f}" for v in ms.values()), "< 8 ms" if batch == 16 else "",
                         f"best: {best}"))
        if batch == 16:  # configs/seed-mobilenet_v2.yaml: 30 epochs of 2,500 steps
            ctx.rows.append(("seed preset (mobilenet_v2, batch 16, 224 px, 75,000 training steps), projected",
                             f"{75_000 * ms[best] / 60e3:.1f} min with {best}", "< 10 min", ""))
    fresh(accelerator)


class Context:
    """What the sections share: the data (decoded once), the device, one Accelerator, the table."""

    def __init__(self, args, rows: Rows):
        self.args, self.rows = args, rows
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = "bf16" if self.device.type == "cuda" else "no"
        self.ds, self.image_col, self.label_col, self.split, self.decode_seconds = load_train_split(args)
        self._accelerator, self._placed = None, None

    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(mixed_precision=self.precision, step_scheduler_with_optimizer=False)
        return self._accelerator

    def placed(self) -> Split:
        """The decoded split where train/main.py keeps it: on the GPU when there is one."""
        if self._placed is None:
            self._placed = self.split.to(self.device)
        return self._placed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--synthetic", type=int, default=0, help="generate this many training images instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", default="resnet18", help="model of the loop and service comparisons")
    parser.add_argument("--steps", type=int, default=40, help="batches of 128 per loop and service measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, run in the order given: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default="", help="also write the table to this markdown file, row by row")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.time_decode = "decode" in sections

    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    header = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; "
              f"torch {torch.__version__}; dataset "
              f"{args.dataset if not args.synthetic else f'{args.synthetic} generated images'}; "
              f"median of {args.repeats}.", "", f"Command: `python bench/bench.py {' '.join(sys.argv[1:])}`", ""]
    rows = Rows(args.out, header)
    rows.write()
    ctx = Context(args, rows)
    for name in sections:
        globals()[f"section_{name.replace('-', '_')}"](ctx)
    print("\n".join(header))


if __name__ == "__main__":
    main()
