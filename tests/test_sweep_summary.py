import csv
import shutil
from pathlib import Path

import pytest

from conftest import call, write_sweep
from train import run_dir
from train.config import Config
from train.sweep_summary import main, summarise


@pytest.mark.slow  # needs a trained run
def test_summary_lists_every_run_with_its_state(trained_run, tmp_path):
    sweep = tmp_path / "sweep-7"
    shutil.copytree(trained_run, sweep / "resnet18-lr0.02-bs32", ignore=shutil.ignore_patterns("checkpoints"))
    preempted = sweep / "resnet34-lr0.1-bs32"
    preempted.mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", preempted / "config.yaml")
    shutil.copy(trained_run / "metrics.jsonl", preempted / "metrics.jsonl")
    (preempted / "PREEMPTED").write_text("SIGUSR1 at step 3\n")
    (sweep / "resnet50-lr0.1-bs32").mkdir()

    rows = {r["run"]: r for r in summarise(sweep)}
    assert rows["resnet18-lr0.02-bs32"]["state"] == "finished"
    assert rows["resnet18-lr0.02-bs32"]["test_acc"] > 0.6 and rows["resnet18-lr0.02-bs32"]["epochs"] == 3
    assert rows["resnet34-lr0.1-bs32"]["state"].startswith("preempted")
    assert rows["resnet50-lr0.1-bs32"]["state"] == "not started"
    table = (sweep / "sweep_summary.md").read_text()
    assert table.count("\n") == 5 and "| not started |" in table
    assert (sweep / "sweep_summary.png").stat().st_size > 1000


def test_missing_folder_is_one_line(tmp_path):
    proc = call("train.sweep_summary", tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not a folder of runs" in proc.stderr


# ---- Every state, from run folders written the way train/main.py writes them -----------------------------------

def record(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5, "val_loss": 1.1 / epoch, "val_acc": 0.5,
            "val_f1_macro": 0.4 + 0.1 * epoch, "val_per_class_accuracy": {"a": 0.5, "b": 0.5}, "lr": 0.1,
            "step": 8 * epoch, "epoch_seconds": 2.0, "images_per_second": 100.0}


def make_run(sweep: Path, arch: str, lr: float, epochs: int = 0, *, finished=False, preempted=False,
             checkpoints=False, config=True) -> str:
    """A run folder as the training leaves it at some point of its life; returns its name."""
    name = f"{arch}-lr{lr}-bs32"
    run = sweep / name
    run.mkdir(parents=True)
    if config:
        run_dir.write_config(run, {**Config().to_dict(), "arch": arch, "lr": lr, "batch_size": 32},
                             {"world_size": 1})
    for epoch in range(1, epochs + 1):
        run_dir.append_metrics(run, record(epoch))
    if checkpoints:
        (run / "checkpoints" / f"e{epochs:04d}-b000003-step{8 * epochs + 3:08d}").mkdir(parents=True)
    if preempted:
        (run / "PREEMPTED").write_text(f"SIGUSR1 at step {8 * epochs + 3}; slurm job 7 restart 0\n")
    if finished:
        run_dir.write_summary(run, {"best_epoch": epochs, "best_val_f1_macro": 0.4 + 0.1 * epochs, "test_loss": 0.5,
                                    "test_acc": 0.75, "test_f1_macro": 0.7, "wall_seconds": 123.0})
    return name


@pytest.fixture
def sweep(tmp_path) -> tuple:
    sweep = tmp_path / "sweep-7"
    states = {
        make_run(sweep, "resnet18", 0.1, 3, finished=True, checkpoints=True): "finished",
        # preempted after its first epoch, or during it (the checkpoint preemption writes, no epoch yet)
        make_run(sweep, "resnet18", 0.05, 1, preempted=True, checkpoints=True): "preempted (requeued?)",
        make_run(sweep, "resnet18", 0.02, 0, preempted=True, checkpoints=True): "preempted (requeued?)",
        # training, or killed: epochs done, or only a mid-epoch checkpoint so far
        make_run(sweep, "resnet34", 0.1, 2, checkpoints=True): "running or failed",
        make_run(sweep, "resnet34", 0.05, 2): "running or failed",
        make_run(sweep, "resnet34", 0.02, 0, checkpoints=True): "running or failed",
        make_run(sweep, "resnet50", 0.1, config=False): "not started",
    }
    (sweep / ".hidden").mkdir()  # not a run
    return sweep, states


def test_every_state_is_told_apart(sweep):
    folder, states = sweep
    rows = summarise(folder)
    assert [r["run"] for r in rows] == sorted(states)
    assert {r["run"]: r["state"] for r in rows} == states
    by_name = {r["run"]: r for r in rows}
    done = by_name["resnet18-lr0.1-bs32"]
    assert (done["arch"], done["lr"], done["batch_size"], done["epochs"], done["best_epoch"], done["test_acc"],
            done["test_f1_macro"], done["wall_seconds"]) == ("resnet18", 0.1, 32, 3, 3, 0.75, 0.7, 123.0)
    assert by_name["resnet34-lr0.1-bs32"]["epochs"] == 2 and by_name["resnet18-lr0.05-bs32"]["epochs"] == 1
    for name, state in states.items():  # no test numbers for a run without a summary
        if state != "finished":
            assert by_name[name]["test_acc"] == "" and by_name[name]["best_epoch"] == "", name


def test_table_csv_and_printout_list_every_run(sweep, capsys):
    folder, states = sweep
    assert main([str(folder)]) == 0
    printed = capsys.readouterr().out
    table = (folder / "sweep_summary.md").read_text()
    assert printed.startswith(table)
    for name, state in states.items():
        assert f"| {name} |" in table and f"| {state} |" in table.split(f"| {name} |")[1].splitlines()[0], name
    with open(folder / "sweep_summary.csv", newline="") as f:
        assert {r["run"]: r["state"] for r in csv.DictReader(f)} == states
    unfinished = sorted(name for name, state in states.items() if state != "finished")
    assert f"6 of 7 runs not finished: {', '.join(unfinished)}" in printed
    assert main([str(folder)]) == 0  # its own output files are not runs
    assert {r["run"] for r in summarise(folder)} == set(states)


def test_a_summary_written_halfway_is_not_finished(tmp_path):
    sweep = tmp_path / "sweep-8"
    name = make_run(sweep, "resnet18", 0.1, 2, checkpoints=True)
    (sweep / name / "summary.json").write_text('{"best_epoch": 2, "test_')  # killed while writing it
    assert summarise(sweep)[0]["state"] == "running or failed"


# ---- A search sweep's summary, from a real journal whose trials are told here (no training) ----------------------

def told_search(folder: Path, values: list) -> list:
    """A train.sweep folder: its sweep file and a real journal, one trial per value told COMPLETE with the options
    the study drew (lr searched, epochs searched, which a result column is also named, arch fixed)."""
    from train import study
    from train.sweep_config import load_sweep

    folder.mkdir()
    write_sweep(folder / study.SWEEP_FILE, method="random", parameters={
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1},
        "epochs": {"distribution": "int_uniform", "min": 1, "max": 9}, "arch": {"value": "resnet18"}})
    sweep = load_sweep(str(folder / study.SWEEP_FILE))
    s = study.open_study(sweep, folder, seed=0)
    drawn = []
    for value in values:
        trial = s.ask()
        options = study.suggest(s, trial, sweep, 0)
        trial.set_user_attr("options", options)
        trial.set_user_attr("run_folder", str(folder / f"trial-{trial.number:04d}"))
        s.tell(trial, value)
        drawn.append(options)
    return drawn


def test_a_search_summary_has_a_column_per_searched_parameter(tmp_path):
    """pandas reads sweep_summary.csv with a column per searched parameter, its values as the study drew them;
    the fixed ones are left out; a parameter named like a result column is param_<name>."""
    import pandas as pd

    folder = tmp_path / "sweep"
    drawn = told_search(folder, [0.5, 0.6, 0.7])
    proc = call("train.sweep_summary", folder)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(folder / "sweep_summary.csv")
    assert list(df.columns) == ["trial", "lr", "param_epochs", "state", "epochs", "best val/f1_macro", "test_acc",
                                "test_f1_macro", "seconds", "note"]
    assert df["lr"].tolist() == [o["lr"] for o in drawn]  # every digit
    assert df["param_epochs"].tolist() == [o["epochs"] for o in drawn] and df["epochs"].tolist() == [0, 0, 0]
    assert df["state"].tolist() == ["complete"] * 3
    table = (folder / "sweep_summary.md").read_text()
    assert table.startswith("| trial | lr | param_epochs | state |")
    assert f"| 0 | {drawn[0]['lr']:.4g} | {drawn[0]['epochs']} | complete |" in table


@pytest.mark.parametrize("complete, drawn", [(2, []), (10, ["sweep_history.png"]),
                                             (11, ["sweep_history.png", "sweep_importance.png"])])
def test_the_search_plots_wait_for_enough_complete_trials(tmp_path, complete, drawn):
    """Below PLOT_MIN_COMPLETE the history and importance plots are not drawn, and the summary says why."""
    folder = tmp_path / "sweep"
    told_search(folder, [0.1 * (i % 7) for i in range(complete)])
    proc = call("train.sweep_summary", folder)
    assert proc.returncode == 0, proc.stderr
    for plot, need in (("sweep_history.png", 3), ("sweep_importance.png", 11)):
        note = f"Note: {plot} not drawn: too few trials ({complete} complete; it needs {need})"
        assert (plot in drawn) == (folder / plot).is_file() == (note not in proc.stdout), (plot, proc.stdout)
        assert (plot in drawn) == (plot in proc.stdout.split("written: ")[1])
    assert (folder / "sweep_curves.png").is_file()
