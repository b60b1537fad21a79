"""Short real runs on CUDA, each checked through its run folder (marker `gpu`; skipped without a GPU).

`bench/gpu_check.sh` runs these on a GPU machine. Nothing here runs in CI, which has no GPU.
"""

import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState

from conftest import FAST, MAIN, ROOT, assert_resumed, check, child_env, read_metrics, read_summary

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = [*FAST, "--batch-size", "64", "--eval-batch-size", "128"]


def gpu_run(dataset, out, *options, precision="bf16", env=None):
    """`accelerate launch` on one GPU, as users start it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1", "--num_processes", "1",
           "--dynamo_backend", "no", "--mixed_precision", precision, MAIN, "--dataset", str(dataset),
           "--output-dir", str(out), *GPU, *options]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(**(env or {})), capture_output=True, text=True, timeout=900)


def assert_trained(out, precision):
    summary = read_summary(out)
    assert summary["mixed_precision"] == precision and summary["world_size"] == 1
    assert summary["num_test_samples"] == 101 and summary["test_acc"] > 0.5, summary
    assert len(read_metrics(out)) == 3 and (out / "model.safetensors").is_file() and (out / "report.md").is_file()
    return summary


@pytest.mark.parametrize("precision, options", [
    ("bf16", []), ("fp16", []), ("no", []),
    ("bf16", ["--compile"]),
    ("bf16", ["--compile", "--compile-mode", "reduce-overhead", "--grad-accum-steps", "2"]),  # CUDA graphs + BN
    ("bf16", ["--no-gpu-resident"]),  # pinned host batches, copied non_blocking
    ("bf16", ["--ema-decay", "0.9", "--tta", "--sync-bn"]),
    ("fp16", ["--optimizer", "adamw", "--lr", "0.002"]),
])
def test_a_short_run_on_the_gpu(dataset_dir, tmp_path, precision, options):
    out = tmp_path / "run"
    check(gpu_run(dataset_dir, out, *options, precision=precision))
    summary = assert_trained(out, precision)
    if "--tta" in options:
        assert "test_acc_tta" in summary
    evaluated = tmp_path / "eval"  # eval-only of a GPU run reproduces its test metrics
    check(subprocess.run([sys.executable, MAIN, "--dataset", str(dataset_dir), "--eval-only", "--checkpoint", str(out),
                          "--output-dir", str(evaluated), *(["--tta"] if "--tta" in options else [])],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600))
    assert read_summary(evaluated)["num_test_samples"] == 101
    assert abs(read_summary(evaluated)["test_acc"] - summary["test_acc"]) <= 2 / 101  # fp32 vs autocast rounding


def test_a_killed_gpu_run_resumes(dataset_dir, tmp_path):
    out = tmp_path / "run"
    resume = ["--checkpoint-every-steps", "3", "--resume", "auto"]
    killed = gpu_run(dataset_dir, out, *resume, env={"CIFAR_ACCELERATE_FAILPOINT": "kill_after_step:13"})
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    resumed = check(gpu_run(dataset_dir, out, *resume))
    assert assert_resumed(resumed, 24)[0] == "e0001-b000004-step00000012"
    assert_trained(out, "bf16")  # cuDNN is not bitwise deterministic: statistically, not bit for bit, the same


@pytest.fixture
def gpu_parts(dataset_dir, monkeypatch):
    from train.config import Config
    from train.data import load_image_data
    from train.main import make_accelerator
    from train.runner import build_parts

    def build(precision, **options):
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
        cfg = Config(dataset=str(dataset_dir), arch="resnet18", batch_size=32, epochs=1, wandb=False,
                     decode_cache="off", **options)
        accelerator = make_accelerator(cfg, track=False)
        data = load_image_data(cfg)
        data.place(accelerator.device)
        return cfg, build_parts(cfg, accelerator, data)
    yield build
    AcceleratorState._reset_state(reset_partial_state=True)


def test_training_steps_never_wait_for_the_gpu(gpu_parts):
    """Between log steps a step launches work and never reads it back: sync debug mode turns any wait into
    an error. Data loading of each next batch runs inside the checked window too."""
    from train.loop import Hooks, LoopConfig, TrainState, train_one_epoch

    class Checked(Hooks):
        def on_step(self, state):
            if state.step == 2:  # after the first steps (cuDNN autotuning, lazy initialisation)
                torch.cuda.set_sync_debug_mode("error")
            if state.step == 6:
                torch.cuda.set_sync_debug_mode(0)

    cfg, parts = gpu_parts("bf16", max_steps=6, log_every=1000)
    try:
        train_one_epoch(parts, LoopConfig.from_config(cfg), TrainState(), Checked())
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
