"""Real runs and in-process checks on CUDA (marker `gpu`; skipped without a GPU).

`bench/gpu_check.sh` runs these on a GPU machine, in-process checks first (they take seconds), then the
short runs; nothing here runs in CI, which has no GPU. Each short run uses the CPU tests' FAST options
(batch 32, 3 epochs: 24 steps on 230 training images), which learn the generated classes on the CPU
with room to spare, so a threshold that fails means something broke, not bad luck.
"""

import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState

from conftest import FAST, MAIN, ROOT, assert_resumed, check, child_env, read_metrics, read_summary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = [*FAST, "--eval-batch-size", "128"]
LEARNED = 0.6  # test accuracy after 24 steps; the CPU tests' runs of these options pass the same bar


def gpu_run(dataset, out, *options, precision="bf16", env=None):
    """`accelerate launch` on one GPU, as users start it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1", "--num_processes", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, MAIN, "--dataset", str(dataset),
           "--output-dir", str(out), *GPU, *options]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**(env or {})), capture_output=True, text=True, timeout=600)


def assert_trained(out, precision):
    summary = read_summary(out)
    assert summary["mixed_precision"] == precision and summary["world_size"] == 1
    assert summary["num_test_samples"] == 101 and summary["test_acc"] > LEARNED, summary
    assert len(read_metrics(out)) == 3 and (out / "model.safetensors").is_file() and (out / "report.md").is_file()
    return summary


# ---- in-process checks: seconds each ------------------------------------------------------------

@pytest.fixture
def gpu_parts(dataset_dir, monkeypatch):
    from train.config import Config
    from train.data import load_image_data
    from train.process import make_accelerator
    from train.runner import build_parts

    def build(precision, **options):
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
        cfg = Config(dataset=str(dataset_dir), arch="resnet18", batch_size=32, epochs=1, wandb=False,
                     decode_cache="off", **options)
        accelerator = make_accelerator(cfg, track=False)
        data = load_image_data(cfg)
        assert data.place(accelerator.device)
        return cfg, build_parts(cfg, accelerator, data)
    yield build
    AcceleratorState._reset_state(reset_partial_state=True)


def sync_debug_between(first: int, last: int, mode: str):
    """Hooks that put CUDA's sync debug mode to `mode` ("warn" or "error") from step `first` to step `last`:
    any host wait in between is then a warning or an error. Earlier steps autotune cuDNN and initialise."""
    from train.loop import Hooks

    class Checked(Hooks):
        def on_step(self, state):
            if state.step in (first, last):
                torch.cuda.set_sync_debug_mode(mode if state.step == first else 0)
    return Checked()


def train_steps(gpu_parts, precision, hooks, steps=6):
    from train.loop import LoopConfig, TrainState, train_one_epoch

    cfg, parts = gpu_parts(precision, max_steps=steps, log_every=1000)
    try:
        train_one_epoch(parts, LoopConfig.from_config(cfg), TrainState(), hooks)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_training_steps_never_wait_for_the_gpu(gpu_parts):
    """Between log steps a bf16 step launches work and never reads it back; loading each next batch runs
    inside the checked window too."""
    train_steps(gpu_parts, "bf16", sync_debug_between(2, 6, "error"))


def test_fp16_steps_wait_for_the_overflow_check(gpu_parts, recwarn):
    """The README admits host waits in fp16 steps (GradScaler reads found_inf with the non-fused optimizers);
    measured here: how many 4 steps take (printed for docs/benchmarks.md)."""
    train_steps(gpu_parts, "fp16", sync_debug_between(2, 6, "warn"))
    waits = [w for w in recwarn.list if "synchroniz" in str(w.message).lower()]
    print(f"MEASURED fp16 host waits per step (SGD, not fused): {len(waits) / 4:.2f}")
    assert waits, "fp16 steps were expected to read found_inf on the host"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_fp16_overflow_step_is_skipped_and_seen(gpu_parts, optimizer):
    """GradScaler skips a step whose gradients overflow; Accelerate must see it (not hidden inside a fused
    kernel), so the schedule does not advance, and the next good step works from clean optimizer state."""
    cfg, parts = gpu_parts("fp16", optimizer=optimizer)
    accelerator, model, opt = parts.accelerator, parts.model, parts.optimizer
    assert not opt.optimizer.defaults.get("fused")
    images, labels = next(iter(parts.train_loader))
    from train.augment import BatchTransform

    x = BatchTransform(32)(images)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    accelerator.backward(loss * float("inf"))  # every gradient overflows
    opt.step()
    opt.zero_grad()
    assert accelerator.optimizer_step_was_skipped
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    accelerator.backward(torch.nn.functional.cross_entropy(model(x), labels))
    opt.step()
    assert not accelerator.optimizer_step_was_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_data_that_does_not_fit_stays_on_the_host_and_says_so(dataset_dir, monkeypatch, capsys):
    from accelerate import Accelerator

    from train.config import Config
    from train.runner import prepare_data

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))  # 1 KB free
    data = prepare_data(Config(dataset=str(dataset_dir), decode_cache="off", wandb=False), Accelerator())
    assert not data.train.images.is_cuda
    assert capsys.readouterr().err.count("stay in pinned host memory") == 1
    AcceleratorState._reset_state(reset_partial_state=True)


# ---- short real runs: a fresh `accelerate launch` each --------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision, options", [
    ("bf16", []), ("fp16", []), ("no", []),
    ("bf16", ["--compile"]),
    ("bf16", ["--compile", "--compile-mode", "reduce-overhead"]),  # CUDA graphs with BatchNorm
    ("bf16", ["--no-gpu-resident"]),  # pinned host batches, copied non_blocking
    ("bf16", ["--ema-decay", "0.9", "--tta", "--sync-bn"]),
    ("fp16", ["--optimizer", "adamw", "--lr", "0.002"]),
], ids=["bf16", "fp16", "fp32", "compile", "cuda-graphs", "host-resident", "ema-tta-syncbn", "fp16-adamw"])
def test_a_short_run_on_the_gpu(dataset_dir, tmp_path, precision, options):
    out = tmp_path / "run"
    check(gpu_run(dataset_dir, out, *options, precision=precision))
    summary = assert_trained(out, precision)
    if "--tta" in options:
        assert "test_acc_tta" in summary
    # Eval-only of a GPU run reproduces its test metrics: same precision (autocast rounds as in the run),
    # eager kernels; a prediction may flip only at a near-tie.
    evaluated = tmp_path / "eval"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1", "--num_processes", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, MAIN, "--dataset", str(dataset_dir),
           "--eval-only", "--checkpoint", str(out), "--output-dir", str(evaluated),
           *(["--tta"] if "--tta" in options else [])]
    check(subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300))
    again = read_summary(evaluated)
    assert again["num_test_samples"] == 101
    assert abs(again["test_acc"] - summary["test_acc"]) <= 1 / 101, (again["test_acc"], summary["test_acc"])


@pytest.mark.slow
def test_a_killed_gpu_run_resumes(dataset_dir, tmp_path):
    """8 steps an epoch (230 images, batch 32), 24 in all; checkpoints every 3 steps and at epoch ends, so a
    kill after step 13 leaves step 12's (epoch 2, batch 4) as the newest."""
    out = tmp_path / "run"
    resume = ["--checkpoint-every-steps", "3", "--resume", "auto"]
    killed = gpu_run(dataset_dir, out, *resume, env={"CIFAR_ACCELERATE_FAILPOINT": "kill_after_step:13"})
    assert killed.returncode != 0 and not (out / "summary.json").exists(), killed.stdout[-2000:]
    resumed = check(gpu_run(dataset_dir, out, *resume))
    assert assert_resumed(resumed, 24)[0] == "e0001-b000004-step00000012"
    assert_trained(out, "bf16")  # cuDNN is not bitwise deterministic: statistically, not bit for bit, the same
