"""One table of every run of a sweep (or any folder of run folders), as markdown, CSV and a plot.

    python -m train.sweep_summary runs/sweep-<id>

Writes sweep_summary.md, sweep_summary.csv and sweep_summary.png into that folder and prints the
table. Runs that have not finished are listed with their state, never left out. A search sweep's folder
(python -m train.sweep: it holds the sweep file and study.journal, or give --storage URL) gets one row per
trial instead (a column for each searched parameter), from the study and the trials' run folders, the best
trial, and three plots: sweep_history.png (Optuna's optimisation history) and sweep_importance.png (parameter
importances), each once enough trials are complete (PLOT_MIN_COMPLETE), and sweep_curves.png (every trial's
validation metric per epoch, pruned trials marked where they stopped).
"""

import argparse
import csv
import os
import sys
from pathlib import Path

from train.errors import UsageError, first_line, report_usage_error
from train.report import pyplot, save_plot
from train.runs_table import COLUMNS, history, markdown, run_row


def write_table(folder: Path, text: str, rows: list, columns: list) -> None:
    """sweep_summary.md (the text) and sweep_summary.csv (the rows) in the sweep folder."""
    (folder / "sweep_summary.md").write_text(text)
    with open(folder / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(runs: list, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        records = history(run)
        if records:
            ax.plot([r["epoch"] for r in records], [r["val_f1_macro"] for r in records], marker=".", label=run.name)
    ax.set(xlabel="epoch", ylabel="validation macro-F1", title=f"sweep {path.parent.name}")
    save_plot(fig, ax, path, legend_size=7)


def summarise(folder: Path) -> list:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of runs")
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not runs:
        raise UsageError(f"{folder} holds no run folders")
    rows = [run_row(run) for run in runs]
    write_table(folder, markdown(rows), rows, COLUMNS)
    plot(runs, folder / "sweep_summary.png")
    return rows


# ---- search sweeps (train.sweep) ----------------------------------------------------------------

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
# Complete trials each plot of the search needs before it says anything a table does not. The history: with one
# or two points its best-so-far line is the table's best row; from three it has a course. The importances:
# Optuna's default evaluator (PED-ANOVA) rates a parameter by how the top 10% of the complete trials differ
# from all of them; with 10 or fewer that top is a single trial, whose values say nothing about importance
# (two trials give every parameter the same share, the 0.50/0.50 of a two-parameter sweep; one trial with a
# parameter that alone decides the metric got about 0.5 of 2 at 5-10 trials, 0.8-1.0 from 12). Optuna's docs
# prefer 5 trials in that top (50); 11, two in it, is the least that compares trials. (Its former default,
# fANOVA, fits a random forest to the trials: as little use on one or two.)
PLOT_MIN_COMPLETE = {"sweep_history.png": 3, "sweep_importance.png": 11}
RESULTS = ("trial", "state", "epochs", "test_acc", "test_f1_macro", "seconds", "note")  # a search row's own columns


def trial_histories(folder: Path, s) -> dict:
    """{trial number: its run folder's per-epoch records} for the trials that were run."""
    return {t.number: history(folder / Path(t.user_attrs.get("run_folder", "-")).name)
            for t in s.get_trials(deepcopy=False) if not t.user_attrs.get("not_run")}


def search_rows(s, sweep, histories: dict) -> list:
    """A row per trial that was run: its number, a column per searched parameter (param_<name> where a result
    column has its name), its state and results."""
    rows = []
    for t in s.get_trials(deepcopy=False):
        if t.number not in histories:
            continue
        records = histories[t.number]
        values = [r[sweep.record_key] for r in records]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
        results = {"state": STATES.get(t.state.name, t.state.name.lower()), "epochs": len(records),
                   f"best {sweep.metric}": sweep.best(values) if values else "",
                   "test_acc": t.user_attrs.get("test_acc", ""), "test_f1_macro": t.user_attrs.get("test_f1_macro", ""),
                   "seconds": seconds, "note": t.user_attrs.get("fail_reason", "")}
        options = t.user_attrs.get("options", t.params)
        rows.append({"trial": t.number, **{_column(name): options.get(name, "") for name in sweep.searched},
                     **results})
    return rows


def _column(name: str) -> str:
    return f"param_{name}" if name in RESULTS else name


def _shown(rows: list, sweep) -> list:
    """The rows as the markdown table shows them: parameters to 4 significant digits (the CSV keeps them all)."""
    names = {_column(name) for name in sweep.searched}
    return [{k: f"{v:.4g}" if k in names and isinstance(v, float) else v for k, v in row.items()} for row in rows]


def _parameters(trial) -> str:
    options = trial.user_attrs.get("options", trial.params)
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def search_plots(folder: Path, s, sweep, histories: dict) -> tuple:
    """The three plots: (the files written, notes on those not drawn: too few complete trials)."""
    pyplot()  # headless, before Optuna's plots import it
    complete = sum(t.state.name == "COMPLETE" for t in s.get_trials(deepcopy=False))
    written, notes = [], []
    for name, need in PLOT_MIN_COMPLETE.items():
        if complete < need:
            (folder / name).unlink(missing_ok=True)  # an older summary's, from fewer trials
            notes.append(f"{name} not drawn: too few trials ({complete} complete; it needs {need})")
            continue
        note = _optuna_plot(folder / name, s)
        notes += [note] if note else []
        written += [] if note else [name]
    _curves(folder / "sweep_curves.png", s, sweep, histories)
    return [*written, "sweep_curves.png"], notes


def _optuna_plot(path: Path, s) -> str:
    """Draw Optuna's optimisation history or parameter importances (by the file's name); "" or why not."""
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    draw = {"sweep_history.png": optuna_plots.plot_optimization_history,
            "sweep_importance.png": optuna_plots.plot_param_importances}[path.name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            ax = draw(s)
        ax.figure.set_size_inches(7, 4.5)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=100)
        return ""
    except (ValueError, RuntimeError) as e:
        return f"{path.name} not drawn: {first_line(e)}"
    finally:
        pyplot().close("all")


def _curves(path: Path, s, sweep, histories: dict) -> None:
    """Every trial's validation metric per epoch, pruned trials dashed and marked where they stopped."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in s.get_trials(deepcopy=False):
        records = histories.get(t.number)
        if not records:
            continue
        epochs, values = [r["epoch"] for r in records], [r[sweep.record_key] for r in records]
        pruned = t.state.name == "PRUNED"
        (line,) = ax.plot(epochs, values, linestyle="--" if pruned else "-", marker=".", label=f"trial {t.number}")
        if pruned:
            ax.plot(epochs[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    ax.set(xlabel="epoch", ylabel=sweep.metric, title=f"{path.parent.name}: validation per trial (x: pruned)")
    save_plot(fig, ax, path, legend_size=7)


def summarise_search(folder: Path) -> tuple:
    """(rows, text, the plots written) of a train.sweep folder; writes sweep_summary.md/.csv and the plots."""
    from train import study
    from train.sweep_config import load_sweep

    sweep = load_sweep(str(folder / study.SWEEP_FILE))
    try:
        s = study.load_optuna().load_study(study_name=study.STUDY, storage=study.storage_for(folder))
    except KeyError:  # the journal is there, the first worker has not created the study in it yet
        raise UsageError(f"{folder} has no study yet: its first worker is starting; try again in a moment") from None
    histories = trial_histories(folder, s)
    rows = search_rows(s, sweep, histories)
    columns = list(rows[0]) if rows else ["trial"]
    lines = [markdown(_shown(rows, sweep), columns).rstrip("\n")]
    complete = [t for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        best = s.best_trial
        lines += ["", f"Best trial: {best.number} ({sweep.metric} {best.value:.4f}): "
                      + _parameters(best)]
    written, notes = search_plots(folder, s, sweep, histories)
    lines += ["", f"{sweep.method} sweep, {len(rows)} trials: " + ", ".join(
        f"{sum(r['state'] == state for r in rows)} {state}" for state in dict.fromkeys(r["state"] for r in rows))]
    lines += [f"Note: {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    write_table(folder, text, rows, columns)
    return rows, text, written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder, e.g. runs/sweep-12345")
    parser.add_argument("--storage", default="", help="the database URL the sweep was started with (--storage)")
    args = parser.parse_args(argv)
    try:
        from train import study

        if args.storage:
            os.environ[study.STORAGE_ENV] = args.storage
        if study.has_study(args.folder):
            _, text, plots = summarise_search(args.folder)
            print(text, end="")
            print(f"\nwritten: {args.folder}/sweep_summary.md, .csv, {', '.join(plots)}")
            return 0
        rows = summarise(args.folder)
    except UsageError as e:
        return report_usage_error(e)
    print(markdown(rows), end="")
    unfinished = [r["run"] for r in rows if r["state"] != "finished"]
    if unfinished:
        print(f"\n{len(unfinished)} of {len(rows)} runs not finished: {', '.join(unfinished)}")
    print(f"\nwritten: {args.folder}/sweep_summary.md, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
