"""The best model as safetensors, written atomically, with its arch and classes in the metadata."""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from train.errors import UsageError


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_model(state_dict: dict, path: Path, arch: str, class_names: list) -> None:
    metadata = {"arch": arch, "class_names": json.dumps(class_names), "format": "pt"}
    atomic_write(path, lambda tmp: save_file(state_dict, str(tmp), metadata=metadata))


def load_model(path: Path) -> tuple:
    """Return (state_dict, arch, class_names) from a model.safetensors, or a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
        class_names = json.loads(metadata["class_names"])
        arch = metadata["arch"]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UsageError(f"{path} is not a readable model file of this project ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'missing metadata'})") from None
    return state_dict, arch, class_names
