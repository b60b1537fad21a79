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


def build_model(arch: str, num_classes: int, pretrained: bool = False, cifar_stem: bool = False) -> nn.Module:
    check_arch(arch)
    if not pretrained:
        model = torchvision.models.get_model(arch, num_classes=num_classes)
    else:
        model = replace_head(torchvision.models.get_model(arch, weights=_download_weights(arch)), num_classes)
    return adapt_to_32px(model, arch) if cifar_stem else model


def adapt_to_32px(model: nn.Module, arch: str) -> nn.Module:
    """The usual CIFAR stem: ImageNet models divide their input by 32, leaving 1x1 of a 32 px image.

    ResNets get a 3x3 stride-1 first convolution and no max-pool; MobileNets keep their layers but
    take the stem and the first downsampling stage at stride 1. Both leave 4x4 before the pooling.
    Changed strides keep every weight, so pretrained weights still load; ResNet's new 3x3 stem is the
    one layer that starts fresh.
    """
    if isinstance(model, torchvision.models.ResNet):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if isinstance(model, (torchvision.models.MobileNetV2, torchvision.models.MobileNetV3)):
        strided = [m for m in model.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        for conv in strided[:2]:  # the stem, then the depthwise conv of the first stride-2 block
            conv.stride = (1, 1)
        return model
    raise UsageError(f"--cifar-stem supports ResNets (resnet*, resnext*, wide_resnet*) and MobileNetV2/V3, "
                     f"not {arch}")


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
