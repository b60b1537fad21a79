"""What a run tells its user: a model that predicts one class is called out, report.md shows the options that were
set and what was used, the per-epoch learning rate the epoch trained with, and plots a one-epoch run can read."""

import re

import pytest

from conftest import check, main_in_process, read_metrics, read_summary
from train.report import curve_figure

# Options the report leaves out of a one-process CPU run without W&B, outside a sweep and eval-only.
NOT_SHOWN = ("gpu_resident", "sweep_dir", "trial_number", "wandb_mode", "wandb_project", "eval_only", "checkpoint")


def option_rows(report: str) -> dict:
    """{option: value} of report.md's Hyperparameters table."""
    table = report.split("## Hyperparameters", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| (\w+) \| (.*) \|$", table, re.M))


@pytest.mark.slow
def test_a_model_that_predicts_one_class_is_called_out(dataset_dir, tmp_path):
    """The lab's smoke run in small: MobileNetV2 from scratch at 32 px, one step at a rate too small to move it,
    predicts one class for every test image; the run says so on stderr, in summary.json and in report.md."""
    out = tmp_path / "one-class"
    proc = check(main_in_process(["--dataset", dataset_dir, "--output-dir", out, "--arch", "mobilenet_v2",
                                  "--batch-size", "32", "--eval-batch-size", "64", "--lr", "1e-9", "--epochs", "1",
                                  "--max-steps", "1"]))
    warned = re.search(r'^warning: the model predicted "(\w+)" for (\d+) of the 101 test images \(\d+\.\d %\), '
                       r'accuracy .*: it has not learnt to tell the classes apart\n  usually helps: more epochs; '
                       r'.*--cifar-stem for 32 px inputs.*\n', proc.stderr, re.M)
    assert warned, proc.stderr[-3000:]
    assert len([line for line in proc.stderr.splitlines() if "predicted" in line or "usually helps" in line]) == 2
    found = read_summary(out)["predicted_one_class"]
    assert found["class"] == warned.group(1) and found["predicted"] == int(warned.group(2)) >= 91
    assert found["images"] == 101 and found["share"] >= 0.9
    report = (out / "report.md").read_text()
    assert f'**Warning: one class for nearly every test image.** The model predicted "{found["class"]}"' in report
    assert "What usually helps: more epochs; another --lr" in report and "--cifar-stem for 32 px inputs" in report
    # One epoch of one step at 1e-9: the table shows the rate that step trained with, not the schedule's next one.
    assert read_metrics(out)[0]["lr"] == pytest.approx(1e-9)
    assert re.search(r"^\| 1 \*\*best\*\* \| .* \| 1e-09 \| [\d.]+ \| \d+ \|$", report, re.M), report
    rows = option_rows(report)
    assert rows["arch"] == "mobilenet_v2" and rows["lr"] == "1e-09" and rows["wandb"] == "off"
    assert not set(NOT_SHOWN) & set(rows), rows
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()


@pytest.mark.slow
def test_a_run_that_learnt_shows_no_warning_and_each_epochs_own_rate(trained_run):
    from train.config import Config
    from train.optim import lr_factor

    summary, report = read_summary(trained_run), (trained_run / "report.md").read_text()
    assert summary["predicted_one_class"] is None and "Warning" not in report
    # 8 steps an epoch, cosine over 24 from 0.02: each epoch's mean rate; the last is not the 0 it ends at.
    cfg = Config(epochs=3, lr=0.02)
    means = [0.02 * sum(lr_factor(cfg, k, 8) for k in range(8 * e, 8 * e + 8)) / 8 for e in range(3)]
    assert [r["lr"] for r in read_metrics(trained_run)] == pytest.approx(means)
    assert means[2] > 0.001
    for epoch, lr in enumerate(means, 1):
        assert re.search(rf"^\| {epoch}( \*\*best\*\*)? \| .* \| {lr:.3g} \| [\d.]+ \| \d+ \|$", report, re.M)
    assert "| mean lr |" in report and "| processes, precision | 1, fp32 |" in report  # Accelerate's "no"
    rows = option_rows(report)
    assert rows["epochs"] == "3" and rows["wandb"] == "off" and not set(NOT_SHOWN) & set(rows), rows


@pytest.mark.slow
@pytest.mark.ddp
def test_the_report_names_the_wandb_mode_a_run_used(ddp_run):
    rows = option_rows((ddp_run / "report.md").read_text())
    assert rows["wandb"] == "offline" and "wandb_mode" not in rows and "wandb_project" not in rows


def test_a_one_epoch_plot_spans_that_epoch_with_whole_ticks():
    def record(epoch):
        return {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.2}

    ax = curve_figure([record(1)], ("train_loss", "val_loss"), "loss", 1).axes[0]
    assert ax.get_xlim() == (0.5, 1.5) and list(ax.get_xticks()) == [1]  # not 0.96-1.04
    ax = curve_figure([record(e) for e in (1, 2, 3)], ("train_loss", "val_loss"), "loss", 2).axes[0]
    low, high = ax.get_xlim()
    assert [t for t in ax.get_xticks() if low <= t <= high] == [1, 2, 3]
