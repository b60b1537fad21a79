"""Search sweeps: a W&B-format sweep file run by Optuna from a real journal file, trials as real training runs."""

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import PORT, ROOT, call, child_env, wandb_records, wandb_summary, write_sweep
from conftest import study_trials as trials

pytestmark = pytest.mark.slow
TRIAL = ["--arch", "resnet18", "--eval-batch-size", "64", "--log-every", "2"]  # fixed options of every trial
QUICK = [*TRIAL, "--epochs", "1", "--limit-batches", "2"]  # a trial in a few seconds
LEARNS = [*TRIAL, "--batch-size", "32", "--epochs", "3"]  # resnet18 learns the generated classes in 2-3 epochs


def sweep_args(file, folder, *options, dataset) -> list:
    return [str(file), "--sweep-dir", str(folder), "--dataset", str(dataset), *options]


def sweep_cmd(file, folder, *options, dataset):
    return [sys.executable, "-m", "train.sweep", *sweep_args(file, folder, *options, dataset=dataset)]


def run_sweep(file, folder, *options, dataset, env=None):
    """A worker in this process (its trials are processes of their own): for the tests whose subject is not the
    worker's process. Those that signal or kill a worker start it with sweep_cmd()."""
    return call("train.sweep", *sweep_args(file, folder, *options, dataset=dataset), env=env)


def counted(folder):
    return [t for t in trials(folder) if not t.user_attrs.get("not_run")]


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
    "an internal field": ({"method": "random", "parameters": {"given": {"value": 1}}},
                          "parameter 'given' is not a train/main.py option"),
    "set by the sweep": ({"method": "random", "parameters": {"trial_number": {"value": 1}}},
                         "parameter 'trial_number' is set by the sweep itself"),
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
    "run cap of 0": ({"method": "bayes", "parameters": {"lr": {"min": 0.01, "max": 0.1}}},
                     "--run-cap must be at least 1"),
    "sigma of 0": ({"method": "random", "run_cap": 2,
                    "parameters": {"lr": {"distribution": "log_normal", "mu": -4, "sigma": 0}}},
                   "sigma must be > 0, got 0"),
}
FIXED = {"swept and fixed": ["--lr", "0.5"], "unknown fixed option": ["--epoch-count", "3"],
         "run cap of 0": ["--run-cap", "0"]}


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


def test_normal_distributions_take_mu_and_sigma_without_a_range(tmp_path):
    """log_normal draws exp(normal(mu, sigma)): positive with no min (it was refused for lacking min > 0)."""
    from train.sweep_config import load_sweep

    file = write_sweep(tmp_path / "sweep.yaml", method="random", run_cap=2, parameters={
        "lr": {"distribution": "log_normal", "mu": -4, "sigma": 0.5},
        "weight_decay": {"distribution": "normal", "mu": 5e-4, "sigma": 1e-4}})
    assert [(p.name, p.distribution, p.mu, p.sigma) for p in load_sweep(str(file)).parameters] == [
        ("lr", "log_normal", -4.0, 0.5), ("weight_decay", "normal", 5e-4, 1e-4)]


def test_an_unknown_parameter_error_lists_only_training_options(tmp_path, dataset_dir):
    """The options it offers are train/main.py's own, less those the sweep sets for each trial."""
    from train.config import build_parser

    file = write_sweep(tmp_path / "sweep.yaml", method="random", parameters={"zzz": {"value": 1}})
    proc = run_sweep(file, tmp_path / "sweep", dataset=dataset_dir)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    known = set(proc.stderr.split("(known: ")[1].strip().rstrip(")").split(", "))
    options = {a.dest for a in build_parser()._actions} - {"help", "config"}
    assert "lr" in known and known <= options, known - options
    assert not known & {"given", "sweep_dir", "trial_number", "output_dir", "resume", "run_name"}, known


def test_every_shipped_sweep_file_checks(tmp_path):
    shipped = sorted(p.name for p in (ROOT / "configs").glob("sweep-*.yaml"))
    # written out: a new one is listed
    assert shipped == ["sweep-arch-lr.yaml", "sweep-mobilenet_v2.yaml", "sweep-seed-lr-batch.yaml"]
    readme = (ROOT / "README.md").read_text()
    wandb_lines = readme[readme.index("    program: train/main.py"):].split("\n\n")[0]  # the README's W&B form
    with_wandb = tmp_path / "wandb.yaml"
    with_wandb.write_text((ROOT / "configs" / "sweep-mobilenet_v2.yaml").read_text() + textwrap.dedent(wandb_lines))
    assert yaml.safe_load(with_wandb.read_text())["command"][-1] == "${args}"
    for file, fixed in ((ROOT / "configs" / "sweep-arch-lr.yaml", ["--epochs", "30"]),
                        (ROOT / "configs" / "sweep-mobilenet_v2.yaml", ["--epochs", "30"]),
                        (ROOT / "configs" / "sweep-seed-lr-batch.yaml",
                         ["--config", str(ROOT / "configs" / "seed-mobilenet_v2.yaml")]),
                        (with_wandb, [])):
        proc = ok(call("train.sweep", file, *fixed, "--check"))
        assert "over" in proc.stdout


def test_a_bayes_sweep_without_run_cap_runs_until_stopped_or_each_workers_run_cap(tmp_path):
    """As W&B's: no run_cap is no limit on the study; --run-cap N (wandb agent's --count) limits a worker."""
    file = write_sweep(tmp_path / "bayes.yaml", method="bayes", parameters={"lr": {"min": 0.01, "max": 0.1}})
    proc = ok(call("train.sweep", file, "--check"))
    assert proc.stdout.strip() == f"{file}: bayes over lr, no run_cap: runs until stopped (Ctrl-C, SIGTERM, " \
                                  f"scancel) or each worker's --run-cap N; metric val/f1_macro (maximize)"
    usage = " ".join(ok(call("train.sweep", "--help")).stdout.split())
    assert "--run-cap N, --count N this worker stops after running N trials, like `wandb agent --count N`" in usage


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


    dashboard = dashboard_trials(folder / "study.journal")  # what optuna-dashboard shows of the journal
    assert sorted(dashboard) == sorted((t.number, t.state.name.capitalize(), t.value) for t in trials(folder))


def dashboard_trials(journal: Path) -> list:
    """(number, state, value) of each trial, as a real optuna-dashboard server reads them from the journal."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    server = subprocess.Popen([exe, str(journal), "--port", str(port), "--quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0?after=0", timeout=5) as r:
                    study = json.load(r)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.poll() \
                    is not None else "optuna-dashboard did not answer"
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return [(t["number"], t["state"], (t.get("values") or [None])[0]) for t in study["trials"]]


# run_cap: as few as prove it. bayes: TPE draws its first 10 trials at random (n_startup_trials), so more trials
# here would prove nothing more than 2 do: that a bayes sweep's workers run it through. bayes has no run_cap, as
# W&B allows: each of the 2 workers stops at its --run-cap 1 (wandb agent --count 1).
@pytest.mark.parametrize("method, run_cap, worker_cap", [("random", 2, 0), ("bayes", 0, 1)])
def test_a_search_runs_run_cap_trials_and_the_seed_decides_them(tmp_path, dataset_dir, method, run_cap, worker_cap):
    file = write_sweep(tmp_path / f"{method}.yaml", method=method, **({"run_cap": run_cap} if run_cap else {}),
                       metric={"name": "val/acc", "goal": "maximize"},
                       parameters={"lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
                                   "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.001},
                                   "momentum": {"value": 0.8},  # fixed: not in the trials' folder names
                                   "label_smoothing": {"distribution": "q_uniform", "min": 0.0, "max": 0.2,
                                                       "q": 0.05}})
    first, again = tmp_path / "first", tmp_path / "again"
    capped = ["--run-cap", str(worker_cap)] if worker_cap else []
    proc = ok(run_sweep(file, first, "--workers", "2", *capped, *QUICK, dataset=dataset_dir))
    done = counted(first)
    assert len(done) == (run_cap or 2 * worker_cap) and all(t.state.name == "COMPLETE" for t in done)
    if worker_cap:  # each worker ran its one trial and said why it stopped
        assert sorted(t.user_attrs["owner"]["slot"] for t in done) == ["0", "1"]
        assert proc.stdout.count("stopping at its --run-cap 1 (") == 2, proc.stdout[-3000:]
    assert "runs until it is stopped" not in proc.stdout
    assert "starting fresh" not in proc.stdout and "no complete checkpoint" not in proc.stdout  # fresh trials
    for t in done:  # named by the searched parameters only
        o = t.user_attrs["options"]
        assert Path(t.user_attrs["run_folder"]).name == f"trial-{t.number:04d}-lr{o['lr']:.4g}-weight_decay" \
            f"{o['weight_decay']:.4g}-label_smoothing{o['label_smoothing']:.4g}" and o["momentum"] == 0.8
    assert all(t.value == max(json.loads(line)["val_acc"] for line in
                              (Path(t.user_attrs["run_folder"]) / "metrics.jsonl")
                              .read_text().splitlines()) for t in done)
    if method == "random":  # same seed, same parameters per trial, whatever the number of workers
        ok(run_sweep(file, again, *QUICK, dataset=dataset_dir))
        assert [t.params for t in counted(again)] == [t.params for t in sorted(done, key=lambda t: t.number)]


def test_hyperband_prunes_a_bad_trial_and_its_run_folder_is_complete(tmp_path, dataset_dir):
    import pandas as pd

    # GridSampler's order with seed 0 is lr 0.02, 1e-06, 0.03, 0.05: the bad trial meets a good one at epoch 2.
    # run_cap 2: those two are the whole story.
    file = write_sweep(tmp_path / "hb.yaml", method="grid", run_cap=2,
                       parameters={"lr": {"values": [0.05, 0.03, 0.02, 1e-06]}},
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
    proc = ok(call("train.sweep_summary", folder))
    table = (folder / "sweep_summary.md").read_text()
    assert table == proc.stdout.split("\nwritten: ")[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| {bad.number} | 1e-06 |"))
    assert "| pruned | 2 |" in row and f"{summary['test_acc']:.4f}" in row
    best = max((t for t in counted(folder) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"Best trial: {best.number} (val/f1_macro {best.value:.4f})" in table
    df = pd.read_csv(folder / "sweep_summary.csv")  # a column per parameter, as pandas users read it
    assert df["lr"].tolist() == [0.02, 1e-06] and df["state"].tolist() == ["complete", "pruned"]
    assert df["test_acc"][1] == summary["test_acc"] and df["epochs"].tolist() == [3, 2]
    assert (folder / "sweep_curves.png").stat().st_size > 1000
    for plot in ("sweep_history.png", "sweep_importance.png"):  # one complete trial: nothing to plot yet
        assert f"Note: {plot} not drawn: too few trials (1 complete; " in table and not (folder / plot).exists()
    assert proc.stdout.rstrip().endswith("written: " + f"{folder}/sweep_summary.md, .csv, sweep_curves.png")
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
                        env={"ACCELERATE_USE_CPU": "true",
                             "CIFAR_SWEEP_LAUNCH": f"--dynamo_backend no --main_process_port {PORT}"}))
    good, bad = sorted(counted(folder), key=lambda t: t.number)
    assert (good.params["lr"], good.state.name) == (0.02, "COMPLETE")
    assert (bad.params["lr"], bad.state.name) == (1e-06, "PRUNED")
    summary = json.loads((folder / f"trial-{bad.number:04d}-lr1e-06" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pruned_at_epoch"] == summary["epochs_trained"] == 2
    assert proc.stdout.count("pruned by the sweep after epoch 2") == 1  # said once, by rank 0


def test_workers_killed_mid_trial_leave_no_trial_running(tmp_path, dataset_dir):
    """A lost node: two workers and their trials SIGKILLed mid-trial. The next worker resumes both trials from
    their checkpoints, one after the other (it claims one at a time)."""
    import psutil

    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [0.01, 0.02]}})
    folder = tmp_path / "sweep"
    sweep = subprocess.Popen(sweep_cmd(file, folder, *LEARNS, "--workers", "2", dataset=dataset_dir), cwd=ROOT,
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len({c.parent for c in folder.glob("trial-*/checkpoints/e*")}) < 2:
        time.sleep(0.5)  # mid-trial: each trial's first epoch's checkpoint is complete (renamed from .tmp-*)
    lost = [psutil.Process(sweep.pid), *psutil.Process(sweep.pid).children(recursive=True)]
    for p in lost:  # the sweep, its workers and their training processes, as a lost node
        p.kill()
    psutil.wait_procs(lost, timeout=30)
    killed = sorted(t.number for t in trials(folder) if t.state.name == "RUNNING")
    assert killed == [0, 1]
    proc = ok(run_sweep(file, folder, *LEARNS, dataset=dataset_dir))
    for number in killed:
        assert f"trial {number}: its worker" in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("is gone; resuming it") == 2 and proc.stdout.count("resuming from ") == 2
    after = trials(folder)
    assert [t.state.name for t in after] == ["COMPLETE", "COMPLETE"]  # resumed from their checkpoints
    assert sorted(t.params["lr"] for t in counted(folder)) == [0.01, 0.02]


def test_a_worker_killed_right_after_asking_leaves_a_trial_the_next_worker_runs(tmp_path, dataset_dir):
    """SIGKILL between asking the study for a trial and drawing its options: the trial is RUNNING with only its
    owner; the next worker sees that owner gone, draws the options (the grid point the trial was given) and
    runs it, then the rest of the grid."""
    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [0.01, 0.02]}})
    folder = tmp_path / "sweep"
    kill = {"CIFAR_ACCELERATE_FAILPOINT": "kill_after_ask:0"}
    killed = subprocess.run(sweep_cmd(file, folder, *QUICK, dataset=dataset_dir), cwd=ROOT, env=child_env(**kill),
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (asked,) = trials(folder)
    assert asked.state.name == "RUNNING" and "options" not in asked.user_attrs and "owner" in asked.user_attrs
    proc = ok(run_sweep(file, folder, *QUICK, dataset=dataset_dir))
    assert "trial 0: its worker" in proc.stdout and "is gone; resuming it" in proc.stdout, proc.stdout[-3000:]
    after = counted(folder)
    assert [t.state.name for t in after] == ["COMPLETE", "COMPLETE"], [(t.number, t.state) for t in after]
    assert sorted(t.params["lr"] for t in after) == [0.01, 0.02]
    assert after[0].user_attrs["options"] == {"lr": after[0].params["lr"]}


@pytest.mark.parametrize("when", ["mid-trial", "starting", "claimer-killed"])
def test_a_worker_killed_alone_leaves_its_trial_at_a_checkpoint_for_the_next(tmp_path, dataset_dir, when):
    """SIGKILL (the OOM killer) to a worker alone, mid-trial or while its trial's process is still starting
    (before it registers): the training, no longer watched, stops at a checkpoint by itself instead of training
    on; the next worker waits for it to stop, then resumes the trial from that checkpoint. claimer-killed: the
    worker that claims the trial is killed too while it waits; the one after it waits for the same training."""
    import psutil

    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [0.02]}})
    folder = tmp_path / "sweep"
    release = tmp_path / "release"  # the orphaned training's checkpoint waits for it: still stopping when the
    env = {"CIFAR_ACCELERATE_DELAY": f"preempted_save:{release}"}  # next worker starts, until that one waits

    def start(stderr=subprocess.DEVNULL):
        return subprocess.Popen(sweep_cmd(file, folder, *LEARNS, dataset=dataset_dir), cwd=ROOT, env=child_env(**env),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)

    worker = start()
    deadline = time.time() + 300
    if when == "starting":  # its process just started: still importing, nothing registered yet
        assert worker.stdout.readline().startswith("trial 0: lr=0.02 -> ")
        while time.time() < deadline and not psutil.Process(worker.pid).children():
            time.sleep(0.05)
    while when != "starting" and time.time() < deadline and not list(folder.glob("trial-*/checkpoints/e*")):
        time.sleep(0.5)
    (training,) = psutil.Process(worker.pid).children()
    worker.kill()
    worker.wait()
    if when == "claimer-killed":
        claimer = start()
        assert "is gone; resuming it" in claimer.stdout.readline()
        assert claimer.stdout.readline().startswith("trial 0: waiting for its training processes")
        claimer.kill()
        claimer.wait()
        assert training.is_running()  # still stopping (the delayed checkpoint), the trial claimed by nobody alive
    last = start(stderr=subprocess.PIPE)
    seen = [last.stdout.readline(), last.stdout.readline()]
    assert training.is_running(), seen  # it waited for the training: let the training's checkpoint finish
    release.touch()
    out, err = last.communicate(timeout=900)
    proc = ok(subprocess.CompletedProcess(last.args, last.returncode, "".join(seen) + out, err))
    left_alone = worker.stdout.read()  # to its end: the orphaned training, which shares the pipe, has exited
    assert "preempted: checkpoint written" in left_alone, left_alone[-3000:]
    assert "trial 0: waiting for its training processes" in proc.stdout, proc.stdout[-3000:]
    assert "is gone; resuming it" in proc.stdout and "did not stop within" not in proc.stdout
    stopped_at = re.search(r"optimizer steps in this attempt \(from step 0 to (\d+)\)", left_alone).group(1)
    assert re.search(rf"resuming from .*step {stopped_at}\)", proc.stdout), proc.stdout[-3000:]  # one after the other
    assert not training.is_running()
    (trial,) = trials(folder)
    assert trial.state.name == "COMPLETE"


@pytest.mark.parametrize("sig,processes", [(signal.SIGINT, 1), (signal.SIGTERM, 2)], ids=["ctrl-c", "sigterm-ddp"])
def test_a_stopped_worker_stops_its_trial_at_a_checkpoint_and_the_next_resumes_it(tmp_path, dataset_dir, sig,
                                                                                 processes):
    """Ctrl-C (SIGINT) or Slurm's SIGTERM to the worker alone: it passes the stop on to the trial's training
    processes (under DDP, through accelerate launch, which turns exit 75 into 1), which checkpoint; the trial
    stays RUNNING, the worker exits 75, and the next worker resumes the trial with the steps it lacked. Ctrl-C
    stops a bayes sweep without run_cap, which runs until it is stopped (as W&B's), and the next worker's
    --run-cap 1 ends it after the resumed trial; SIGTERM stops a grid."""
    method = "bayes" if sig == signal.SIGINT else "grid"
    file = write_sweep(tmp_path / "sweep.yaml", method=method, parameters={"lr": {"values": [0.02]}})
    folder, options = tmp_path / "sweep", [*LEARNS, "--processes-per-trial", str(processes)]
    env = {"ACCELERATE_USE_CPU": "true",
           "CIFAR_SWEEP_LAUNCH": f"--dynamo_backend no --mixed_precision no --main_process_port {PORT}"
           } if processes > 1 else {}
    worker = subprocess.Popen(sweep_cmd(file, folder, *options, dataset=dataset_dir), cwd=ROOT,
                              env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("trial-*/checkpoints/e*")):
        time.sleep(0.2)
    worker.send_signal(sig)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 75, err[-3000:]
    (trial,) = trials(folder)
    run = folder / "trial-0000"  # one value of lr: nothing searched, nothing in the name
    assert trial.state.name == "RUNNING" and (run / "PREEMPTED").is_file(), err[-3000:]
    assert "stopped with a checkpoint; the requeued worker, or the next one, resumes it" in out
    assert "steps in this attempt (from step 0 " in out
    assert ("a bayes sweep without run_cap runs until it is stopped" in out) == (method == "bayes"), out[-3000:]
    capped = ["--run-cap", "1"] if method == "bayes" else []
    proc = ok(run_sweep(file, folder, *options, *capped, dataset=dataset_dir, env=env))
    assert "is gone; resuming it from its last checkpoint" in proc.stdout, proc.stdout
    assert ("worker 0: stopping at its --run-cap 1 (1 complete)" in proc.stdout) == bool(capped), proc.stdout
    first = int(out.split(" optimizer steps in this attempt")[0].rsplit(maxsplit=1)[-1])
    second = int(proc.stdout.split(" optimizer steps in this attempt")[0].rsplit(maxsplit=1)[-1])
    total = json.loads((run / "summary.json").read_text())["steps"]
    assert 0 < first < total and first + second == total  # the resumed trial took only the steps it lacked
    (trial,) = trials(folder)
    assert trial.state.name == "COMPLETE"


def test_a_database_storage_holds_the_study_instead_of_the_journal(tmp_path, dataset_dir):
    """--storage URL: the workers, the trials' epoch reports and the summary all use the database."""
    import optuna

    file = write_sweep(tmp_path / "grid.yaml", method="grid", parameters={"lr": {"values": [0.01, 0.02]}},
                       early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    folder, url = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    ok(run_sweep(file, folder, "--storage", url, *QUICK, dataset=dataset_dir))
    assert not (folder / "study.journal").exists()
    done = optuna.load_study(study_name="sweep", storage=url).get_trials()
    assert sorted(t.params["lr"] for t in done) == [0.01, 0.02] and all(t.state.name == "COMPLETE" for t in done)
    assert all(t.intermediate_values for t in done)  # reported by each trial's training process
    proc = call("train.sweep_summary", folder, "--storage", url)
    assert proc.returncode == 0 and (folder / "sweep_summary.md").read_text().count("| complete |") == 2, proc.stderr
    bad = run_sweep(file, tmp_path / "other", "--storage", "nosuchdb://x", *QUICK, dataset=dataset_dir)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --storage nosuchdb://x: "), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "other").exists()
    bad = run_sweep(file, tmp_path / "other", *QUICK, dataset=dataset_dir, env={"CIFAR_SWEEP_STORAGE": "nosuchdb://y"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: --storage nosuchdb://y: "), bad.stderr
    assert not (tmp_path / "other").exists()  # the URL from the environment, checked as early


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
