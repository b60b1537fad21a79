"""Weights & Biases through Accelerate's tracker API, which must never take a run down.

One W&B run per training run (Accelerate starts it on the main process only). Every
W&B failure becomes one warning: at init the run falls back to offline mode, and a
failure while logging turns W&B off for the rest of the run. The run folder has every
metric either way. Where W&B is disabled, wandb is never imported.
"""

import importlib.util
import json
import netrc
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlparse

from train.errors import first_line
from train.files import dumps

STATE_FILE = "wandb.json"  # the run id: a resumed or requeued run continues the same W&B run
DEFAULT_PROJECT = "cifar-accelerate"
SECRET_WORDS = ("key", "token", "secret", "password")


def wanted(cfg) -> bool:
    mode = cfg.wandb_mode or os.environ.get("WANDB_MODE", "")
    if not cfg.wandb or mode == "disabled":
        return False
    if importlib.util.find_spec("wandb") is None:
        _warn("wandb is not installed (pip install wandb): metrics go to the run folder only")
        return False
    return True


def _warn(message: str) -> None:
    print(f"warning: W&B: {message}", file=sys.stderr, flush=True)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_run_name(cfg) -> str:
    name = f"{cfg.arch}-lr{cfg.lr:g}-bs{cfg.batch_size}"
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{name}-job{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"{name}-job{os.environ['SLURM_JOB_ID']}"
    return name


def default_group(cfg) -> str:
    if cfg.wandb_group:
        return cfg.wandb_group
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"sweep-{array}" if array else ""


def public_config(config: dict) -> dict:
    """The config as logged: nothing that looks like a secret."""
    return {k: v for k, v in config.items() if not any(word in k.lower() for word in SECRET_WORDS)}


def epoch_values(record: dict) -> dict:
    """A metrics.jsonl record as W&B keys (per-step train/loss is a running mean; these are epoch means)."""
    values = {"epoch": record["epoch"], "train/epoch_loss": record["train_loss"],
              "train/epoch_acc": record["train_acc"], "val/loss": record["val_loss"], "val/acc": record["val_acc"],
              "val/f1_macro": record["val_f1_macro"], "epoch_seconds": record["epoch_seconds"]}
    values.update({f"val/acc_{name}": acc for name, acc in record["val_per_class_accuracy"].items()})
    return values


class Tracker:
    """Start, log to and finish the W&B run; every method is safe to call on any rank, W&B on or off."""

    def __init__(self, accelerator, cfg, out: Path, enabled: bool):
        self.accelerator, self.cfg, self.out = accelerator, cfg, Path(out)
        self.active = enabled and accelerator.is_main_process
        self.run_id, self.first_step, self.last_step = None, 0, 0

    def start(self, config: dict) -> None:
        if not self.active:
            return
        mode = self.cfg.wandb_mode or os.environ.get("WANDB_MODE") or None
        silent = mode in (None, "online") and not _has_credentials()  # not asked for, and nowhere to send it
        if silent:
            _warn("no API key (wandb login, or WANDB_API_KEY): logging offline, quietly; upload later with "
                  f"`wandb sync {self._wandb_dir()}/wandb/offline-run-*`, or --no-wandb to turn W&B off")
            mode = "offline"
        try:
            self._init(config, mode, silent)
        except Exception as e:  # network, auth, bad settings: W&B is optional
            _warn(f"could not start the run ({first_line(e)}); trying offline mode")
            try:
                self._init(config, "offline", silent)
            except Exception as e2:
                _warn(f"offline mode failed too ({first_line(e2)}); continuing without W&B")
                self.active = False

    def _wandb_dir(self) -> str:
        return os.environ.get("WANDB_DIR") or str(self.out)

    def _init(self, config: dict, mode, silent: bool) -> None:
        import wandb

        saved = json.loads((self.out / STATE_FILE).read_text()) if (self.out / STATE_FILE).is_file() else {}
        self.run_id = saved.get("id") or secrets.token_hex(4)
        (self.out / STATE_FILE).write_text(dumps({"id": self.run_id}) + "\n")
        init = {"name": self.cfg.run_name or default_run_name(self.cfg), "entity": self.cfg.wandb_entity or None,
                "group": default_group(self.cfg) or None, "id": self.run_id, "resume": "allow", "mode": mode,
                "tags": [t for t in self.cfg.tags.split(",") if t] or None, "dir": self._wandb_dir(),
                "settings": wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 60)),
                                           silent=silent)}
        Path(init["dir"]).mkdir(parents=True, exist_ok=True)  # a WANDB_DIR yet to be made: W&B would only warn
        project = self.cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.accelerator.trackers = []  # a failed first attempt may have left a half-made tracker
        self.accelerator.init_trackers(project, config=public_config(config), init_kwargs={"wandb": init})
        # W&B refuses steps below those it already has; a resumed run redoes a few (with the same values).
        self.first_step = self.accelerator.get_tracker("wandb", unwrap=True).step or 0

    def log(self, values: dict, step: int) -> None:
        """Log at optimizer step `step`; steps W&B already has from before a resume are skipped."""
        if not self.active or step < self.first_step:
            return
        try:
            self.accelerator.log(values, step=step)
            self.last_step = step
        except Exception as e:
            _warn(f"logging failed ({first_line(e)}); W&B is off for the rest of this run")
            self.active = False

    def log_final(self, summary: dict, class_names: list) -> None:
        """Test metrics, per-class table, confusion matrix and curves: into the run summary and last step."""
        if not self.active:
            return
        try:
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            per_class = summary["test_per_class_accuracy"]
            final = {"test/loss": summary["test_loss"], "test/acc": summary["test_acc"],
                     "test/f1_macro": summary["test_f1_macro"], "best_epoch": summary["best_epoch"],
                     "best_val_f1_macro": summary["best_val_f1_macro"], "wall_seconds": summary["wall_seconds"],
                     **{f"test/acc_{name}": value for name, value in per_class.items()}}
            run.summary.update(final)
            table = wandb.Table(columns=["class", "test accuracy", "test images"],
                                data=[[n, per_class[n], sum(row)] for n, row in
                                      zip(class_names, summary["confusion_matrix"])])
            images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(self.out.glob("*.png"))}
            y_true, preds = _pairs(summary["confusion_matrix"])  # W&B's chart, filterable by class
            chart = wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=list(class_names),
                                                title="test confusion matrix")
            run.log({"test/per_class": table, "test/confusion_matrix": chart, **images},
                    step=max(self.first_step, self.last_step))
        except Exception as e:
            _warn(f"final logging failed ({first_line(e)}); the run folder has every result")

    def log_model(self, files: list, epoch: int, metadata: dict) -> None:
        """A version of the run's model artifact (`model-<run id>`, type model) holding the weights of `epoch`,
        aliased best, latest and epoch-N, as --wandb-log-model asks: staged in an offline run, uploaded by
        `wandb sync`. A failure is one warning; the run goes on."""
        if not self.active:
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=metadata)
            for path in files:
                if Path(path).is_file():
                    artifact.add_file(str(path), name=Path(path).name)
            self.accelerator.get_tracker("wandb", unwrap=True).log_artifact(
                artifact, aliases=["best", "latest", f"epoch-{epoch}"])
        except Exception as e:
            _warn(f"logging the model artifact failed ({first_line(e)}); the run goes on, the run folder has "
                  "the model")

    def add_tag(self, tag: str) -> None:
        """Tag the W&B run (a sweep's pruned trial, a stalled run), once; a failure is a warning, as for all W&B
        errors."""
        if not self.active:
            return
        try:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.tags = tuple(dict.fromkeys((*(run.tags or ()), tag)))
        except Exception as e:
            _warn(f"tagging the run failed ({first_line(e)})")

    def note_stalls(self, stalls: list) -> None:
        """Attempts of this run that ended in a stall (train/stall.py): the W&B run tagged `stalled`, and each
        stall's line in its summary (`stalls`). Called as the next attempt starts, and as an attempt stalls."""
        if not self.active or not stalls:
            return
        self.add_tag("stalled")
        try:
            self.accelerator.get_tracker("wandb", unwrap=True).summary["stalls"] = [s["line"] for s in stalls]
        except Exception as e:
            _warn(f"noting the stall failed ({first_line(e)})")

    def finish(self) -> None:
        """Close the W&B run. Only that: the caller ends the process group (the other half of Accelerate's
        end_training), on every rank, W&B on or off."""
        if self.active:
            try:
                for tracker in self.accelerator.trackers:
                    tracker.finish()
            except Exception as e:
                _warn(f"closing the run failed ({first_line(e)})")


def _pairs(matrix: list) -> tuple:
    """(true classes, predicted classes), one pair per test image, from a confusion matrix of counts."""
    y_true, preds = [], []
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            y_true += [i] * int(count)
            preds += [j] * int(count)
    return y_true, preds

