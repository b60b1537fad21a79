"""Compare runs side by side: one markdown table and overlaid loss, accuracy and macro-F1 curves.

    python -m train.compare runs/seed-v2 runs/seed-v3 [--out comparison]

Writes comparison.md and comparison.png into --out (default: the folder holding the runs) and prints the
table — the original lab report's V2-versus-V3 comparison, generated.
"""

import argparse
import os
import sys
from pathlib import Path

from train import run_dir
from train.errors import UsageError, report_usage_error
from train.report import pyplot
from train.runs_table import history, markdown, run_row

PANELS = (("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc"), ("macro-F1", None, "val_f1_macro"))


def plot(runs: list, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (title, train_key, val_key) in zip(axes, PANELS):
        for i, run in enumerate(runs):
            records = history(run)
            epochs = [r["epoch"] for r in records]
            colour = f"C{i}"
            ax.plot(epochs, [r[val_key] for r in records], color=colour, marker=".", label=f"{run.name} val")
            if train_key:
                ax.plot(epochs, [r[train_key] for r in records], color=colour, linestyle="--",
                        label=f"{run.name} train")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(runs: list, out: Path) -> str:
    for run in runs:
        if not (run / run_dir.METRICS).is_file():
            raise UsageError(f"{run} is not a run folder (no metrics.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown([run_row(run) for run in runs])
    (out / "comparison.md").write_text(f"# Comparison\n\n{table}\n![curves](comparison.png)\n")
    plot(runs, out / "comparison.png")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for comparison.md and .png (default: the folder the runs are in)")
    args = parser.parse_args(argv)
    # Next to the runs, not the current folder: run from the project, that would be the source tree.
    args.out = args.out or Path(os.path.commonpath([run.resolve().parent for run in args.runs]))
    try:
        table = compare(args.runs, args.out)
    except UsageError as e:
        return report_usage_error(e)
    print(table, end="")
    print(f"\nwritten: {args.out / 'comparison.md'}, {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
