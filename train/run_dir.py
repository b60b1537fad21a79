"""The run folder: resolved config, per-epoch metrics, summary. Written by the main process only."""

import json
import os
import platform
from datetime import datetime
from pathlib import Path

import yaml

from train.errors import UsageError
from train.files import atomic_write, dumps

# The run folder's file names, used by every module that reads or writes one (slurm/common.sh repeats
# PREEMPTED and STALLED; tests/test_slurm_scripts.py checks them).
CONFIG, METRICS, SUMMARY, MODEL = "config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"
REPORT = "report.md"
LOSS_PLOT, ACCURACY_PLOT, CONFUSION_PLOT = "loss.png", "accuracy.png", "confusion_matrix.png"
FIGURES = (LOSS_PLOT, ACCURACY_PLOT, CONFUSION_PLOT)
CHECKPOINTS, MARKER = "checkpoints", "PREEMPTED"
STALL_MARKER, STALL_REPORT = "STALLED", "stall.json"  # train/stall.py
# The version of the records the code reads back: a model file's metadata and a checkpoint's trainer_state.json
# carry it as "format_version". Records without it are format 1; the branches that read them say "format 1", and
# can go once no format-1 run needs to be read.
FORMAT_VERSION = 2


def default_output_dir(arch: str) -> str:
    return str(Path("runs") / f"{arch}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def refuse_to_overwrite(path: Path) -> None:
    """A finished or started run is the user's work: never write over it silently."""
    for name in (CONFIG, METRICS, SUMMARY, MODEL):
        if (path / name).exists():
            raise UsageError(f"{path} already holds a run ({name}); choose another --output-dir")


def environment(world_size: int, mixed_precision: str) -> dict:
    import accelerate
    import datasets
    import torch
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "python": platform.python_version(), "world_size": world_size,
            "mixed_precision": mixed_precision,
            # what the main process was given: a Slurm step that lost its --cpus-per-task shows here
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}


def write_config(path: Path, config: dict, env: dict) -> None:
    # `environment` is informative; --config ignores it, so the file can be fed back as is.
    text = yaml.safe_dump(config, sort_keys=False) + yaml.safe_dump({"environment": env}, sort_keys=False)
    (path / CONFIG).write_text(text)


def read_config(path: Path) -> dict:
    """The options a run was started with (config.yaml; its `environment` too), or {} if it has none."""
    file = path / CONFIG
    return (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}


def read_summary(path: Path) -> dict | None:
    """summary.json of a finished run, or None (not finished, or unreadable)."""
    try:
        return json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def write_metrics(path: Path, history: list) -> None:
    """Rewrite metrics.jsonl from a (resumed) history, so a redone epoch never appears twice."""
    atomic_write(path / METRICS, lambda tmp: tmp.write_text("".join(dumps(r) + "\n" for r in history)))


def read_metrics(path: Path) -> list:
    """The per-epoch records of metrics.jsonl, oldest first."""
    return [json.loads(line) for line in (path / METRICS).read_text().splitlines() if line.strip()]


def append_metrics(path: Path, record: dict) -> None:
    with open(path / METRICS, "a") as f:
        f.write(dumps(record) + "\n")


def write_summary(path: Path, summary: dict) -> None:
    (path / SUMMARY).write_text(dumps(summary, indent=2) + "\n")
