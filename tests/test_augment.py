import pytest
import torch
import torchvision.transforms.v2.functional as TF

from train.augment import MEAN, STD, BatchTransform, crop_flip, random_crop_flip
from train.data import Split, make_loader


def _images(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top, left, flip", [(0, 0, False), (8, 8, True), (3, 5, True), (4, 4, False), (7, 1, False)])
def test_fixed_crop_and_flip_match_torchvision(top, left, flip):
    images = _images(4)
    ours = crop_flip(images, torch.full((4,), top), torch.full((4,), left), torch.full((4,), flip), padding=4)
    theirs = TF.crop(TF.pad(images, [4]), top, left, 32, 32)
    if flip:
        theirs = TF.hflip(theirs)
    assert torch.equal(ours, theirs)


def test_normalisation_and_resize_match_torchvision():
    images = _images(4)
    expected = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), MEAN, STD)
    assert torch.allclose(BatchTransform(32, train=False)(images), expected, atol=1e-6)
    assert BatchTransform(64, train=False)(images).shape == (4, 3, 64, 64)
    assert BatchTransform(224, train=True)(images).shape == (4, 3, 224, 224)


def test_each_image_gets_its_own_crop_and_flip():
    same = _images(1).expand(256, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = random_crop_flip(same)
    distinct = {o.numpy().tobytes() for o in out}
    assert len(distinct) > 100  # 81 offsets x 2 flips = 162 possibilities


def test_crop_offsets_and_flips_are_uniform_like_torchvision():
    # A single bright pixel reveals each sample's offset and flip.
    n, padding = 20000, 4
    images = torch.zeros(n, 1, 9, 9, dtype=torch.uint8)
    images[:, :, 4, 4] = 255
    torch.manual_seed(1)
    out = random_crop_flip(images, padding)
    visible = out.flatten(1).amax(1) > 0
    # The pixel stays in view for every offset (it is the centre and padding < 5).
    assert visible.all()
    cols = out[:, 0].amax(1).argmax(1)  # column of the pixel: 4 + (4 - offset_x), mirrored when flipped
    counts = torch.bincount(cols, minlength=9).float() / n
    assert torch.allclose(counts, torch.full((9,), 1 / 9), atol=0.02)
    rows = out[:, 0].amax(2).argmax(1)
    assert torch.allclose(torch.bincount(rows, minlength=9).float() / n, torch.full((9,), 1 / 9), atol=0.02)


def test_flips_happen_half_the_time():
    images = torch.zeros(20000, 1, 4, 4, dtype=torch.uint8)
    images[:, :, :, 0] = 255  # left column bright
    torch.manual_seed(2)
    out = random_crop_flip(images, padding=0)
    flipped = (out[:, 0, 0, 3] == 255).float().mean()
    assert abs(flipped - 0.5) < 0.02


def test_same_seed_same_augmentation():
    images = _images(32)
    torch.manual_seed(7)
    a = BatchTransform(32, train=True)(images)
    torch.manual_seed(7)
    b = BatchTransform(32, train=True)(images)
    torch.manual_seed(8)
    c = BatchTransform(32, train=True)(images)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loader_keeps_labels_with_their_images():
    labels = torch.arange(100) % 7
    images = labels.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).to(torch.uint8).contiguous()  # pixel value = label
    loader = make_loader(Split(images, labels), batch_size=16, shuffle_seed=3)
    seen = []
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y)
        seen.append(y)
    assert torch.cat(seen).sort().values.tolist() == labels.sort().values.tolist()


def test_shuffle_order_depends_only_on_seed_and_epoch():
    split = Split(torch.zeros(50, 3, 2, 2, dtype=torch.uint8), torch.arange(50))

    def order(seed, epoch):
        loader = make_loader(split, batch_size=50, shuffle_seed=seed)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1].tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


def test_autoaugment_and_randaugment_draw_per_image():
    same = _images(1).expand(64, -1, -1, -1).contiguous()
    for policy in ("autoaugment", "randaugment"):
        torch.manual_seed(0)
        x = BatchTransform(32, train=True, padding=0, auto_augment=policy)(same)
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
        assert len({image.numpy().tobytes() for image in x}) > 20  # not one op for the whole batch


def test_random_erasing_erases_some_images_only():
    images = torch.full((400, 3, 32, 32), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    x = BatchTransform(32, train=True, padding=0, erasing=0.5)(images)
    plain = BatchTransform(32, train=False)(images[:1])[0]
    erased = torch.tensor([not torch.allclose(image, plain) for image in x]).float().mean()
    assert 0.4 < erased < 0.6  # flips change nothing on a flat image; erasing does, with probability 0.5


# alpha 1: the weight is uniform in (0, 1), so one batch is visibly mixed (MixUp draws one weight a batch).
@pytest.mark.parametrize("mix", [dict(mixup=1.0), dict(cutmix=1.0), dict(mixup=1.0, cutmix=1.0)])
def test_mixup_cutmix_soft_targets_stay_with_their_images(mix):
    labels = torch.randint(0, 10, (64,))
    images = (labels * 20).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).to(torch.uint8).contiguous()
    torch.manual_seed(0)
    x, targets = BatchTransform(32, train=True, padding=0, num_classes=10, **mix).train_batch(images, labels)
    assert targets.shape == (64, 10) and torch.allclose(targets.sum(1), torch.ones(64))
    partner = labels.roll(1)  # torchvision mixes each image with the previous one in the batch
    normalised = ((labels * 20).float() / 255 - MEAN[0]) / STD[0]  # channel 0 of each (flat) image
    mixed = 0
    for i in range(64):
        support = set(torch.nonzero(targets[i] > 1e-6).flatten().tolist())
        assert support <= {labels[i].item(), partner[i].item()}
        if labels[i] == partner[i]:
            continue
        # Share of image i in the pixels: MixUp's weight in every pixel, CutMix's fraction of the area
        # left outside the box. The soft target must give its label exactly that weight.
        own, other = normalised[i], normalised[(i - 1) % 64]
        share = ((x[i, 0] - other) / (own - other)).mean()
        assert targets[i, labels[i]] == pytest.approx(share.item(), abs=1e-4)
        assert targets[i, partner[i]] == pytest.approx(1 - share.item(), abs=1e-4)
        mixed += 0.01 < share < 0.99
    assert mixed > 10  # images were really mixed, not passed through with their own label


def test_tta_averages_the_softmax_of_each_image_and_its_mirror_image():
    from accelerate import Accelerator

    from train.loop import evaluate

    class Halves(torch.nn.Module):
        """Class 0: bright left half, 1: bright right half, 2: bright on both sides (weaker evidence)."""

        def forward(self, x):
            left, right = x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))
            return torch.stack([2 * left, 2 * right, 1.7 * (left + right)], 1)

    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    images[:3, :, :, :16] = 255  # bright left: plain prediction 0; its mirror image says 1
    images[3:, :, :, 16:] = 255  # bright right: plain 1, mirror 0
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_loader(Split(images, torch.zeros(6, dtype=torch.long)), 4))
    transform = BatchTransform(32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixel values 0..1
    result = evaluate(accelerator, Halves(), loader, transform, tta=True)
    assert result.preds.tolist() == [0, 0, 0, 1, 1, 1]
    # softmax([2, 0, 1.7]) + softmax([0, 2, 1.7]) puts class 2 first: only the mean over both views does.
    assert result.preds_tta.tolist() == [2] * 6

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(torch.zeros(1, 3, 32, 32))
    random = _images(64)
    loader = accelerator.prepare(make_loader(Split(random, torch.zeros(64, dtype=torch.long)), 16))
    result = evaluate(accelerator, model, loader, BatchTransform(32), tta=True)
    with torch.no_grad():
        x = BatchTransform(32)(random)
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)).argmax(1)
    assert result.preds_tta.tolist() == expected.tolist() and (result.preds_tta != result.preds).any()