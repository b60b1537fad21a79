"""Checkpoints, exact resume and preemption, with real SIGKILLs and signals on real runs."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import (FAST, LAUNCH, MAIN, ROOT, assert_resumed, assert_same_run, check, child_env, main_in_process,
                      read_summary, run_main)
from conftest import resume_args as args
from train import run_dir
from train.checkpoint import Checkpointer
from train.models import ModelSpec
from synthetic import CLASS_NAMES

pytestmark = pytest.mark.slow

def checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture
def reference(resume_reference):
    return resume_reference


STEPS = 24  # 8 an epoch, 3 epochs (RESUME_ARGS); under 2-process DDP 4 an epoch
DDP_STEPS = 12


def verifies(run, folder) -> bool:
    """A checkpoint's manifest and identity check out (what --resume trusts)."""
    spec = ModelSpec("resnet18", tuple(CLASS_NAMES), decode_size=32)  # what the runs below record
    return Checkpointer(None, run, 2, spec).verify(run / "checkpoints" / folder)["step"] >= 0


@pytest.mark.parametrize("failpoint, newest", [
    ("kill_after_step:13", "e0001-b000004-step00000012"),  # mid-epoch, one step after a checkpoint
    ("kill_after_step:16", "e0001-b000007-step00000015"),  # last step of epoch 2, before its validation
    ("kill_during_save:3", "e0000-b000006-step00000006"),  # writing epoch 1's end checkpoint (best model written)
])
def test_killed_run_resumes_to_the_same_result(dataset_dir, reference, tmp_path, failpoint, newest):
    out = tmp_path / "run"
    killed = run_main(args(dataset_dir, out), env={"CIFAR_ACCELERATE_FAILPOINT": failpoint})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert checkpoints(out)[-1] == newest and verifies(out, newest)
    if failpoint.startswith("kill_during_save"):  # the half-written one never got its final name
        assert [p.name for p in (out / "checkpoints").glob(".tmp-*")] == [".tmp-e0001-b000000-step00000008"]
    resumed = check(main_in_process(args(dataset_dir, out)))  # the resume is the subject here, not its process
    assert assert_resumed(resumed, STEPS)[0] == newest
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_run(out, reference)


def test_rotation_keeps_the_newest_k_and_the_best_model(reference):
    names = checkpoints(reference)
    assert names == ["e0002-b000008-step00000024", "e0003-b000000-step00000024"]  # the step-24 one, then epoch end
    assert (reference / "model.safetensors").is_file()
    assert not list((reference / "checkpoints").glob(".tmp-*"))
    state = json.loads((reference / "checkpoints" / names[-1] / "trainer_state.json").read_text())
    assert state["step"] == 24 and len(state["history"]) == 3


def test_finished_run_resumed_again_changes_nothing(dataset_dir, reference, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    again = check(main_in_process(args(dataset_dir, out)))
    assert "resuming from" in again.stdout and f"0 optimizer steps in this attempt (from step {STEPS} to {STEPS})" \
        in again.stdout
    assert_same_run(out, reference)


def test_truncated_checkpoint_is_an_error_or_skipped_by_auto(dataset_dir, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    explicit = main_in_process([*args(dataset_dir, tmp_path / "other"), "--resume", str(newest)])
    assert explicit.returncode == 2
    lines = [line for line in explicit.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(weights) in lines[0] and "truncated or corrupt" in lines[0]

    auto = check(main_in_process(args(dataset_dir, out)))
    assert "warning:" in auto.stderr and "trying an older checkpoint" in auto.stderr
    assert "resuming from" in auto.stdout and "e0002-b000008" in auto.stdout
    assert "0 optimizer steps in this attempt (from step 24 to 24)" in auto.stdout
    assert_same_run(out, reference)


def test_auto_never_starts_over_when_no_checkpoint_loads(dataset_dir, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in checkpoints(out):  # every checkpoint damaged: starting fresh would discard the run
        weights = out / "checkpoints" / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    metrics = (out / "metrics.jsonl").read_text()
    proc = main_in_process(args(dataset_dir, out))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "starting fresh" not in proc.stdout, proc.stderr[-2000:]
    assert "none of the 2 checkpoints" in errors[0] and all(name in errors[0] for name in checkpoints(out))
    assert (out / "metrics.jsonl").read_text() == metrics


def test_checkpoint_without_manifest_is_incomplete(dataset_dir, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / checkpoints(out)[-1]
    (newest / "manifest.json").unlink()  # what a crash between the files and the manifest would leave
    explicit = main_in_process([*args(dataset_dir, tmp_path / "other"), "--resume", str(newest)])
    assert explicit.returncode == 2 and f"checkpoint {newest} is incomplete" in explicit.stderr
    auto = check(main_in_process(args(dataset_dir, out)))  # not even listed as complete: the older one is used
    assert assert_resumed(auto, STEPS)[0] == "e0002-b000008-step00000024"


def test_checkpoint_of_another_model_is_refused(dataset_dir, reference, tmp_path):
    newest = reference / "checkpoints" / checkpoints(reference)[-1]
    proc = main_in_process([*args(dataset_dir, tmp_path / "r34"), "--arch", "resnet34", "--resume", str(newest)])
    assert proc.returncode == 2
    assert "is for arch 'resnet18', this run has 'resnet34'" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_only_on_a_checkpoint_folder(dataset_dir, tmp_path):
    run = tmp_path / "run"  # one epoch: its end-of-epoch checkpoint holds the weights the run tested
    check(main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(run), *FAST, "--epochs", "1",
                           "--limit-batches", "3"]))
    (newest,) = checkpoints(run)
    check(main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint",
                           str(run / "checkpoints" / newest), "--output-dir", str(tmp_path / "eval")]))
    got, want = read_summary(tmp_path / "eval"), read_summary(run)
    assert got["num_test_samples"] == 101 and want["best_epoch"] == 1
    for key in ("test_acc", "confusion_matrix", "test_per_class_accuracy"):
        assert got[key] == want[key], key


def _workers(pid_dir: Path) -> list:
    """The training processes, found as Slurm's scripts find them: each wrote its pid into pid_dir."""
    return [psutil.Process(int(p.name)) for p in pid_dir.iterdir()] if pid_dir.is_dir() else []


def _start(cmd_args, pid_dir: Path, processes=0, entry=(MAIN,)):
    if processes:
        cmd = [*LAUNCH, "--multi_gpu", "--num_processes", str(processes), "--dynamo_backend", "no",
               "--mixed_precision", "no", *entry, *cmd_args]
        env = child_env(ACCELERATE_USE_CPU="true", CIFAR_ACCELERATE_PID_DIR=str(pid_dir))
    else:
        cmd, env = [sys.executable, *entry, *cmd_args], child_env(CIFAR_ACCELERATE_PID_DIR=str(pid_dir))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_when_training(proc, out, pid_dir, sig, rank=0, processes=1):
    """Wait for the first checkpoint (training is under way), then signal one rank's process."""
    deadline = time.time() + 300
    while not (out / "checkpoints").is_dir() or not any(p.name.startswith("e") for p in
                                                         (out / "checkpoints").iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    workers = _workers(pid_dir)
    assert len(workers) == processes
    target = [w for w in workers if w.environ().get("RANK", "0") == str(rank)][0]
    target.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


# SIGUSR1 (Slurm's --signal=B:USR1@N). SIGTERM takes the same handler; a lone process gets it from `accelerate
# launch` on Ctrl-C (test_terminal.py) and from `scontrol requeue` (test_slurm.py), each resumed exactly after.
@pytest.mark.parametrize("sig", [signal.SIGUSR1])
def test_signal_checkpoints_and_exits_for_requeue(dataset_dir, reference, tmp_path, sig):
    out, pids = tmp_path / "run", tmp_path / "pids"
    code, stdout, stderr = _signal_when_training(_start(args(dataset_dir, out), pids), out, pids, sig)
    assert code == 75, stderr[-2000:]
    assert f"received {sig.name}" in stderr and "preempted: checkpoint written" in stdout
    assert (out / "PREEMPTED").is_file() and not (out / "summary.json").exists()
    name = checkpoints(out)[-1]
    newest = json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())
    assert 3 <= newest["step"] < 24  # stopped within a step or so of the signal, long before the end
    assert newest["format_version"] == run_dir.FORMAT_VERSION
    resumed = check(main_in_process(args(dataset_dir, out)))
    assert assert_resumed(resumed, STEPS) == (name, newest["step"])
    assert not (out / "PREEMPTED").exists()
    assert_same_run(out, reference)


@pytest.mark.ddp
# A kill mid-epoch resumes from e0001-b000002-step00000006, as the stall test's second attempt does
# (test_stall.py, which also SIGKILLs one rank mid-epoch); a kill while saving leaves a half-written checkpoint.
@pytest.mark.parametrize("failpoint, newest", [
    ("kill_during_save:3", "e0001-b000000-step00000004"),  # writing the step-6 checkpoint
])
def test_ddp_killed_run_resumes_to_the_same_result(dataset_dir, ddp_resume_reference, tmp_path, failpoint, newest):
    out = tmp_path / "run"
    killed = run_main(args(dataset_dir, out), processes=2, env={"CIFAR_ACCELERATE_FAILPOINT": failpoint})
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    # Killed where intended, not a crash at start (which `accelerate launch` also reports as 1): rank 0
    # died of SIGKILL, with the checkpoints of the steps before it complete.
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: -9", killed.stderr), killed.stderr[-3000:]
    assert checkpoints(out)[-1] == newest and verifies(out, newest)
    resumed = check(run_main(args(dataset_dir, out), processes=2))
    assert assert_resumed(resumed, DDP_STEPS)[0] == newest
    assert_same_run(out, ddp_resume_reference)


@pytest.mark.ddp
# One rank signalled is enough, whichever: the flag is summed over all. `accelerate launch -m train.main` under DDP
# is signalled in test_slurm.py (train.sbatch with ENTRY="-m train.main" on 2 processes).
@pytest.mark.parametrize("sig, rank, entry", [(signal.SIGUSR1, 1, (MAIN,))])
def test_ddp_signal_to_one_rank_stops_all_ranks(dataset_dir, ddp_resume_reference, tmp_path, sig, rank, entry):
    out, pids = tmp_path / "run", tmp_path / "pids"
    code, stdout, stderr = _signal_when_training(_start(args(dataset_dir, out), pids, processes=2, entry=entry), out,
                                                 pids, sig, rank=rank, processes=2)
    assert code != 0 and (out / "PREEMPTED").is_file(), stderr[-3000:]  # accelerate launch reports 1
    assert f"received {sig.name}" in stderr
    newest = json.loads((out / "checkpoints" / checkpoints(out)[-1] / "trainer_state.json").read_text())["step"]
    resumed = check(run_main(args(dataset_dir, out), processes=2))
    assert assert_resumed(resumed, DDP_STEPS)[1] == newest
    assert_same_run(out, ddp_resume_reference)
