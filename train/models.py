"""torchvision classifiers by builder name, with the head sized to the dataset, and the record of how
a trained model was built (ModelSpec) that travels with its weights."""

import dataclasses
import json
import re

import torch
import torch.nn as nn
import torchvision

from train.archs import check_arch
from train.augment import MEAN, STD
from train.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a trained network and its input: rebuilding from it needs no other option."""

    arch: str
    class_names: tuple
    cifar_stem: bool = False
    image_size: int = 32
    mean: tuple = MEAN
    std: tuple = STD
    decode_size: int = 0  # side the images were decoded at before the resize to image_size (0: image_size)

    @classmethod
    def from_config(cls, cfg, class_names, decode_size: int = 0) -> "ModelSpec":
        return cls(cfg.arch, tuple(class_names), cfg.cifar_stem, cfg.image_size, decode_size=decode_size)

    def build(self, pretrained: bool = False) -> nn.Module:
        return build_model(self.arch, len(self.class_names), pretrained, self.cifar_stem)

    def to_dict(self) -> dict:
        return {"arch": self.arch, "class_names": list(self.class_names), "cifar_stem": self.cifar_stem,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "decode_size": self.decode_size}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Files of older runs lack all but arch and class names: they were 32 px, ImageNet stem."""
        return cls(d["arch"], tuple(d["class_names"]), bool(d.get("cifar_stem", False)),
                   int(d.get("image_size", 32)), tuple(d.get("mean", MEAN)), tuple(d.get("std", STD)),
                   int(d.get("decode_size", 0)))

    def to_metadata(self) -> dict:
        """safetensors metadata holds strings only: JSON for everything but the arch."""
        return {k: v if k == "arch" else json.dumps(v) for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ModelSpec":
        return cls.from_dict({k: v if k == "arch" else json.loads(v) for k, v in metadata.items()
                              if k in {f.name for f in dataclasses.fields(cls)}})

    @classmethod
    def missing_from_dict(cls, d: dict) -> set:
        """Fields a format-1 file (an older run's) did not record, and ModelSpec filled with defaults."""
        return {f.name for f in dataclasses.fields(cls)} - set(d)


def plain_model(accelerator, model: nn.Module) -> nn.Module:
    """The torchvision module inside DDP and torch.compile wrappers, nested either way.

    Accelerate's unwrap_model(keep_torch_compile=False) misses a compiled module inside DDP,
    whose state dict keys then all start with `_orig_mod.`.
    """
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def clean_keys(state_dict: dict) -> dict:
    """State dict keys without DDP's `module.` or torch.compile's `_orig_mod.` (written by older runs)."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


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
