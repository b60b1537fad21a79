"""Batched augmentation on the training device, applied to uint8 batches.

Equivalent in distribution to torchvision's RandomCrop(size, padding=4) +
RandomHorizontalFlip() + ToTensor() + Normalize(), but one gather per batch
instead of four PIL/tensor calls per image. Each image gets its own crop and flip.
"""

import torch
import torch.nn.functional as F

# torchvision's ImageNet statistics: what its pretrained weights expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def crop_flip(images: torch.Tensor, offsets_y, offsets_x, flips, padding: int) -> torch.Tensor:
    """Crop each (zero-padded) image at its own offset, mirrored where `flips` is True."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = offsets_y[:, None] + ar_h  # (B, H)
    cols = offsets_x[:, None] + torch.where(flips[:, None], ar_w.flip(0), ar_w)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put their dims first: (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    b, dev = images.shape[0], images.device
    offsets_y = torch.randint(0, 2 * padding + 1, (b,), device=dev)
    offsets_x = torch.randint(0, 2 * padding + 1, (b,), device=dev)
    flips = torch.rand(b, device=dev) < 0.5
    return crop_flip(images, offsets_y, offsets_x, flips, padding)


class BatchTransform:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, size, size); `train_batch` also augments.

    Training augmentation, drawn per image unless noted and applied to the whole batch: crop with
    padding and flip; optionally AutoAugment (torchvision's CIFAR-10 policy) or RandAugment on the uint8
    image and random erasing on the normalised image (train/policies.py: torchvision's definitions);
    MixUp/CutMix (torchvision's, per batch), which turn labels into soft targets.
    """

    def __init__(self, image_size: int, train: bool = False, padding: int = 4, auto_augment: str = "none",
                 erasing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, num_classes: int = 0,
                 mean: tuple = MEAN, std: tuple = STD):
        from torchvision.transforms import v2

        from train.policies import AutoAugment, RandAugment, RandomErasing

        self.image_size, self.train, self.padding = image_size, train, padding
        self.mean, self.std, self._on_device = mean, std, {}
        policies = {"autoaugment": AutoAugment, "randaugment": RandAugment}
        self.auto_augment = policies[auto_augment]() if auto_augment in policies else None
        self.erasing = RandomErasing(p=erasing) if erasing else None
        mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.train:
            images = random_crop_flip(images, self.padding)
            if self.auto_augment:
                images = self.auto_augment(images)
        x = images.float().div_(255)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        mean, std = self._statistics(x.device)
        x = x.sub_(mean).div_(std)
        if self.train and self.erasing:
            x = self.erasing(x)
        # cuDNN's convolutions are fastest on NHWC; on CPU the default layout does as well.
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def _statistics(self, device) -> tuple:
        # Made once per device: torch.tensor(..., device=cuda) is a blocking host-to-device copy.
        if device not in self._on_device:
            self._on_device[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                                            for v in (self.mean, self.std))
        return self._on_device[device]

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(inputs, targets): targets are the labels, or soft targets (B, classes) after MixUp/CutMix."""
        x = self(images)
        return self.mix(x, labels) if self.mix else (x, labels)
