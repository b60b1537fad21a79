"""A trained model's files: writing model.safetensors, and reading any MODEL argument.

A MODEL is a run folder, a model.safetensors, a checkpoint folder, a Hub model folder (config.json, written by
`train.export --hub`) or hf://REPO_ID[@REVISION]; `load_model` reads each into the same weights and ModelSpec.
The best model is a safetensors file with its ModelSpec in the metadata. Nothing here unpickles anything.
train/checkpoint.py (training checkpoints) and train/hub.py (writing and pushing Hub folders) build on this
module; it imports neither.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from train import run_dir
from train.errors import UsageError, first_line
from train.files import atomic_write, writing
from train.models import ModelSpec, clean_keys

# A checkpoint folder's files this module reads: Accelerate's save_state name for the model's current weights,
# and the trainer's record, which holds the ModelSpec (train/checkpoint.py writes both).
CHECKPOINT_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.json"

CONFIG_JSON, CARD = "config.json", "README.md"
FORMAT = "cifar-accelerate"  # config.json's "model_format": a folder this project wrote
PREFIX = "hf://"


def cpu_copy(tensors: dict) -> dict:
    """A CPU copy of a state dict that safetensors can write (contiguous, unshared)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return cpu_copy(model.state_dict())


def save_model(state_dict: dict, path: Path, spec: ModelSpec) -> None:
    metadata = {**spec.to_metadata(), "format": "pt", "format_version": str(run_dir.FORMAT_VERSION)}
    with writing(path):
        atomic_write(path, lambda tmp: save_file(clean_keys(state_dict), str(tmp), metadata=metadata))


MODEL_KINDS = ("a run folder (model.safetensors), a model.safetensors, a checkpoint folder (trainer_state.json), "
               "a Hub model folder (config.json, from train.export --hub) or hf://REPO_ID[@REVISION]")


def add_model_argument(parser, also: str = "") -> None:
    """The MODEL positional argument of the commands that use a trained model (predict, export)."""
    parser.add_argument("model", help=f"{MODEL_KINDS}{also}")


def load_model(path) -> tuple:
    """Return (state_dict, ModelSpec, names of the spec's fields the file did not record) from any MODEL
    argument (MODEL_KINDS); or a one-line UsageError. Every kind gives the same model for the same weights."""
    if str(path).startswith(PREFIX):
        path = download(str(path))
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        saved = json.loads((path / TRAINER_STATE).read_text())
        state_dict, _ = read_model_file(path / CHECKPOINT_WEIGHTS)
        return clean_keys(state_dict), ModelSpec.from_dict(saved), ModelSpec.missing_from_dict(saved)
    if path.is_dir() and is_hub_folder(path):
        state_dict, _ = read_model_file(path / run_dir.MODEL)
        return clean_keys(state_dict), read_hub_folder(path), set()
    if path.is_dir() and not (path / run_dir.MODEL).is_file():
        raise UsageError(f"{path} holds no model: expected {MODEL_KINDS}")
    state_dict, metadata = read_model_file(path / run_dir.MODEL if path.is_dir() else path)
    try:
        spec = ModelSpec.from_metadata(metadata)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a model file of this project (metadata: {type(e).__name__} {e})") from None
    return clean_keys(state_dict), spec, ModelSpec.missing_from_dict(metadata)


def build_trained(state_dict: dict, spec: ModelSpec, source) -> torch.nn.Module:
    """The network `spec` describes with its trained weights, in eval mode; or a one-line UsageError."""
    model = spec.build()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UsageError(f"the weights in {source} do not fit {spec.arch} (cifar_stem {spec.cifar_stem}): "
                         f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return model.eval()


def read_model_file(path: Path) -> tuple:
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable model file ({first_line(e)})") from None


# ---- config.json: the model record, in the Hub's vocabulary -----------------------------------

def hub_config(spec: ModelSpec) -> dict:
    names = list(spec.class_names)
    return {"model_format": FORMAT, "library": "torchvision", "architecture": spec.arch,
            "num_classes": len(names), "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}, "image_size": spec.image_size,
            "decode_size": spec.decode_size or spec.image_size, "mean": list(spec.mean), "std": list(spec.std),
            "cifar_stem": spec.cifar_stem}


def spec_from_hub_config(config: dict, source) -> ModelSpec:
    try:
        labels = config["id2label"]
        names = [labels[str(i)] for i in range(int(config["num_classes"]))]
        return ModelSpec(config["architecture"], tuple(names), bool(config["cifar_stem"]), int(config["image_size"]),
                         tuple(config["mean"]), tuple(config["std"]), int(config["decode_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{source} is not a model folder of this project ({type(e).__name__} {e})") from None


def is_hub_folder(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CONFIG_JSON).read_text()).get("model_format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_hub_folder(path: Path) -> ModelSpec:
    return spec_from_hub_config(json.loads((Path(path) / CONFIG_JSON).read_text()), path)


# ---- hf://REPO_ID[@REVISION] -------------------------------------------------------------------

def download(ref: str) -> Path:
    """The local folder of hf://REPO_ID[@REVISION]: downloaded through huggingface_hub, or its cached copy
    when offline (HF_HUB_OFFLINE=1, or no network); a one-line UsageError otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ref[len(PREFIX):].partition("@")
    if not repo or repo.count("/") > 1:
        raise UsageError(f"{ref}: expected hf://REPO_ID or hf://REPO_ID@REVISION")
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=[run_dir.MODEL, CONFIG_JSON, CARD]))
    except LocalEntryNotFoundError:
        raise UsageError(f"{ref} is not in the Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or 'default'})"
                         " and the Hub cannot be reached: download it where there is network") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UsageError(f"{ref}: {first_line(e)}") from None
