"""torchvision classifiers by builder name, with the head sized to the dataset."""

import difflib

import torch.nn as nn
import torchvision

from train.errors import UsageError


def classification_models() -> list:
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    known = classification_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise UsageError(f"unknown --arch '{arch}'{hint}")


def build_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    check_arch(arch)
    if not pretrained:
        return torchvision.models.get_model(arch, num_classes=num_classes)
    model = torchvision.models.get_model(arch, weights=_download_weights(arch))
    return replace_head(model, num_classes)


def _download_weights(arch: str):
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        weights.get_state_dict(progress=False)  # fills torch.hub's cache; get_model then reads it
    except Exception as e:  # URLError, timeouts, proxies: all mean "no weights here"
        raise UsageError(f"could not download ImageNet weights for {arch} from {weights.url} ({type(e).__name__}): "
                         "put the file in $TORCH_HOME/hub/checkpoints/ or train without --pretrained") from None
    return weights


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (every torchvision classifier ends in one) for a fresh one."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features == num_classes:
        return model
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(last.in_features, num_classes))
    return model
