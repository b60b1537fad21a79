"""One table of every run of a sweep (or any folder of run folders), as markdown, CSV and a plot.

    python -m train.sweep_summary runs/sweep-<array job id>

Writes sweep_summary.md, sweep_summary.csv and sweep_summary.png into that folder and prints the
table. Runs that have not finished are listed with their state, never left out.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from train import run_dir
from train.errors import UsageError, report_usage_error

COLUMNS = ["run", "arch", "lr", "batch_size", "state", "epochs", "best_epoch", "best_val_f1_macro", "test_acc",
           "test_f1_macro", "wall_seconds"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def history(run: Path) -> list:
    try:
        return [json.loads(line) for line in (run / run_dir.METRICS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def run_row(run: Path) -> dict:
    config = {}
    if (run / run_dir.CONFIG).is_file():
        config = yaml.safe_load((run / run_dir.CONFIG).read_text()) or {}
    summary, records = _read_json(run / run_dir.SUMMARY), history(run)
    if summary:
        state = "finished"
    elif (run / run_dir.MARKER).exists():
        state = "preempted (requeued?)"
    elif records or (run / run_dir.CHECKPOINTS).is_dir():
        state = "running or failed"
    else:
        state = "not started"
    summary = summary or {}
    return {"run": run.name, "arch": config.get("arch", ""), "lr": config.get("lr", ""),
            "batch_size": config.get("batch_size", ""), "state": state, "epochs": len(records),
            "best_epoch": summary.get("best_epoch", ""), "best_val_f1_macro": summary.get("best_val_f1_macro", ""),
            "test_acc": summary.get("test_acc", ""), "test_f1_macro": summary.get("test_f1_macro", ""),
            "wall_seconds": summary.get("wall_seconds", "")}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.0f}"
    return str(value)


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        records = history(run)
        if records:
            ax.plot([r["epoch"] for r in records], [r["val_f1_macro"] for r in records], marker=".", label=run.name)
    ax.set(xlabel="epoch", ylabel="validation macro-F1", title=f"sweep {path.parent.name}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(folder: Path) -> list:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of runs")
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not runs:
        raise UsageError(f"{folder} holds no run folders")
    rows = [run_row(run) for run in runs]
    (folder / "sweep_summary.md").write_text(markdown(rows))
    with open(folder / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(runs, folder / "sweep_summary.png")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder, e.g. runs/sweep-12345")
    args = parser.parse_args(argv)
    try:
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
