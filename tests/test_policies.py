"""train/policies.py against torchvision: the same pixels for the same parameters, and draws (and outputs)
distributed as torchvision's per-image transforms draw them. The expected tables are read from
torchvision's own objects, never retyped."""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

from train.augment import BatchTransform
from train.policies import GEOMETRIC, OPS, AutoAugment, RandAugment, RandomErasing, apply_ops

AUTO = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
RAND = v2.RandAugment()
CPU = torch.device("cpu")


def _images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images and the cases where kernels take special paths or round delicately."""
    x = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    x[1::6] = x[1::6, :1]  # grey: each pixel equals its grayscale value, blends land on integers
    x[2::6] = x[2::6, :, :1, :1]  # one colour: autocontrast's and equalize's degenerate cases
    x[3::6] = 100 + x[3::6] // 32  # a narrow range of values
    x[4::6] = x[4::6] // 128 * 255  # two levels
    return x


def _torchvision(images, names, magnitudes) -> torch.Tensor:
    """Each image through the kernel call AutoAugment and RandAugment make for (op, magnitude): their
    (private) _apply_image_or_video_transform, which maps a magnitude to each functional op's argument."""
    return torch.stack([AUTO._apply_image_or_video_transform(image, name, float(m), interpolation=AUTO.interpolation,
                                                             fill=AUTO._fill)
                        for image, name, m in zip(images, names, magnitudes)])


def _magnitudes(name: str, height: int, width: int) -> list:
    """Every magnitude torchvision's AutoAugment (any of its 10 bins) and RandAugment (its bin) give `name`,
    with both signs where it draws one; for geometric ops also some outside those tables."""
    values = set()
    for reference, bins, num_bins in ((AUTO, range(10), 10), (RAND, [RAND.magnitude], RAND.num_magnitude_bins)):
        if name not in reference._AUGMENTATION_SPACE:
            continue
        table_of, signed = reference._AUGMENTATION_SPACE[name]
        table = table_of(num_bins, height, width)
        values |= {0.0} if table is None else {s * float(table[b]) for b in bins for s in ((1, -1) if signed else (1,))}
    if name in GEOMETRIC:
        values |= {s * v for v in (0.5, 2.7, 13.0, 90.0, 180.0) for s in (1, -1)}
    return sorted(values)


def _ops(names) -> torch.Tensor:
    return torch.tensor([OPS.index(name) for name in names])


# ---- 1. the same pixels as torchvision's kernels ----------------------------------------------

@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("name", OPS)
def test_each_op_gives_torchvisions_pixels(name, size):
    magnitudes = _magnitudes(name, *size)
    images = _images(12, *size).repeat(len(magnitudes), 1, 1, 1)  # every image at every magnitude
    per_image = torch.tensor(magnitudes, dtype=torch.float64).repeat_interleave(12)
    names = [name] * len(images)
    ours = apply_ops(images, _ops(names), per_image)
    assert torch.equal(ours, _torchvision(images, names, per_image.tolist()))


def test_a_batch_mixing_every_op_gives_each_image_its_own_op():
    generator = torch.Generator().manual_seed(1)
    pairs = [(name, m) for name in OPS for m in _magnitudes(name, 32, 32)]
    chosen = torch.randint(len(pairs), (600,), generator=generator).tolist()
    names, magnitudes = [pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen]
    images = _images(600, seed=2)
    ours = apply_ops(images, _ops(names), torch.tensor(magnitudes, dtype=torch.float64))
    assert torch.equal(ours, _torchvision(images, names, magnitudes))


def test_channels_last_batches_as_crop_and_flip_return_them():
    images = _images(24)
    names = [OPS[i % len(OPS)] for i in range(24)]
    magnitudes = [_magnitudes(name, 32, 32)[-1] for name in names]
    ours = apply_ops(images.contiguous(memory_format=torch.channels_last), _ops(names),
                     torch.tensor(magnitudes, dtype=torch.float64))
    assert torch.equal(ours, _torchvision(images, names, magnitudes))


@pytest.mark.parametrize("make", [AutoAugment, RandAugment])
def test_a_policy_applies_each_images_drawn_ops_in_order(make):
    policy, images = make(), _images(128, seed=3)
    torch.manual_seed(8)
    draws = policy.draw(len(images), CPU, 32, 32)
    torch.manual_seed(8)  # the call draws the same, first
    ours = policy(images)
    expected = images
    for ops, magnitudes in draws:
        expected = _torchvision(expected, [OPS[i] for i in ops.tolist()], magnitudes.tolist())
    assert torch.equal(ours, expected)


# ---- 2. draws distributed as torchvision's tables say -----------------------------------------

def _slot(space: dict, num_bins: int, name: str, probability: float, magnitude_bin) -> collections.Counter:
    """{(op, signed magnitude): probability} of one op slot as torchvision's forward draws it."""
    table_of, signed = space[name]
    table = table_of(num_bins, 32, 32)
    magnitude = 0.0 if table is None else float(table[magnitude_bin])
    signs = (1.0, -1.0) if signed and table is not None else (1.0,)
    outcomes = collections.Counter({("Identity", 0.0): 1 - probability})
    for sign in signs:
        outcomes[(name, sign * magnitude)] += probability / len(signs)
    return outcomes


def _expected_pairs(policy: str) -> collections.Counter:
    """{(op 1, magnitude 1, op 2, magnitude 2): probability} from torchvision's tables."""
    if policy == "autoaugment":
        sub_policies = [[_slot(AUTO._AUGMENTATION_SPACE, 10, *op) for op in sub] for sub in AUTO._policies]
    else:
        one = collections.Counter()
        for name in RAND._AUGMENTATION_SPACE:  # each op alike likely
            for outcome, p in _slot(RAND._AUGMENTATION_SPACE, RAND.num_magnitude_bins, name, 1.0,
                                    RAND.magnitude).items():
                one[outcome] += p / len(RAND._AUGMENTATION_SPACE)
        sub_policies = [[one, one]]  # the two ops drawn independently
    pairs = collections.Counter()
    for first, second in sub_policies:
        for a, p in first.items():
            for b, q in second.items():
                pairs[a + b] += p * q / len(sub_policies)
    return collections.Counter({k: p for k, p in pairs.items() if p > 0})


def _drawn_pairs(policy, n: int) -> collections.Counter:
    (ops_1, m_1), (ops_2, m_2) = policy.draw(n, CPU, 32, 32)
    rows, counts = torch.unique(torch.stack([ops_1.double(), m_1, ops_2.double(), m_2], 1), dim=0,
                                return_counts=True)
    return collections.Counter({(OPS[int(a)], b, OPS[int(c)], d): k for (a, b, c, d), k in
                                zip(rows.tolist(), counts.tolist())})


def _assert_frequencies(observed: collections.Counter, expected: dict, n: int):
    """Each outcome's frequency within 5 standard deviations of its probability; none outside the support."""
    assert set(observed) <= set(expected), set(observed) - set(expected)
    for outcome, p in expected.items():
        assert abs(observed[outcome] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1 / n, (outcome, observed[outcome], p)


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment"])
def test_drawn_ops_magnitudes_and_signs_follow_torchvisions_table(policy):
    n = 50_000
    torch.manual_seed(0)
    drawn = _drawn_pairs(AutoAugment() if policy == "autoaugment" else RandAugment(), n)
    _assert_frequencies(drawn, _expected_pairs(policy), n)


def test_autoaugment_sub_policies_are_uniform_and_each_op_applies_with_its_probability():
    n, policy = 100_000, AutoAugment()
    torch.manual_seed(1)
    chosen = policy.choose(n, CPU)[0]
    counts = torch.bincount(chosen, minlength=len(AUTO._policies))
    _assert_frequencies(collections.Counter(dict(enumerate(counts.tolist()))),
                        {k: 1 / len(AUTO._policies) for k in range(len(AUTO._policies))}, n)
    for slot, stage in enumerate(policy.stages(CPU, 32, 32)):
        ops, magnitudes = stage.draw(chosen)
        for k, sub_policy in enumerate(AUTO._policies):
            mine = chosen == k
            observed = collections.Counter(zip([OPS[i] for i in ops[mine].tolist()], magnitudes[mine].tolist()))
            _assert_frequencies(observed, _slot(AUTO._AUGMENTATION_SPACE, 10, *sub_policy[slot]), int(mine.sum()))


# ---- 3. outputs distributed as torchvision's per-image transforms give them -----------------

def _assert_same_distribution(ours: collections.Counter, theirs: collections.Counter, n: int):
    """Two samples of n from one discrete distribution: the chi-square homogeneity statistic over the
    outcomes seen 10 times or more (the rest lumped), within 6 standard deviations of its mean."""
    common = [k for k, c in (ours + theirs).items() if c >= 10]
    a = [ours[k] for k in common] + [n - sum(ours[k] for k in common)]
    b = [theirs[k] for k in common] + [n - sum(theirs[k] for k in common)]
    chi2 = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b) if x + y)
    df = len(a) - 1
    assert df > 0 and chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)


def _outputs(images: torch.Tensor) -> collections.Counter:
    return collections.Counter(image.numpy().tobytes() for image in images)


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment"])
def test_output_distribution_of_one_image_matches_torchvision(policy):
    n = 3000
    image = _images(1, seed=5)
    ours_policy, theirs_policy = (AutoAugment(), AUTO) if policy == "autoaugment" else (RandAugment(), RAND)
    torch.manual_seed(2)
    ours = _outputs(ours_policy(image.expand(n, -1, -1, -1).contiguous()))
    theirs = _outputs(torch.stack([theirs_policy(image[0]) for _ in range(n)]))
    assert len(ours) > 50  # many distinct outputs: the comparison below is not about one or two
    _assert_same_distribution(ours, theirs, n)


# ---- 4. random erasing ------------------------------------------------------------------------

def _erased_boxes(outputs: torch.Tensor) -> tuple:
    """(erased, top, left, height, width) of each image erased from all ones; checks each is one box."""
    zero = outputs[:, 0] == 0
    rows, cols = zero.any(2), zero.any(1)
    height, width = rows.sum(1), cols.sum(1)
    assert torch.equal(zero.sum((1, 2)), height * width) and (outputs == 0).all(1).eq(zero).all()
    return zero.any((1, 2)), rows.byte().argmax(1), cols.byte().argmax(1), height, width


def _erase_both(n: int, size=(32, 32), **options) -> tuple:
    ones = torch.ones(n, 3, *size)
    torch.manual_seed(3)
    ours = RandomErasing(**options)(ones)
    theirs = v2.RandomErasing(**options)
    return _erased_boxes(ours), _erased_boxes(torch.stack([theirs(image) for image in ones]))


def test_random_erasing_matches_torchvision_box_by_box_statistics():
    n, side = 20_000, 32
    (erased, top, left, height, width), (t_erased, t_top, t_left, t_height, t_width) = _erase_both(n, p=0.5)
    # How often an image is erased: p (a box that fits is all but certain at these scales), as torchvision.
    assert abs(erased.float().mean() - 0.5) < 5 * math.sqrt(0.25 / n)
    assert abs(erased.float().mean() - t_erased.float().mean()) < 5 * math.sqrt(0.5 / n)
    k = min(int(erased.sum()), int(t_erased.sum()))  # equal sample sizes for the homogeneity statistic
    for ours, theirs in ((height, t_height), (width, t_width), (height * width, t_height * t_width),
                         (height * 100 // width.clamp(min=1), t_height * 100 // t_width.clamp(min=1)),
                         (top, t_top), (left, t_left)):
        _assert_same_distribution(collections.Counter(ours[erased][:k].tolist()),
                                  collections.Counter(theirs[t_erased][:k].tolist()), k)
    # Area within scale=(0.02, 0.33), up to the rounding of each side.
    area = (height * width)[erased] / side ** 2
    assert area.min() > 0.02 * 0.7 and area.max() < 0.33 * 1.3
    # Uniform position: the first and the last possible row (column) each 1 / (number of positions) likely.
    for start, extent in ((top, height), (left, width)):
        start, room = start[erased], side - extent[erased]
        expected = (1.0 / (room + 1)).mean()
        for end in (0, room):
            assert abs((start == end).float().mean() - expected) < 5 * math.sqrt(expected / len(start))
        moved = room > 0
        assert abs((start[moved] / room[moved]).mean() - 0.5) < 5 * math.sqrt(1 / 12 / int(moved.sum()))


def test_random_erasing_gives_up_after_ten_boxes_that_do_not_fit():
    # Boxes of 90..99 pixels, square, in a 10x10 image: one fits (9x9) only when the area is under 90.25,
    # so an image is erased with probability 1 - (1 - 0.25 / 9) ** 10.
    n = 20_000
    (erased, *_, height, width), (t_erased, *_) = _erase_both(n, (10, 10), p=1.0, scale=(0.90, 0.99),
                                                             ratio=(1.0, 1.0))
    expected = 1 - (1 - 0.25 / 9) ** 10
    for rate in (erased.float().mean(), t_erased.float().mean()):
        assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    assert (height[erased] == 9).all() and (width[erased] == 9).all()


def test_erased_pixels_distribution_matches_torchvision():
    n = 20_000
    (*_, height, width), (*_, t_height, t_width) = _erase_both(n, p=0.5)
    _assert_same_distribution(collections.Counter((height * width).tolist()),
                              collections.Counter((t_height * t_width).tolist()), n)


# ---- 5. reproducible, and drawn per image -----------------------------------------------------

@pytest.mark.parametrize("make", [AutoAugment, RandAugment, lambda: RandomErasing(0.5)])
def test_same_seed_same_batch_and_each_image_its_own_draw(make):
    transform = make()
    same = _images(1).expand(256, -1, -1, -1).contiguous()
    if isinstance(transform, RandomErasing):
        same = same.float()
    outputs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        outputs.append(transform(same))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    assert len(_outputs(outputs[0])) > 50


def test_batch_transform_uses_the_batched_policies():
    images = _images(64)
    transform = BatchTransform(32, train=True, padding=0, auto_augment="autoaugment", erasing=0.5)
    assert isinstance(transform.auto_augment, AutoAugment) and isinstance(transform.erasing, RandomErasing)
    assert isinstance(BatchTransform(32, train=True, auto_augment="randaugment").auto_augment, RandAugment)
    assert BatchTransform(32, train=True).auto_augment is None
    torch.manual_seed(6)
    a = transform(images)
    torch.manual_seed(6)
    assert torch.equal(a, transform(images))


class _HostReads(TorchDispatchMode):
    """Records the aten calls that make the host wait for the device: reading a value (.item(), bool(),
    int(), float() all end in _local_scalar_dense), and ops whose output size depends on the data."""

    SIZED_BY_DATA = {"aten.nonzero.default", "aten.masked_select.default", "aten.masked_scatter.default",
                     "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name == "aten._local_scalar_dense.default" or name in self.SIZED_BY_DATA or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_reads_in_the_batched_policies():
    transform = BatchTransform(32, train=True, auto_augment="autoaugment", erasing=0.5)
    other = BatchTransform(32, train=True, auto_augment="randaugment", erasing=0.5)
    images = _images(32)
    transform(images), other(images)  # the tables are made once per device, on first use
    with _HostReads() as reads:
        transform(images), other(images)
    assert reads.calls == []


# ---- on a GPU (marker `gpu`) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_no_sync_and_torchvisions_pixels():
    cuda = torch.device("cuda")
    transform = BatchTransform(32, train=True, auto_augment="autoaugment", erasing=0.5)
    other = BatchTransform(32, train=True, auto_augment="randaugment", erasing=0.5)
    images = _images(256).to(cuda)
    transform(images), other(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        transform(images), other(images)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    pairs = [(name, m) for name in OPS for m in _magnitudes(name, 32, 32)]
    names, magnitudes = [p[0] for p in pairs] * 4, [p[1] for p in pairs] * 4
    batch = _images(len(names), seed=7).to(cuda)
    ours = apply_ops(batch, _ops(names).to(cuda), torch.tensor(magnitudes, dtype=torch.float64, device=cuda))
    assert torch.equal(ours, _torchvision(batch, names, magnitudes))
