"""Presets in configs/, test-time augmentation, and the run comparison tool."""

import shutil

import pytest
import torch
import yaml

from conftest import (FAST, ROOT, assert_resumed, assert_same_run, call, check, main_in_process, once, read_summary,
                      resume_args, run_main)

pytestmark = pytest.mark.slow
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("sweep-"))


def test_every_shipped_preset_is_tested():
    # Written out, not globbed: a preset added to (or dropped from) configs/ fails here until it is listed.
    known = ["cifar-mobilenet_v2", "cifar-mobilenet_v3", "cifar-resnet18", "cpu-smoke", "seed-mobilenet_v2",
             "seed-mobilenet_v3"]
    assert PRESETS == known  # configs/sweep-*.yaml are sweep files: tests/test_sweep.py checks them
    (parametrize,) = [m for m in test_preset_loads_and_trains_a_few_steps.pytestmark if m.name == "parametrize"]
    assert sorted(parametrize.args[1]) == known  # and each one is trained by the preset test


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_trains_a_few_steps(preset, dataset_dir, tmp_path):
    out = tmp_path / preset
    # The command line overrides the preset: no ImageNet download, sizes for 256 generated images.
    check(main_in_process(["--config", str(ROOT / "configs" / f"{preset}.yaml"), "--dataset", str(dataset_dir),
                           "--output-dir", str(out), "--no-pretrained", "--val-images", "0", "--train-images", "0",
                           "--batch-size", "16", "--eval-batch-size", "16", "--max-steps", "2", "--limit-batches",
                           "2"]))
    preset_options = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("arch", "lr", "image_size", "optimizer", "scheduler", "cifar_stem", "epochs"):
        if key in preset_options:
            assert resolved[key] == preset_options[key], key
    assert resolved["pretrained"] is False and read_summary(out)["steps"] == 2


def test_tta_is_reported_beside_the_plain_metrics(trained_run, dataset_dir, tmp_path):
    out = tmp_path / "tta"
    check(main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint", str(trained_run), "--tta",
                           "--output-dir", str(out)]))
    got, plain = read_summary(out), read_summary(trained_run)
    assert got["test_acc"] == plain["test_acc"] and got["test_f1_macro"] == plain["test_f1_macro"]
    assert 0.5 < got["test_acc_tta"] <= 1 and 0 < got["test_f1_macro_tta"] <= 1


def test_compare_renders_a_table_and_curves(trained_run, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints"))
    proc = call("train.compare", trained_run, other, "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert f"| {trained_run.name} | resnet18 |" in table and "| other-run | resnet18 |" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 5000
    bad = call("train.compare", tmp_path)
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr

    runs = tmp_path / "runs"  # without --out: beside the runs, never in the folder it was started from
    for name in ("a", "b"):
        shutil.copytree(trained_run, runs / name, ignore=shutil.ignore_patterns("checkpoints"))
    proc = call("train.compare", runs / "a", runs / "b")
    assert proc.returncode == 0 and (runs / "comparison.md").is_file() and not (ROOT / "comparison.md").exists()


RECIPE = ["--ema-decay", "0.9", "--auto-augment", "autoaugment", "--random-erasing", "0.25", "--mixup-alpha", "0.2",
          "--cutmix-alpha", "1.0", "--tta"]


@pytest.fixture(scope="session")
def ema_run(dataset_dir, tmp_path_factory):
    """Built once for both pytest-xdist workers (its tests may run on either)."""
    return once(tmp_path_factory, "ema", lambda folder: check(main_in_process(
        [*resume_args(dataset_dir, folder / "run"), *RECIPE, "--keep-checkpoints", "10"]))) / "run"


def test_ema_weights_are_the_ones_validated_tested_and_saved(ema_run):
    from safetensors.torch import load_file

    best = read_summary(ema_run)["best_epoch"]
    checkpoint = next((ema_run / "checkpoints").glob(f"e{best:04d}-b000000-*"))
    saved, ema, raw = (load_file(str(p)) for p in (ema_run / "model.safetensors", checkpoint / "ema.safetensors",
                                                    checkpoint / "model.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("weight"))


def test_recipe_features_resume_exactly(dataset_dir, ema_run, tmp_path):
    out = tmp_path / "run"
    killed = run_main([*resume_args(dataset_dir, out), *RECIPE, "--keep-checkpoints", "10"],
                      env={"CIFAR_ACCELERATE_FAILPOINT": "kill_after_step:13"})
    assert killed.returncode != 0
    resumed = check(main_in_process([*resume_args(dataset_dir, out), *RECIPE, "--keep-checkpoints", "10"]))
    assert assert_resumed(resumed, 24)[0] == "e0001-b000004-step00000012"  # continued, with EMA and MixUp state
    assert_same_run(out, ema_run)


@pytest.mark.ddp
def test_recipe_features_under_ddp(dataset_dir, tmp_path):
    out = tmp_path / "ddp"
    check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, *RECIPE], processes=2))
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["num_test_samples"] == 101
    assert {"test_acc_tta", "test_f1_macro_tta"} <= set(summary)
