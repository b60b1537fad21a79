"""Search sweeps: a W&B-format sweep file run by Optuna from a real journal file, trials as real training runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, child_env

pytestmark = pytest.mark.slow
TRIAL = ["--arch", "resnet18", "--eval-batch-size", "64", "--log-every", "2"]  # fixed options of every trial
QUICK = [*TRIAL, "--epochs", "1", "--limit-batches", "2"]  # a trial in a few seconds
LEARNS = [*TRIAL, "--batch-size", "32", "--epochs", "3"]  # resnet18 learns the generated classes in 2-3 epochs


def write_sweep(path, **sweep):
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cmd(file, folder, *options, dataset):
    return [sys.executable, "-m", "train.sweep", str(file), "--sweep-dir", str(folder), "--dataset", str(dataset),
            *options]


def run_sweep(file, folder, *options, dataset, timeout=900, env=None):
    return subprocess.run(sweep_cmd(file, folder, *options, dataset=dataset), cwd=ROOT, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def trials(folder):
    import optuna

    from train.study import STUDY, storage_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=STUDY, storage=storage_for(folder)).get_trials()


def counted(folder):
    return [t for t in trials(folder) if not t.user_attrs.get("not_run")]


def wandb_cli(*args) -> str:
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True, timeout=120).stdout


def wandb_records(run) -> list:
    return [json.loads(line) for line in wandb_cli("leet", "inspect", "--json", str(run)).splitlines() if line.strip()]


def wandb_summary(run) -> dict:
    return json.loads(wandb_cli("leet", "inspect", "--summary", "--json", str(run)))


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ---- bad sweep files: one line, exit 2, before anything trains ----------------------------------

BAD = {
    "unknown option": ({"method": "random", "run_cap": 2, "parameters": {"learning_rate": {"min": 0.1, "max": 1.0}}},
                       "parameter 'learning_rate' is not a train/main.py option"),
    "min above max": ({"method": "random", "run_cap": 2, "parameters": {"lr": {"min": 0.1, "max": 0.01}}},
                      "min must be below max"),
    "log of zero": ({"method": "random", "run_cap": 2,
                     "parameters": {"lr": {"distribution": "log_uniform_values", "min": 0, "max": 0.1}}},
                    "log_uniform_values needs min > 0"),
    "grid of a continuous": ({"method": "grid", "parameters": {"lr": {"min": 0.01, "max": 0.1}}},
                             "a grid needs values, int_uniform or q_uniform"),
    "unknown method": ({"method": "hyperopt", "parameters": {"lr": {"value": 0.1}}}, "method must be one of"),
    "no run_cap": ({"method": "random", "parameters": {"lr": {"min": 0.01, "max": 0.1}}}, "needs a run_cap"),
    "unknown distribution": ({"method": "random", "run_cap": 2, "parameters": {"lr": {"distribution": "gamma",
                                                                                     "min": 1, "max": 2}}},
                             "unknown distribution 'gamma'"),
    "wrong value type": ({"method": "grid", "parameters": {"batch_size": {"values": [32, "big"]}}},
                         "'big' is not of type int"),
    "bad choice": ({"method": "grid", "parameters": {"optimizer": {"values": ["sgd", "lion"]}}},
                   "'lion' is not one of sgd, adamw"),
    "hyperband without min_iter": ({"method": "random", "run_cap": 2, "parameters": {"lr": {"value": 0.1}},
                                    "early_terminate": {"type": "hyperband", "eta": 3}}, "min_iter must be"),
    "swept and fixed": ({"method": "grid", "parameters": {"lr": {"values": [0.1, 0.2]}}},
                        "--lr is both a fixed option and a parameter"),
    "unknown fixed option": ({"method": "grid", "parameters": {"lr": {"values": [0.1, 0.2]}}},
                             "unrecognized arguments: --epoch-count"),
}
FIXED = {"swept and fixed": ["--lr", "0.5"], "unknown fixed option": ["--epoch-count", "3"]}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_is_one_line_and_exit_2(tmp_path, dataset_dir, case):
    sweep, expected = BAD[case]
    file = write_sweep(tmp_path / "sweep.yaml", **sweep)
    folder = tmp_path / "sweep"
    proc = run_sweep(file, folder, *FIXED.get(case, []), dataset=dataset_dir)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert not folder.exists()  # nothing started


def test_every_shipped_sweep_file_checks():
    shipped = sorted(p.name for p in (ROOT / "configs").glob("sweep-*.yaml"))
    assert shipped == ["sweep-mobilenet_v2.yaml", "sweep-seed-lr-batch.yaml"]  # written out: a new one is listed
    for name, fixed in (("sweep-mobilenet_v2.yaml", ["--epochs", "30"]),
                        ("sweep-seed-lr-batch.yaml", ["--config", str(ROOT / "configs" / "seed-mobilenet_v2.yaml")])):
        proc = ok(subprocess.run([sys.executable, "-m", "train.sweep", str(ROOT / "configs" / name), *fixed,
                                  "--check"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120))
        assert "over" in proc.stdout


# ---- searches ---------------------------------------------------------------------------------

def test_two_workers_run_a_grid_of_4_exactly_once(tmp_path, dataset_dir):
    file = write_sweep(tmp_path / "grid.yaml", method="grid",
                       parameters={"lr": {"values": [0.01, 0.02]}, "batch_size": {"values": [16, 32]}})
    folder = tmp_path / "sweep"
    ok(run_sweep(file, folder, "--workers", "2", *QUICK, dataset=dataset_dir))
    done = counted(folder)
    assert sorted((t.params["lr"], t.params["batch_size"]) for t in done) == \
        [(0.01, 16), (0.01, 32), (0.02, 16), (0.02, 32)]
    assert all(t.state.name == "COMPLETE" for t in done)
    assert {t.user_attrs["owner"]["slot"] for t in done} == {"0", "1"}  # both workers took part
    for t in done:  # each trial is a complete run folder, named by number and parameters
        out = folder / f"trial-{t.number:04d}-lr{t.params['lr']}-batch_size{t.params['batch_size']}"
        summary = json.loads((out / "summary.json").read_text())
        assert t.user_attrs["test_acc"] == summary["test_acc"] and (out / "report.md").is_file()


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_a_search_runs_run_cap_trials_and_the_seed_decides_them(tmp_path, dataset_dir, method):
    file = write_sweep(tmp_path / f"{method}.yaml", method=method, run_cap=6,
                       metric={"name": "val/acc", "goal": "maximize"},
                       parameters={"lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
                                   "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.001},
                                   "label_smoothing": {"distribution": "q_uniform", "min": 0.0, "max": 0.2,
                                                       "q": 0.05}})
    first, again = tmp_path / "first", tmp_path / "again"
    ok(run_sweep(file, first, "--workers", "2", *QUICK, dataset=dataset_dir))
    done = counted(first)
    assert len(done) == 6 and all(t.state.name == "COMPLETE" for t in done)
    assert all(t.value == max(json.loads(line)["val_acc"] for line in
                              (Path(t.user_attrs["run_folder"]) / "metrics.jsonl")
                              .read_text().splitlines()) for t in done)
    if method == "random":  # same seed, same parameters per trial, whatever the number of workers
        ok(run_sweep(file, again, *QUICK, dataset=dataset_dir))
        assert [t.params for t in counted(again)] == [t.params for t in sorted(done, key=lambda t: t.number)]


def test_hyperband_prunes_a_bad_trial_and_its_run_folder_is_complete(tmp_path, dataset_dir):
    # GridSampler's order with seed 0 is lr 0.02, 1e-06, 0.03, 0.05: the bad trial meets a good one at epoch 2.
    file = write_sweep(tmp_path / "hb.yaml", method="grid", parameters={"lr": {"values": [0.05, 0.03, 0.02, 1e-06]}},
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    folder = tmp_path / "sweep"
    ok(run_sweep(file, folder, *LEARNS, dataset=dataset_dir, env={"WANDB_MODE": "offline"}))
    by_lr = {t.params["lr"]: t for t in counted(folder)}
    bad = by_lr[1e-06]
    assert [by_lr[lr].number for lr in (0.02, 1e-06)] == [0, 1], "GridSampler's order changed: pick other values"
    assert bad.state.name == "PRUNED" and max(bad.intermediate_values) == 2  # judged after 2 of 3 epochs
    out = folder / f"trial-{bad.number:04d}-lr1e-06"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned_at_epoch"] == 2 and summary["epochs_trained"] == 2 and summary["num_test_samples"] == 101
    assert "pruned at epoch 2 of 3" in (out / "report.md").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert by_lr[0.02].state.name == "COMPLETE"
    # The sweep's summary: a row per trial with its state and numbers, the best trial, the three plots.
    proc = ok(subprocess.run([sys.executable, "-m", "train.sweep_summary", str(folder)], cwd=ROOT, env=child_env(),
                             capture_output=True, text=True, timeout=300))
    table = (folder / "sweep_summary.md").read_text()
    assert table == proc.stdout.split("\nwritten: ")[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| {bad.number} | lr=1e-06 |"))
    assert "| pruned | 2 |" in row and f"{summary['test_acc']:.4f}" in row
    best = max((t for t in counted(folder) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"Best trial: {best.number} (val/f1_macro {best.value:.4f})" in table
    for plot in ("sweep_history.png", "sweep_importance.png", "sweep_curves.png"):
        assert (folder / plot).stat().st_size > 1000, plot
    # W&B: one offline run per trial, in the sweep's group, named by trial number; the pruned one tagged.
    for t in counted(folder):
        (run,) = (folder / Path(t.user_attrs["run_folder"]).name / "wandb").glob("offline-run-*")
        records = [r["run"] for r in wandb_records(run) if r.get("type") == "run"]
        assert {r.get("run_group") for r in records} == {"sweep"}
        summary = wandb_summary(run)
        assert summary["name"] == f"sweep-trial-{t.number}"
        assert summary["config"]["trial_number"] == t.number and summary["config"]["lr"] == t.params["lr"]
        assert ("pruned" in records[-1].get("tags", [])) == (t.state.name == "PRUNED")


@pytest.mark.ddp
def test_a_ddp_trial_is_pruned_on_every_rank_at_the_same_epoch(tmp_path, dataset_dir):
    """Rank 0 alone asks the pruner; the decision rides on the loop's exchange before the next epoch, so both
    ranks stop after epoch 2 (a rank that went on would hang in DDP's all-reduce, or the run would fail)."""
    file = write_sweep(tmp_path / "hb.yaml", method="grid", run_cap=2,
                       parameters={"lr": {"values": [0.05, 0.03, 0.02, 1e-06]}},
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    folder = tmp_path / "sweep"
    proc = ok(run_sweep(file, folder, "--processes-per-trial", "2", *LEARNS, dataset=dataset_dir,
                        env={"ACCELERATE_USE_CPU": "true", "CIFAR_SWEEP_LAUNCH": "--dynamo_backend no"}))
    good, bad = sorted(counted(folder), key=lambda t: t.number)
    assert (good.params["lr"], good.state.name) == (0.02, "COMPLETE")
    assert (bad.params["lr"], bad.state.name) == (1e-06, "PRUNED")
    summary = json.loads((folder / f"trial-{bad.number:04d}-lr1e-06" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pruned_at_epoch"] == summary["epochs_trained"] == 2
    assert proc.stdout.count("pruned by the sweep after epoch 2") == 1  # said once, by rank 0


def test_a_worker_killed_mid_trial_leaves_no_trial_running(tmp_path, dataset_dir):
    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [0.01, 0.02]}})
    folder = tmp_path / "sweep"
    slow = LEARNS
    worker = subprocess.Popen(sweep_cmd(file, folder, *slow, dataset=dataset_dir), cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("trial-*/checkpoints/e*")):
        time.sleep(0.5)  # mid-trial: the first epoch's checkpoint is complete (renamed from .tmp-*)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its training process, as a lost node
    worker.wait()
    (killed,) = [t for t in trials(folder) if t.state.name == "RUNNING"]
    proc = ok(run_sweep(file, folder, *slow, dataset=dataset_dir))
    assert f"trial {killed.number}: its worker" in proc.stdout and "is gone; resuming it" in proc.stdout
    assert "resuming from " in proc.stdout  # the training run continued from its checkpoint
    after = trials(folder)
    assert not [t for t in after if t.state.name == "RUNNING"]
    assert after[killed.number].state.name == "COMPLETE"  # resumed from its checkpoint, the same trial
    assert sorted(t.params["lr"] for t in counted(folder)) == [0.01, 0.02] and len(after) == 2


def test_a_diverged_trial_fails_and_the_worker_goes_on(tmp_path, dataset_dir):
    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [1e6, 0.02]}})
    folder = tmp_path / "sweep"
    proc = ok(run_sweep(file, folder, *TRIAL, "--batch-size", "32", "--epochs", "2", dataset=dataset_dir))
    states = {t.params["lr"]: t for t in counted(folder)}
    assert states[1e6].state.name == "FAIL" and "training diverged" in states[1e6].user_attrs["fail_reason"]
    assert states[0.02].state.name == "COMPLETE" and "diverged (training diverged" in proc.stdout


def test_a_trial_with_bad_input_stops_the_sweep_with_one_line(tmp_path, dataset_dir):
    """A value every trial would trip over the same way (here a torchvision name that does not exist)."""
    file = write_sweep(tmp_path / "grid.yaml", method="grid",
                       parameters={"arch": {"values": ["resnet18", "resnet_18"]}})  # seed 0: resnet_18 first
    folder = tmp_path / "sweep"
    proc = run_sweep(file, folder, "--eval-batch-size", "64", "--epochs", "1", "--limit-batches", "2",
                     dataset=dataset_dir)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: trial")]
    assert proc.returncode == 2 and len(ours) == 1, proc.stderr[-2000:]
    assert "stopped on bad input, which every trial would repeat: unknown --arch 'resnet_18'" in ours[0]
    (failed,) = [t for t in trials(folder) if t.state.name == "FAIL"]
    assert failed.params["arch"] == "resnet_18" and len(trials(folder)) == 1  # the sweep went no further
