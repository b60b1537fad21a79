"""A trained run as a Hugging Face Hub model folder, and Hub models as a MODEL again.

    python -m train.export runs/x --hub hub/x                          # the folder, with its model card
    python -m train.export runs/x --hub hub/x --push-to-hub me/cifar-resnet18
    python -m train.predict hf://me/cifar-resnet18@main photo.png      # or the folder itself

The folder: model.safetensors (the run's best weights, with the model record in its metadata), config.json
(architecture, num_classes, id2label/label2id, image and decode size, mean/std, CIFAR stem), README.md (a
model card: YAML front matter written by huggingface_hub's own ModelCardData, with model-index results for
test accuracy and macro-F1; then how it was trained, per-class accuracy, curves, how to load it, its
limits), the run's config.yaml and its plots. Pushing uploads that folder with huggingface_hub.
"""

import json
import os
import shutil
from pathlib import Path

from train import run_dir
from train.errors import UsageError, first_line
from train.paths import is_hub_id
from train.model_files import CARD, CONFIG_JSON, hub_config, load_model
from train.models import ModelSpec



# ---- the folder and its card --------------------------------------------------------------------

def write_folder(run: Path, out: Path, dataset_id: str = "", repo_id: str = "") -> None:
    """Write the Hub model folder of a finished run; a folder already there is not touched."""
    for name in (run_dir.SUMMARY, run_dir.CONFIG, run_dir.MODEL):
        if not (run / name).is_file():
            raise UsageError(f"--hub needs a finished run folder: {run} has no {name}")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty: give a new folder (nothing was written)")
    _, spec, _ = load_model(run)
    summary, config = run_dir.read_summary(run), run_dir.read_config(run)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(run / run_dir.MODEL, tmp / run_dir.MODEL)
    shutil.copy2(run / run_dir.CONFIG, tmp / run_dir.CONFIG)
    figures = [f for f in run_dir.FIGURES if (run / f).is_file()]
    for f in figures:
        shutil.copy2(run / f, tmp / f)
    (tmp / CONFIG_JSON).write_text(json.dumps(hub_config(spec), indent=2) + "\n")
    (tmp / CARD).write_text(model_card(spec, summary, config, dataset_id or config.get("dataset", ""), figures,
                                       repo_id or out.name))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def card_data(spec: ModelSpec, summary: dict, config: dict, dataset: str, name: str):
    from huggingface_hub import EvalResult, ModelCardData

    common = {"task_type": "image-classification", "task_name": "Image Classification", "dataset_type": dataset,
              "dataset_name": dataset, "dataset_split": "test"}
    results = [EvalResult(metric_type="accuracy", metric_name="Test accuracy", metric_value=summary["test_acc"],
                          **common),
               EvalResult(metric_type="f1", metric_name="Test macro-F1", metric_value=summary["test_f1_macro"],
                          metric_args={"average": "macro"}, **common)]
    return ModelCardData(library_name="pytorch", license="apache-2.0", model_name=name,
                         datasets=[dataset] if is_hub_id(dataset) else None, eval_results=results,
                         tags=["image-classification", "torchvision", spec.arch, "cifar-accelerate"],
                         pipeline_tag="image-classification")


def model_card(spec: ModelSpec, summary: dict, config: dict, dataset: str, figures: list, name: str) -> str:
    """The model card: `name` is the Hub repository id (or the folder's name until it has one)."""
    data = card_data(spec, summary, config, dataset, name.split("/")[-1])
    where = name if "/" in name else "<user>/<repo>"
    env = config.get("environment", {})
    options = {k: v for k, v in config.items() if k != "environment"}
    size = spec.decode_size or spec.image_size
    lines = ["---", data.to_yaml(), "---", "", f"# {name.split('/')[-1]}", "",
             f"A torchvision `{spec.arch}` trained on `{dataset}` to classify {len(spec.class_names)} classes "
             f"({', '.join(spec.class_names)}), with cifar-accelerate's `train/main.py`. Test accuracy "
             f"{summary['test_acc']:.4f}, macro-F1 {summary['test_f1_macro']:.4f} "
             f"on {summary['num_test_samples']} test images, with the weights of the best epoch "
             f"({summary.get('best_epoch', '-')}, chosen on "
             f"{'the test split itself: optimistic' if summary.get('val_is_test') else 'a validation split'}).",
             "", "## How it was trained", "",
             f"{summary.get('epochs_trained', '-')} epochs, {summary.get('steps', '-')} optimizer steps, "
             f"{summary['world_size']} process(es), precision {summary['mixed_precision']}; torch "
             f"{env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, accelerate "
             f"{env.get('accelerate', '?')}, datasets {env.get('datasets', '?')}, Python {env.get('python', '?')}. "
             "The resolved options (also in `config.yaml`, which `train/main.py --config` takes back):", "",
             "| option | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in options.items()], "",
             "## Per-class test accuracy", "", "| class | accuracy |", "|---|---|",
             *[f"| {c} | {a:.4f} |" for c, a in summary["test_per_class_accuracy"].items()], ""]
    if figures:
        lines += ["## Curves", "", *[f"![{f[:-4].replace('_', ' ')}]({f})" for f in figures], ""]
    lines += ["## How to load it", "", "With this project (the folder, or the Hub repository once pushed):", "",
              "```bash", f"python -m train.predict hf://{where} photo.png --top-k 3", "```", ""]
    if not spec.cifar_stem:
        lines += ["With torchvision alone:", "", "```python", "import json, torch, torchvision",
                  "from safetensors.torch import load_file", "",
                  'config = json.load(open("config.json"))',
                  'model = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])',
                  'model.load_state_dict(load_file("model.safetensors"))', "model.eval()", "```", ""]
    else:
        lines += ["The network's stem is changed for 32-pixel images (`cifar_stem`), so it is built by this "
                  "project's `ModelSpec` (`train/models.py`), not by torchvision alone.", ""]
    lines += ["## Limits", "",
              f"- Input: RGB images decoded at {size}x{size}"
              + (f", resized to {spec.image_size}x{spec.image_size}" if size != spec.image_size else "")
              + ", as float pixel / 255, minus mean "
              f"{[round(m, 4) for m in spec.mean]}, divided by std {[round(s, 4) for s in spec.std]}, per channel.",
              f"- Classes: only these {len(spec.class_names)}; any other image is still given one of them.",
              "- Measured on the test split named above only; no claim beyond that distribution.", ""]
    return "\n".join(lines)


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload the folder to a Hub model repository (created if needed); its URL, or a one-line UsageError."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                     commit_message="Upload model from cifar-accelerate"))
    except Exception as e:  # offline, no credentials, no permission: huggingface_hub's and requests' errors
        raise UsageError(f"could not push {folder} to {repo_id}: {first_line(e)} (the folder is written and intact; "
                         f"push it later with --push-to-hub or `hf upload {repo_id} {folder}`)") from None
