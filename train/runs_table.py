"""One row per run folder (its options, state and results) and the markdown table of rows: what
train.compare and train.sweep_summary both print."""

from pathlib import Path

from train import run_dir

COLUMNS = ["run", "arch", "lr", "batch_size", "state", "epochs", "best_epoch", "best_val_f1_macro", "test_acc",
           "test_f1_macro", "wall_seconds"]


def history(run: Path) -> list:
    """A run's per-epoch records, [] where it has none yet (or they are unreadable)."""
    try:
        return run_dir.read_metrics(run)
    except (OSError, ValueError):
        return []


def run_row(run: Path) -> dict:
    """A run folder as one row: its options, how far it got, its results."""
    config, summary, records = run_dir.read_config(run), run_dir.read_summary(run), history(run)
    if summary:
        state = "finished"
    elif (run / run_dir.MARKER).exists():
        state = "preempted (requeued?)"
    elif (run / run_dir.STALL_MARKER).exists():
        state = "stalled (requeued?)"
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


def markdown(rows: list, columns: list = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
