"""End to end: train/main.py as users run it, on generated parquet data."""

import json

import pytest
import yaml
from safetensors import safe_open

from conftest import FAST, check, main_in_process, read_metrics, read_summary, run_main
from train import run_dir
from train.process import native_bf16

pytestmark = pytest.mark.slow

EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1_macro", "lr", "epoch_seconds",
              "images_per_second", "train_images", "val_images"}
SUMMARY_KEYS = {"best_epoch", "best_val_f1_macro", "test_loss", "test_acc", "test_f1_macro", "test_per_class_accuracy",
                "confusion_matrix", "num_test_samples", "wall_seconds", "world_size", "mixed_precision"}


def test_single_process_run_leaves_a_complete_run_folder(trained_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "confusion_matrix.png",
                 "report.md", "model.safetensors"):
        assert (trained_run / name).is_file(), name
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["arch"] == "resnet18" and config["epochs"] == 3
    assert {"torch", "torchvision", "accelerate", "datasets", "world_size"} <= set(config["environment"])

    records = read_metrics(trained_run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(EPOCH_KEYS <= set(r) for r in records)
    assert all(r["train_images"] == 230 and r["val_images"] == 26 for r in records)

    summary = read_summary(trained_run)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["num_test_samples"] == 101
    assert summary["world_size"] == 1 and summary["mixed_precision"] == "no"
    best = max(records, key=lambda r: r["val_f1_macro"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_f1_macro"] == best["val_f1_macro"]
    assert summary["test_acc"] > 0.6, summary  # chance is 0.25
    # Accuracy and per-class accuracy come from one confusion matrix: the 10.31 % bug cannot recur.
    cm = summary["confusion_matrix"]
    assert sum(map(sum, cm)) == 101
    assert summary["test_acc"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / 101)

    with safe_open(str(trained_run / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and json.loads(meta["class_names"]) == ["red", "green", "blue", "yellow"]

    report = (trained_run / "report.md").read_text()
    assert "best epoch" in report and "| yellow |" in report and "![loss](loss.png)" in report
    assert summary["val_is_test"] is False and "the test split is never used to choose" in report


def test_report_says_when_validation_was_the_test_split(dataset_dir, tmp_path):
    out = tmp_path / "val0"
    check(main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--val-size", "0",
                    "--epochs", "1", "--limit-batches", "2"]))
    report = (out / "report.md").read_text()
    assert read_summary(out)["val_is_test"] is True and "never used to choose" not in report
    assert "validation was the test split (--val-size 0): the test split chose that epoch" in report


def test_config_yaml_of_a_run_reproduces_its_options(trained_run, tmp_path):
    from train.config import parse_config

    cfg = parse_config(["--config", str(trained_run / "config.yaml"), "--epochs", "7"])
    assert cfg.arch == "resnet18" and cfg.batch_size == 32 and cfg.epochs == 7


def test_existing_run_folder_is_not_overwritten(trained_run, dataset_dir):
    before = (trained_run / "summary.json").read_text()
    proc = main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(trained_run), *FAST])
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (trained_run / "summary.json").read_text() == before


def test_eval_only_reproduces_the_final_test_metrics(trained_run, dataset_dir, tmp_path):
    out = tmp_path / "eval"
    check(main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint", str(trained_run),
                           "--output-dir", str(out)]))
    trained, evaluated = read_summary(trained_run), read_summary(out)
    for key in ("test_acc", "test_f1_macro", "test_per_class_accuracy", "confusion_matrix", "num_test_samples"):
        assert evaluated[key] == trained[key], key
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert (out / "confusion_matrix.png").is_file() and "| red |" in report
    assert "| eval_only | True |" in report and f"| checkpoint | {trained_run} |" in report  # shown where they apply


@pytest.mark.ddp
def test_ddp_counts_every_test_image_once_and_matches_single_process_eval(ddp_run, dataset_dir, tmp_path):
    out = ddp_run  # 27 validation images (odd: one rank's last batch is padded with a repeat), 229 training images
    for record in read_metrics(out):
        assert record["val_images"] == 27  # the repeat is dropped
        assert record["val_acc"] * 27 == pytest.approx(round(record["val_acc"] * 27))
        # Train totals are summed over both processes (rank 0's share alone would be 128), each image once:
        # each rank trains on 4 batches of 32, Accelerate completing the last round with 27 images from the
        # start of the shuffled order, which are trained on but not counted again.
        assert record["train_images"] == 229
        assert record["train_acc"] * 229 == pytest.approx(round(record["train_acc"] * 229))
    summary = read_summary(out)
    assert summary["world_size"] == 2
    assert summary["num_test_samples"] == 101  # odd: the sampler pads one rank with a repeat
    assert sum(map(sum, summary["confusion_matrix"])) == 101
    assert summary["test_acc"] > 0.6

    single = tmp_path / "single-eval"
    check(main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint",
                           str(out / "model.safetensors"), "--output-dir", str(single)]))
    reference = read_summary(single)
    for key in ("test_acc", "test_f1_macro", "test_per_class_accuracy", "confusion_matrix", "num_test_samples"):
        assert summary[key] == reference[key], key
    assert summary["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-4)


@pytest.mark.ddp
def test_shipped_accelerate_config_trains_with_bf16_and_ddp_on_cpu(dataset_dir, tmp_path):
    out = tmp_path / "bf16"
    # bf16 is emulated on CPUs without AVX-512 BF16 or AMX, 21x slower than fp32 on an AVX2 EPYC: 96 images, in
    # batches of 8 (12 steps of 2 processes), learn within 2 epochs at a tenth of the full set's cost.
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--epochs", "2",
                           "--train-images", "96", "--batch-size", "8"],
                          processes=2, launch_args=["--config_file", "accelerate_config.yaml"]))
    assert "Grad strides do not match" not in proc.stderr  # DDP's note on 1x1 convolutions: silenced
    assert ("bf16 is emulated here" in proc.stderr) == (not native_bf16())
    summary, epochs = read_summary(out), read_metrics(out)
    assert summary["mixed_precision"] == "bf16" and summary["world_size"] == 2
    # It learns: the training loss falls and its accuracy is far above chance (0.25); on held-out images after 12
    # steps, where BatchNorm's running statistics still lag, more loosely.
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] and epochs[1]["train_acc"] > 0.6, epochs
    assert summary["test_acc"] > 0.4


def test_smoke_limits_stop_early(dataset_dir, tmp_path):
    out = tmp_path / "smoke"
    proc = check(main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--max-steps", "3",
                                  "--limit-batches", "2", "--eval-batch-size", "16", "--log-every", "1"]))
    # Not a terminal (as in a Slurm log): plain lines every --log-every steps, no progress-bar frames.
    assert "\r" not in proc.stdout + proc.stderr
    progress = [line.split(":")[0] for line in proc.stdout.splitlines()
                if line.startswith("epoch") and " step " in line]
    assert progress == ["epoch 1/3 step 1", "epoch 1/3 step 2", "epoch 2/3 step 3"]
    summary = read_summary(out)
    assert summary["steps"] == 3 and summary["epochs_trained"] == 2  # 2 batches an epoch: epoch 2 stops at step 3
    assert summary["num_test_samples"] == 2 * 16
    assert len(read_metrics(out)) == 2


def test_a_compiled_model_is_saved_with_the_keys_an_eager_one_loads(parts_for, tmp_path):
    """torch.compile wraps the prepared model (every key gains `_orig_mod.`); a run saves the module inside, whose keys
    an eager model loads. Compiling is lazy: nothing compiles here. A compiled run trains end to end with inductor in
    test_eval_any_run (under DDP, where the wrappers nest), and test_loop counts the graphs dynamo makes."""
    from safetensors.torch import load_file

    from train.model_files import cpu_state_dict, save_model
    from train.models import ModelSpec, build_model, plain_model

    cfg, parts = parts_for(compile=True)
    assert all(key.startswith("_orig_mod.") for key in parts.model.state_dict())
    save_model(cpu_state_dict(plain_model(parts.accelerator, parts.model)), tmp_path / "model.safetensors",
               ModelSpec.from_config(cfg, parts.class_names))
    eager = build_model("resnet18", len(parts.class_names))
    eager.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict: every key, no prefix
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:  # what a later reader checks
        assert f.metadata()["format_version"] == str(run_dir.FORMAT_VERSION)
