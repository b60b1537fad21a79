"""One size policy for every split, memory checked before decoding, and parallel decoding equal to serial."""

import io

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import FAST, check, run_main
from test_data import cfg
from train.data import load_image_data
from train.decode import Policy, decode_all
from train.errors import UsageError


def write_mixed(root, sizes_train, sizes_test):
    """A hub-layout dataset whose images have the given (width, height) sizes; pixel values encode the row."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    (root / "data").mkdir(parents=True)
    for split, sizes in (("train", sizes_train), ("test", sizes_test)):
        rng = np.random.default_rng(len(sizes))
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        ds = datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(len(sizes))]}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def expected(image: Image.Image, side: int) -> np.ndarray:
    """The documented policy, written independently: shorter side to `side`, centre crop."""
    w, h = image.size
    scale = side / min(w, h)
    resized = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return np.asarray(resized.crop((left, top, left + side, top + side)))


def test_mixed_sizes_are_resized_and_cropped_alike_in_every_split(tmp_path):
    root = write_mixed(tmp_path / "ds", [(40, 30), (32, 32), (30, 50), (32, 32)], [(64, 64), (32, 32)])
    data = load_image_data(cfg(root, val_size=0))
    assert data.train.images.shape == (4, 3, 32, 32) and data.test.images.shape == (2, 3, 32, 32)
    assert data.decoded == "shorter side resized to 32 px, centre-cropped to 32x32"
    raw = datasets.load_dataset(str(root))
    for split, images in (("train", data.train.images), ("test", data.test.images)):
        for i, row in enumerate(raw[split]):
            assert np.array_equal(images[i].permute(1, 2, 0).numpy(), expected(row["img"].convert("RGB"), 32))

    wider = load_image_data(cfg(root, val_size=0, decode_size=48))
    assert wider.train.images.shape[-2:] == (48, 48) and wider.test.images.shape[-2:] == (48, 48)


def test_one_square_size_is_kept_as_stored(dataset_dir):
    data = load_image_data(cfg(dataset_dir, val_size=0, image_size=64))
    assert data.decoded == "as stored: every image is 32x32" and data.train.images.shape[-1] == 32


def test_a_decode_that_cannot_fit_in_memory_is_refused_before_it_starts(dataset_dir):
    with pytest.raises(UsageError, match=r"split 'train', column 'img': decoding 256 images at 30000x30000 needs "
                                         r"691\.2 GB of memory, .* GB is available; use a smaller --decode-size"):
        load_image_data(cfg(dataset_dir, val_size=0, decode_size=30000))


def test_parallel_decoding_equals_serial(monkeypatch):
    import train.decode

    monkeypatch.setattr(train.decode, "CHUNK", 32)  # 10 chunks for 4 worker processes
    rng = np.random.default_rng(0)
    raw = []
    for i in range(300):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + i % 7, 25, 3), dtype=np.uint8)).save(buffer, format="PNG")
        raw.append({"bytes": buffer.getvalue(), "path": None})
    serial, _ = decode_all(raw, Policy(24, resize=True), "test", skip_bad=False, workers=1)
    parallel, _ = decode_all(raw, Policy(24, resize=True), "test", skip_bad=False, workers=4)
    assert torch.equal(serial, parallel)
    raw[77] = {"bytes": raw[77]["bytes"][:50], "path": "x/77.png"}  # an undecodable row in a worker's chunk
    with pytest.raises(UsageError, match=r"^test, row 77 \(x/77.png\): cannot decode the image"):
        decode_all(raw, Policy(24, resize=True), "test", skip_bad=False, workers=4)
    kept, rows = decode_all(raw, Policy(24, resize=True), "test", skip_bad=True, workers=4)
    assert torch.equal(kept, serial[[i for i in range(300) if i != 77]]) and 77 not in rows.tolist()


@pytest.mark.slow
def test_the_policy_is_recorded_and_a_large_size_gap_warned_about(dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--image-size", "128",
                           "--epochs", "1", "--max-steps", "1", "--limit-batches", "1"]))
    assert proc.stderr.count("warning: images are decoded at 32x32 and trained at 128x128") == 1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["environment"]["decoded"] == "as stored: every image is 32x32"
    assert "- decoded: as stored: every image is 32x32" in (out / "report.md").read_text()
