"""Plots and a readable report.md for a finished run (the lab report, written by the program)."""

import sys
from pathlib import Path

import numpy as np

from train import run_dir
from train.metrics import one_class

PRECISION = {"no": "fp32"}  # Accelerate's name for no mixed precision


def pyplot():
    """matplotlib's pyplot, drawing to files: imported where plots are made, not by every process at start-up."""
    import matplotlib

    matplotlib.use("Agg")  # compute nodes have no display
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, ax, path: Path, legend_size=None) -> None:
    """A figure's finish: a light grid, a legend where there are lines, then written to `path` and closed."""
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_curves(path: Path, history: list, best_epoch: int) -> None:
    plt = pyplot()
    for name, keys, ylabel in ((run_dir.LOSS_PLOT, ("train_loss", "val_loss"), "loss"),
                               (run_dir.ACCURACY_PLOT, ("train_acc", "val_acc"), "accuracy")):
        fig = curve_figure(history, keys, ylabel, best_epoch)
        fig.savefig(path / name, dpi=100)
        plt.close(fig)


def curve_figure(history: list, keys: tuple, ylabel: str, best_epoch: int):
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for key in keys:
        ax.plot(epochs, [r[key] for r in history], marker="o", label=key.replace("_", " "))
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
    if len(epochs) == 1:  # matplotlib would span 0.96-1.04 around a lone point
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        ax.set_xticks(epochs)
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ylabel} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(path: Path, matrix: list, class_names: list) -> None:
    plt, cm = pyplot(), np.asarray(matrix)
    size = max(5, 0.6 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    if len(class_names) <= 20:
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path / run_dir.CONFUSION_PLOT, dpi=100)
    plt.close(fig)


# Options that mean something only in a sweep's trial, an --eval-only run, or a run that logged to W&B.
SWEEP_ONLY, EVAL_ONLY = ("sweep_dir", "trial_number"), ("eval_only", "checkpoint")
WANDB_DETAILS = ("wandb_project", "wandb_entity", "wandb_group", "run_name", "tags", "wandb_log_model")


def shown_options(run, data) -> dict:
    """The options as report.md shows them: what the run was set to and what it used, without the fields that
    mean nothing here (a sweep's outside a sweep, eval-only's in training, W&B's unset ones), `gpu_resident` only
    on a GPU, where it says whether the images were in GPU memory, and `wandb` the mode W&B actually ran in."""
    options, hidden = run.cfg.to_dict(), {"wandb_mode"}
    hidden.update(() if options["sweep_dir"] else SWEEP_ONLY)
    hidden.update(() if options["eval_only"] else EVAL_ONLY)
    options["wandb"] = wandb_used(run.tracker)
    hidden.update(name for name in WANDB_DETAILS if options["wandb"] == "off" or options[name] in ("", None))
    if run.accelerator.device.type == "cuda":
        options["gpu_resident"] = data.test.images.is_cuda  # False where they did not fit (the run warned)
    else:
        hidden.add("gpu_resident")
    return {name: value for name, value in options.items() if name not in hidden}


def wandb_used(tracker) -> str:
    """online, offline, or off: what W&B did for this run, whatever was asked (no credentials: offline)."""
    if not tracker.active:
        return "off" if tracker.run_id is None else "off (stopped after an error: see the run's warnings)"
    try:
        return "offline" if tracker.accelerator.get_tracker("wandb", unwrap=True).offline else "online"
    except Exception:  # W&B's own objects: never fatal for the report
        return "on"


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def write_report(path: Path, cfg: dict, summary: dict, history: list, data_note: dict) -> None:
    lines = [f"# {cfg['arch']} on {cfg['dataset']}", "", "| result | value |", "|---|---|"]
    if history:
        if summary.get("pruned_at_epoch"):
            lines += [f"| sweep trial | pruned at epoch {summary['pruned_at_epoch']} of {cfg['epochs']} |"]
        lines += [f"| best epoch (by validation macro-F1) | {summary['best_epoch']} of {len(history)} |",
                  f"| best validation macro-F1 | {summary['best_val_f1_macro']:.4f} |"]
    else:
        lines += [f"| evaluated weights | {cfg['checkpoint']} |"]
    lines += [f"| test accuracy | {_pct(summary['test_acc'])} |",
              f"| test macro-F1 | {summary['test_f1_macro']:.4f} |",
              f"| test loss | {summary['test_loss']:.4f} |",
              f"| test images | {summary['num_test_samples']} |",
              f"| run time | {_duration(summary['wall_seconds'])} |",
              f"| processes, precision | {summary['world_size']}, "
              f"{PRECISION.get(summary['mixed_precision'], summary['mixed_precision'])} |", ""]
    lines += _one_class_note(summary.get("predicted_one_class"))
    lines += _stalls(summary.get("stalls"))
    if history and summary.get("val_is_test"):
        lines += ["Test metrics use the weights of the best epoch, and validation was the test split "
                  "(--val-size 0): the test split chose that epoch, so these test numbers are optimistic.", ""]
    elif history:
        lines += ["Test metrics use the weights of the best epoch; validation picks that epoch, "
                  "so the test split is never used to choose.", ""]
    lines += ["## Data", "",
              f"- train: {data_note['train']} images", f"- validation: {data_note['val_source']}",
              f"- test: {data_note['test']} images", *_skipped(data_note.get("skipped")),
              f"- decoded: {data_note.get('decoded', '')}", "",
              "## Hyperparameters", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cfg.items()]
    lines += ["", "## Per-class test accuracy", "", "| class | accuracy | images |", "|---|---|---|"]
    support = np.asarray(summary["confusion_matrix"]).sum(axis=1)
    for (name, acc), n in zip(summary["test_per_class_accuracy"].items(), support):
        lines.append(f"| {name} | {_pct(acc)} | {int(n)} |")
    if history:
        lines += _epoch_log(history, summary["best_epoch"])
    figures = (["loss", "accuracy"] if history else []) + ["confusion_matrix"]
    lines += ["", "## Figures", ""] + [f"![{name.replace('_', ' ')}]({name}.png)\n" for name in figures]
    (path / run_dir.REPORT).write_text("\n".join(lines))


def _epoch_log(history: list, best_epoch: int) -> list:
    lines = ["", "## Per-epoch log", "",
             "| epoch | train loss | train acc | val loss | val acc | val macro-F1 | mean lr | seconds | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in history:
        mark = " **best**" if r["epoch"] == best_epoch else ""
        lines.append(f"| {r['epoch']}{mark} | {r['train_loss']:.4f} | {_pct(r['train_acc'])} | {r['val_loss']:.4f} "
                     f"| {_pct(r['val_acc'])} | {r['val_f1_macro']:.4f} | {r['lr']:.3g} | {r['epoch_seconds']:.1f} "
                     f"| {r['images_per_second']:.0f} |")
    return lines


def write_all(path: Path, cfg: dict, summary: dict, history: list, class_names: list, data_note: dict) -> None:
    if history:
        plot_curves(path, history, summary["best_epoch"])
    plot_confusion(path, summary["confusion_matrix"], class_names)
    write_report(path, cfg, summary, history, data_note)


# What usually gets a model that predicts one class to learn, for the warning and report.md.
ONE_CLASS_HELPS = ("more epochs; another --lr (lower if the loss rose or jumped, higher if it hardly moved); "
                   "--cifar-stem for 32 px inputs; a check that the labels match the images")


def flag_one_class(summary: dict, class_names: list) -> None:
    """Record in the summary whether the model predicted one class for nearly every test image (train/metrics.py
    says when), and warn on stderr. Main process only, as the summary."""
    found = summary["predicted_one_class"] = one_class(summary["confusion_matrix"], class_names)
    if found:
        print(f"warning: {_one_class_words(found)}, accuracy {_pct(summary['test_acc'])}, macro-F1 "
              f"{summary['test_f1_macro']:.3f}: it has not learnt to tell the classes apart\n"
              f"  usually helps: {ONE_CLASS_HELPS} (report.md says so too)", file=sys.stderr, flush=True)


def _one_class_words(found: dict) -> str:
    return (f"the model predicted \"{found['class']}\" for {found['predicted']} of the {found['images']} test images "
            f"({100 * found['share']:.1f} %)")


def _one_class_note(found) -> list:
    if not found:
        return []
    words = _one_class_words(found)
    return [f"**Warning: one class for nearly every test image.** {words[0].upper() + words[1:]}: it has "
            f"not learnt to tell the classes apart, whatever the numbers above look like. What usually helps: "
            f"{ONE_CLASS_HELPS}.", ""]


def _stalls(stalls) -> list:
    """Earlier attempts that ended in a stall (train/stall.py), and where."""
    if not stalls:
        return []
    lines = [f"**{len(stalls)} attempt{'s' if len(stalls) > 1 else ''} of this run ended in a stall** and "
             f"continued from the newest complete checkpoint (stall.json, stall-rank*.txt):", ""]
    return lines + [f"- {s['attempt']}: {s['line'].removeprefix('error: ')}" for s in stalls] + [""]


def _skipped(skipped) -> list:
    if not skipped or not any(skipped.values()):
        return []
    return ["- left out, undecodable (--skip-bad-images): " + ", ".join(f"{n} {split}" for split, n in skipped.items())]
