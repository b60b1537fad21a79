"""torchvision's AutoAugment, RandAugment and RandomErasing, batched: a per-image loop costs a GPU host sync
per image (torchvision's affine kernels build their matrices on the host).

Each image draws its own op(s), magnitude, sign and erased box from torch's global RNG on the batch's
device; the ops then run once over the batch: geometric ops as one per-image affine matrix and one
grid_sample; colour ops that map each pixel value on its own as one per-image 256-entry table and one
gather; the other colour ops computed for the batch and picked per image with torch.where. Every op gives
the same pixels as torchvision's kernel for the same parameters (tests/test_policies.py checks it).
"""

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

# One fixed order: an op's index means the same op in every table and in `ops` tensors.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _only(ops: torch.Tensor, name: str, value: torch.Tensor) -> torch.Tensor:
    """`value` for the images whose op is `name`, 0 for the others."""
    return torch.where(ops == OPS.index(name), value, torch.zeros_like(value))


# ---- geometry --------------------------------------------------------------------------------

def _inverse_affine(angle, tx, ty, shear_x, shear_y, cx, cy) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix (scale 1, angles in degrees) per image, in float64 as its
    Python floats are, so that the float32 matrix (and which pixel `nearest` picks) is the same."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    x, y = cx + tx, cy + ty
    rows = (d, -b, cx - d * x + b * y, -c, a, cy + c * x - a * y)
    return torch.stack(rows, -1).view(-1, 2, 3)


def affine_matrices(ops: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) float32: the matrix torchvision's F.affine / F.rotate build for each image's geometric op
    as AutoAugment calls them; the identity for every other op."""
    m = magnitudes.double()
    shear = torch.rad2deg(torch.atan(m))  # AutoAugment passes degrees(atan(magnitude))
    is_shear = (ops == OPS.index("ShearX")) | (ops == OPS.index("ShearY"))
    # Shears turn about the top-left corner (AutoAugment passes center=[0, 0]), the rest about the centre.
    corner = torch.where(is_shear, -0.5, 0.0).double()
    return _inverse_affine(
        angle=_only(ops, "Rotate", -m.remainder(360)),  # rotate() takes angle % 360, affine the opposite
        tx=_only(ops, "TranslateX", m.trunc()), ty=_only(ops, "TranslateY", m.trunc()),  # int(magnitude)
        shear_x=_only(ops, "ShearX", shear), shear_y=_only(ops, "ShearY", shear),
        cx=corner * width, cy=corner * height).float()


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each uint8 image resampled through its own (2, 3) inverse matrix: nearest pixel, 0 outside, with
    torchvision's grid (pixel centres about the image centre) and float32 arithmetic."""
    b, _, h, w = images.shape
    dev = images.device
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev)
    base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev)[:, None]
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).clone()
    scaled[..., 0] /= 0.5 * w  # one column at a time: a (2,) tensor would be a host-to-device copy
    scaled[..., 1] /= 0.5 * h
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


# ---- colour ------------------------------------------------------------------------------------

def _fused_multiply_add(acc: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # torchvision blends with acc.add_(x, alpha=...), a fused multiply-add (one rounding) on CPU and CUDA;
    # rounded twice, a value just under an integer can cross it, and the uint8 cast truncates. float64
    # holds these products of float32 values exactly, so its one rounding to float32 is the same.
    return acc.double().addcmul_(x.double(), alpha.float().double()).float()


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend for uint8: image * factor + degenerate * (1 - factor), clamped, truncated."""
    factor = _per_image(factor)
    mixed = _fused_multiply_add(images.float() * factor.float(), degenerate, 1 - factor)
    return mixed.clamp_(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(images).float()  # the uint8 cast floors, as adjust_saturation/contrast do


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13,
    rounded; the one-pixel border unchanged."""
    x = images.float()
    inner = x[..., 1:-1, 1:-1]
    rows = (x[..., :-2] + x[..., 1:-1]).add_(x[..., 2:])
    weighted = (rows[..., :-2, :] + rows[..., 1:-1, :]).add_(rows[..., 2:, :]).add_(inner, alpha=4)  # integers
    # An integer over 13 is never within float error of .5, so this rounds as torchvision's conv2d does.
    change = weighted.div_(13).round_().sub_(inner)
    inner.copy_(_fused_multiply_add(inner, change, 1 - _per_image(factor)))
    return x.clamp_(0, 255).to(torch.uint8)


def _posterize(values: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    bits = magnitudes.long()  # int(magnitude)
    return values & _per_image(256 - 2 ** (8 - bits)).to(torch.uint8)  # keep the top `bits` bits


def _solarize(values: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    # torchvision compares uint8 with the Python float 255 * magnitude, i.e. in float32.
    threshold = _per_image(255 * magnitudes.double()).float()
    return torch.where(values >= threshold, values.bitwise_not(), values)


def _autocontrast(images: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """torchvision's autocontrast of `images`, per channel, applied to `values` (torch.where where
    torchvision assigns through a boolean mask, a host sync)."""
    x = images.float()
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = low == high
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return (values.float() - torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


# Ops whose output pixel depends only on its input value and the image: f(images, magnitudes, values)
# gives, for each image (and channel), the output of every value 0..255, so one gather applies them all.
POINTWISE = {
    "Brightness": lambda images, m, values: _blend(values, torch.zeros((), device=images.device), 1 + m),
    "Contrast": lambda images, m, values: _blend(values, _grayscale(images).mean((-3, -2, -1), keepdim=True),
                                                 1 + m),
    "Posterize": lambda images, m, values: _posterize(values, m),
    "Solarize": lambda images, m, values: _solarize(values, m),
    "AutoContrast": lambda images, m, values: _autocontrast(images, values),
    "Invert": lambda images, m, values: values.bitwise_not(),
}
# The others: f(images, magnitudes) -> images.
COLOUR = {
    "Color": lambda images, m: _blend(images, _grayscale(images), 1 + m),
    "Sharpness": lambda images, m: _sharpness(images, 1 + m),
    "Equalize": lambda images, m: TF.equalize(images),  # already batched and sync-free
}


def apply_ops(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor, kinds=OPS) -> torch.Tensor:
    """Image i gets op OPS[ops[i]] with signed magnitude magnitudes[i], exactly as torchvision's
    AutoAugment._apply_image_or_video_transform would give it. `kinds`: the only ops that can occur
    (the others are not computed)."""
    def where(kind, result, otherwise):
        return torch.where(_per_image(ops == OPS.index(kind)), result, otherwise)

    b, c, h, w = images.shape
    if any(kind in GEOMETRIC for kind in kinds):
        images = warp(images, affine_matrices(ops, magnitudes, h, w))  # the identity leaves others as they are
    out = images
    if any(kind in POINTWISE for kind in kinds):
        values = torch.arange(256, dtype=torch.uint8, device=images.device).view(1, 1, 1, 256)
        table = values.expand(b, c, 1, 256)  # every other op: unchanged
        for kind in kinds:
            if kind in POINTWISE:
                table = where(kind, POINTWISE[kind](images, magnitudes, values), table)
        out = table.reshape(b, c, 256).gather(2, images.reshape(b, c, h * w).long()).view(b, c, h, w)
    for kind in kinds:
        if kind in COLOUR:
            out = where(kind, COLOUR[kind](images, magnitudes), out)
    return out


# ---- policies --------------------------------------------------------------------------------

class _Stage:
    """One op slot of a policy on one device: row k is (op, probability that it applies, unsigned
    magnitude, whether torchvision draws a sign), from torchvision's own tables."""

    def __init__(self, rows, space: dict, num_bins: int, height: int, width: int, device):
        self.kinds = tuple(sorted({name for name, _, _ in rows}, key=OPS.index))
        ops, probability, magnitude, signed = [], [], [], []
        for name, p, magnitude_bin in rows:
            table, is_signed = space[name][0](num_bins, height, width), space[name][1]
            ops.append(OPS.index(name))
            probability.append(p)
            magnitude.append(0.0 if table is None else float(table[magnitude_bin]))
            signed.append(is_signed and table is not None)
        # Built once per device and image size: torch.tensor(..., device=) waits for the device.
        self.ops = torch.tensor(ops, device=device)
        self.probability = torch.tensor(probability, device=device)
        self.magnitude = torch.tensor(magnitude, dtype=torch.float64, device=device)
        self.signed = torch.tensor(signed, device=device)

    def draw(self, rows: torch.Tensor) -> tuple:
        """(ops, signed magnitudes) for images that drew these rows; Identity (magnitude 0) where the op's
        probability said no."""
        n, dev = len(rows), rows.device
        applied = torch.rand(n, device=dev) <= self.probability[rows]  # torchvision: applied if rand() <= p
        negative = self.signed[rows] & (torch.rand(n, device=dev) <= 0.5)  # and negated if rand() <= 0.5
        magnitude = torch.where(negative, -self.magnitude[rows], self.magnitude[rows])
        return (torch.where(applied, self.ops[rows], 0),
                torch.where(applied, magnitude, torch.zeros_like(magnitude)))


class _Policy:
    """A policy's tables per (device, height, width), made on first use; one _Stage per op applied in turn.
    Subclasses give each stage's rows and how images choose a row of each. The rows, magnitude tables and
    signs come from the torchvision transform itself (`reference`; its private _policies and
    _AUGMENTATION_SPACE), so that they cannot drift from what it draws."""

    def __init__(self, reference, num_bins: int):
        self.reference, self.num_bins, self._stages = reference, num_bins, {}

    def stages(self, device, height: int, width: int) -> list:
        key = (device, height, width)
        if key not in self._stages:
            self._stages[key] = [_Stage(rows, self.reference._AUGMENTATION_SPACE, self.num_bins, height, width,
                                        device) for rows in self.stage_rows()]
        return self._stages[key]

    def draw(self, n: int, device, height: int, width: int) -> list:
        """Per stage, in order: (ops, signed magnitudes) of n images."""
        stages = self.stages(device, height, width)
        return [stage.draw(rows) for stage, rows in zip(stages, self.choose(n, device))]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        stages = self.stages(images.device, *size)
        for stage, (ops, magnitudes) in zip(stages, self.draw(len(images), images.device, *size)):
            images = apply_ops(images, ops, magnitudes, stage.kinds)
        return images


class AutoAugment(_Policy):
    """torchvision's AutoAugment(policy): each image draws one sub-policy, whose two ops then apply in
    order, each with its own probability."""

    def __init__(self, policy=v2.AutoAugmentPolicy.CIFAR10):
        super().__init__(v2.AutoAugment(policy), num_bins=10)  # AutoAugment.forward: magnitudes_fn(10, h, w)

    def stage_rows(self) -> list:
        return [[sub_policy[i] for sub_policy in self.reference._policies] for i in range(2)]

    def choose(self, n: int, device) -> list:
        sub_policy = torch.randint(len(self.reference._policies), (n,), device=device)
        return [sub_policy, sub_policy]


class RandAugment(_Policy):
    """torchvision's RandAugment(num_ops, magnitude, num_magnitude_bins): each image draws num_ops ops,
    uniformly and independently, all at the one magnitude."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        super().__init__(v2.RandAugment(num_ops=num_ops, magnitude=magnitude,
                                        num_magnitude_bins=num_magnitude_bins), num_magnitude_bins)

    def stage_rows(self) -> list:
        every_op = [(name, 1.0, self.reference.magnitude) for name in self.reference._AUGMENTATION_SPACE]
        return [every_op] * self.reference.num_ops

    def choose(self, n: int, device) -> list:
        ops = len(self.reference._AUGMENTATION_SPACE)
        return [torch.randint(ops, (n,), device=device) for _ in range(self.reference.num_ops)]


# ---- random erasing --------------------------------------------------------------------------

class RandomErasing:
    """torchvision's RandomErasing(p, scale, ratio, value=0) on each image of a (normalised float) batch:
    with probability p, the first of 10 drawn boxes that fits inside the image is set to 0; none if
    none fits."""

    attempts = 10

    def __init__(self, p: float = 0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
        self.p, self.scale = p, scale
        self.log_ratio = torch.log(torch.tensor(ratio)).tolist()  # as torchvision: float32 logs, on the host

    def boxes(self, n: int, height: int, width: int, device) -> tuple:
        """(erase, top, left, box height, box width) per image; erase is False where nothing is erased."""
        shape = (n, self.attempts)
        # float32 draws used in float64, as torchvision's .item() and Python arithmetic use them
        area = height * width * torch.empty(shape, device=device).uniform_(*self.scale).double()
        aspect = torch.empty(shape, device=device).uniform_(*self.log_ratio).exp_().double()
        box_h, box_w = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()  # Python's round too
        fits = (box_h < height) & (box_w < width)
        first = fits.byte().argmax(1, keepdim=True)  # the first attempt that fits (0 if none does)
        box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
        erase = (torch.rand(n, device=device) < self.p) & fits.any(1)  # torchvision: skipped if rand() >= p
        # randint(0, size - box + 1) with a per-image bound
        top = torch.rand(n, dtype=torch.float64, device=device).mul_(height - box_h + 1).floor_()
        left = torch.rand(n, dtype=torch.float64, device=device).mul_(width - box_w + 1).floor_()
        return erase, top.long(), left.long(), box_h.long(), box_w.long()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        erase, top, left, box_h, box_w = self.boxes(n, height, width, x.device)
        rows = torch.arange(height, device=x.device) - top[:, None]  # (B, H): row's place in the box
        cols = torch.arange(width, device=x.device) - left[:, None]
        in_rows, in_cols = (rows >= 0) & (rows < box_h[:, None]), (cols >= 0) & (cols < box_w[:, None])
        box = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
        return x.masked_fill(_per_image(erase) & box, 0.0)
