"""Share a model the Hub's way: `train.export --hub` writes a model folder whose card huggingface_hub itself
parses, `--push-to-hub` without network is one line, and the folder, hf://REPO_ID (from a filled hub cache,
offline) and the run folder are the same MODEL to predict and to --eval-only."""

import json
import shutil

import pytest

from conftest import call, main_in_process, module, read_summary
from synthetic import CLASS_NAMES

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def one_line_error(proc, code=2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def hub_folder(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "cifar-resnet18"
    proc = call("train.export", trained_run, "--hub", out, "--dataset-id", "uoft-cs/cifar10")
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_hub_folder_holds_the_model_its_config_and_a_card_huggingface_hub_parses(hub_folder, trained_run):
    from huggingface_hub import ModelCard

    assert sorted(p.name for p in hub_folder.iterdir()) == [
        "README.md", "accuracy.png", "config.json", "config.yaml", "confusion_matrix.png", "loss.png",
        "model.safetensors"]
    assert (hub_folder / "model.safetensors").read_bytes() == (trained_run / "model.safetensors").read_bytes()
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == len(CLASS_NAMES)
    assert [config["id2label"][str(i)] for i in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    assert {config["label2id"][name]: name for name in config["label2id"]} == {int(i): n for i, n in
                                                                              config["id2label"].items()}
    assert (config["image_size"], config["decode_size"], config["cifar_stem"]) == (32, 32, False)
    assert len(config["mean"]) == len(config["std"]) == 3

    summary = read_summary(trained_run)
    card = ModelCard.load(hub_folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "pytorch"
    assert card.data.datasets == ["uoft-cs/cifar10"] and "image-classification" in card.data.tags
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == summary["test_acc"]
    assert results["f1"].metric_value == summary["test_f1_macro"] and results["f1"].metric_args == {"average": "macro"}
    assert all(r.dataset_type == "uoft-cs/cifar10" and r.dataset_split == "test" for r in results.values())
    body = card.text
    for needed in ("## How it was trained", "## Per-class test accuracy", "## How to load it", "## Limits",
                   "![loss](loss.png)", "torchvision.models.get_model", "| lr | 0.02 |"):
        assert needed in body, needed
    for name, acc in summary["test_per_class_accuracy"].items():
        assert f"| {name} | {acc:.4f} |" in body


def predictions(model, dataset_dir, env=None) -> str:
    run = module if env else call  # huggingface_hub reads HF_HUB_CACHE once, at import: another cache, a process
    proc = run("train.predict", model, "--dataset", dataset_dir, "--split", "test", "--top-k", "3", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def fill_hub_cache(cache, repo: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face hub cache's own layout, as a download leaves it: refs/main -> snapshots/<commit>/."""
    owner, name = repo.split("/")
    root = cache / f"models--{owner}--{name}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def test_every_kind_of_model_gives_the_same_predictions(hub_folder, trained_run, dataset_dir, tmp_path):
    want = predictions(trained_run, dataset_dir)
    assert predictions(hub_folder, dataset_dir) == want
    assert predictions(trained_run / "model.safetensors", dataset_dir) == want
    cache = tmp_path / "hub-cache"
    commit = fill_hub_cache(cache, "someone/cifar-resnet18", hub_folder)
    env = {**OFFLINE, "HF_HUB_CACHE": str(cache)}
    assert predictions("hf://someone/cifar-resnet18", dataset_dir, env) == want
    assert predictions(f"hf://someone/cifar-resnet18@{commit}", dataset_dir, env) == want
    missing = one_line_error(module("train.predict", "hf://someone/other", "--dataset", dataset_dir, env=env))
    assert "hf://someone/other is not in the Hugging Face cache" in missing


def test_eval_only_on_the_hub_folder_reproduces_the_run(hub_folder, trained_run, dataset_dir, tmp_path):
    out = tmp_path / "eval"
    proc = main_in_process(["--dataset", str(dataset_dir), "--eval-only", "--checkpoint", str(hub_folder),
                            "--output-dir", str(out), "--eval-batch-size", "64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = read_summary(out), read_summary(trained_run)
    assert (got["test_acc"], got["test_f1_macro"], got["confusion_matrix"]) == \
        (want["test_acc"], want["test_f1_macro"], want["confusion_matrix"])


def test_push_without_network_is_one_line_and_the_folder_stays(trained_run, tmp_path):
    out = tmp_path / "hub"
    proc = call("train.export", trained_run, "--hub", out, "--push-to-hub", "someone/cifar", env=OFFLINE)
    line = one_line_error(proc)
    assert "could not push" in line and "the folder is written and intact" in line
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "python -m train.predict hf://someone/cifar photo.png" in (out / "README.md").read_text()
    assert "wrote " in proc.stdout


def test_bad_model_arguments_are_one_line(trained_run, tmp_path, hub_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(call("train.predict", empty, "x.png"))
    assert "holds no model: expected a run folder" in line and "hf://REPO_ID" in line
    assert "expected hf://REPO_ID" in one_line_error(call("train.predict", "hf://a/b/c", "x.png"))
    before = sorted(p.name for p in hub_folder.iterdir())
    line = one_line_error(call("train.export", trained_run, "--hub", hub_folder))
    assert "already exists and is not empty" in line and sorted(p.name for p in hub_folder.iterdir()) == before
    assert "needs a finished run folder" in one_line_error(call("train.export", trained_run / "model.safetensors",
                                                                  "--hub", tmp_path / "x"))
    assert "give --onnx FILE or --hub DIR" in one_line_error(call("train.export", trained_run))
