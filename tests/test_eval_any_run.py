"""Eval-only of any run rebuilds the run's own model from what the run recorded, and reproduces its test metrics.

Also: weights saved under DDP + torch.compile carry plain keys, and files of older runs (prefixed keys,
metadata with only arch and class names) still load.
"""

import json
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FAST, check, main_in_process, once, read_summary, run_main
from train.model_files import load_model
from train.models import ModelSpec

SHORT = [*FAST, "--epochs", "2", "--limit-batches", "3"]
EXACT = ("test_acc", "test_f1_macro", "test_per_class_accuracy", "confusion_matrix", "num_test_samples")


def evaluate_again(dataset_dir, model_path, out, *extra):
    """--eval-only with nothing but the model: every setting must come from the model's own record."""
    return main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint", str(model_path),
                            "--output-dir", str(out), *extra])


def assert_reproduced(run, evaluated, loss_rel=1e-5):
    trained, again = read_summary(run), read_summary(evaluated)
    for key in EXACT:
        assert again[key] == trained[key], key
    # The loss tells a network with other strides or another input size apart even at chance accuracy.
    assert again["test_loss"] == pytest.approx(trained["test_loss"], rel=loss_rel)


@pytest.fixture(scope="session")
def stem_run(dataset_dir, tmp_path_factory):
    """A CIFAR-stem MobileNet: built with other strides, the same weights load without complaint. Built once for
    both pytest-xdist workers (its tests may run on either)."""
    return once(tmp_path_factory, "stem", lambda folder: check(main_in_process(
        ["--dataset", str(dataset_dir), "--output-dir", str(folder / "run"), *SHORT, "--arch", "mobilenet_v3_small",
         "--cifar-stem"]))) / "run"


@pytest.mark.slow
def test_cifar_stem_run_is_evaluated_with_its_stem(stem_run, dataset_dir, tmp_path):
    check(evaluate_again(dataset_dir, stem_run, tmp_path / "eval"))
    assert_reproduced(stem_run, tmp_path / "eval")
    with safe_open(str(stem_run / "model.safetensors"), framework="pt") as f:
        spec = ModelSpec.from_metadata(f.metadata())
    assert spec.arch == "mobilenet_v3_small" and spec.cifar_stem and spec.image_size == 32
    assert spec.class_names == ("red", "green", "blue", "yellow") and len(spec.mean) == len(spec.std) == 3


@pytest.mark.slow
def test_cifar_stem_resnet_from_a_checkpoint_folder(dataset_dir, tmp_path):
    run = tmp_path / "run"
    check(main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(run), *SHORT, "--epochs", "1",
                           "--cifar-stem"]))
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["cifar_stem"] is True
    check(evaluate_again(dataset_dir, checkpoint, tmp_path / "eval"))  # the checkpoint's weights are the best


@pytest.mark.slow
def test_run_at_another_image_size_is_evaluated_at_that_size(dataset_dir, tmp_path):
    run = tmp_path / "run"
    check(main_in_process(["--dataset", str(dataset_dir), "--output-dir", str(run), *SHORT, "--image-size", "48"]))
    check(evaluate_again(dataset_dir, run, tmp_path / "eval"))
    assert_reproduced(run, tmp_path / "eval")
    assert "image_size: 48" in (tmp_path / "eval" / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ema_run_is_reproduced_by_a_single_process_eval(dataset_dir, tmp_path):
    run = tmp_path / "run"
    check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(run), *SHORT, "--ema-decay", "0.9"],
                   processes=2))
    check(evaluate_again(dataset_dir, run, tmp_path / "eval"))
    assert_reproduced(run, tmp_path / "eval", loss_rel=1e-4)  # other batch composition: last bits may differ


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [("--image-size", "64"), ("--arch", "resnet18"), ("--no-cifar-stem", None)])
def test_an_option_that_contradicts_the_model_is_one_line(stem_run, dataset_dir, tmp_path, option, value):
    proc = evaluate_again(dataset_dir, stem_run, tmp_path / "eval", *[a for a in (option, value) if a])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "contradicts" in lines[0] and str(stem_run) in lines[0]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_with_compile_saves_plain_keys_everywhere(dataset_dir, tmp_path):
    run = tmp_path / "run"
    # Few input shapes, few graphs to compile: validation on the test split, each rank's half in one batch.
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(run), *SHORT, "--epochs", "1",
                           "--compile", "--ema-decay", "0.9", "--val-size", "0", "--eval-batch-size", "128"],
                          processes=2, env={"TORCH_LOGS": "ddp"}))
    # Compiled outside DDP, dynamo's DDPOptimizer splits the graph at DDP's buckets (ResNet-18's 45 MB of
    # gradients make several) so that their all-reduces overlap the backward; compiled inside, it never runs.
    buckets = [int(n) for n in re.findall(r"DDPOptimizer used bucket cap \d+ and created (\d+) buckets", proc.stderr)]
    assert buckets and min(buckets) >= 2, proc.stderr[-3000:]
    (checkpoint,) = (run / "checkpoints").iterdir()
    for path in (run / "model.safetensors", checkpoint / "best.safetensors", checkpoint / "ema.safetensors"):
        keys = load_file(str(path)).keys()
        assert "conv1.weight" in keys and not [k for k in keys if k.startswith(("_orig_mod.", "module."))], path
    check(evaluate_again(dataset_dir, run, tmp_path / "eval"))
    trained, again = read_summary(run), read_summary(tmp_path / "eval")
    assert again["num_test_samples"] == trained["num_test_samples"] == 101
    # Compiled and eager kernels round differently; a prediction may flip only at a near-tie.
    assert abs(again["test_acc"] - trained["test_acc"]) <= 1 / 101


def test_files_of_older_runs_still_load(tmp_path):
    """Keys prefixed by DDP/torch.compile and metadata with only arch and class names, as older runs wrote."""
    from train.models import build_model

    weights = {f"_orig_mod.{k}": v.contiguous() for k, v in build_model("resnet18", 4).state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path), metadata={"arch": "resnet18", "class_names": json.dumps(list("abcd")),
                                            "format": "pt"})
    state_dict, spec, unrecorded = load_model(path)
    assert "conv1.weight" in state_dict and not [k for k in state_dict if "_orig_mod" in k]
    assert spec == ModelSpec("resnet18", tuple("abcd"))  # 32 px, ImageNet stem: what older runs trained
    assert unrecorded == {"cifar_stem", "image_size", "mean", "std", "decode_size"}
