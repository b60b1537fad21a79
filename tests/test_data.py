import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synthetic import CLASS_NAMES, make_images, write_parquet_dataset
from train.data import load_image_data
from train.errors import UsageError


def cfg(dataset, **kw):
    base = dict(dataset=str(dataset), image_column="", label_column="", val_size=0.1, seed=0, decode_cache="off",
                val_images=0, train_images=0, skip_bad_images=False, decode_size=0, image_size=32)
    base.update(kw)
    return SimpleNamespace(**base)


def test_parquet_in_hub_layout(dataset_dir):
    data = load_image_data(cfg(dataset_dir))
    assert data.class_names == CLASS_NAMES
    assert data.train.images.shape == (230, 3, 32, 32) and data.train.images.dtype.is_floating_point is False
    assert len(data.val) == 26 and len(data.test) == 101
    # Stratified: every class is in the validation part in proportion.
    assert np.bincount(data.val.labels.numpy(), minlength=4).min() >= 6


def test_split_is_fixed_by_seed(dataset_dir):
    a = load_image_data(cfg(dataset_dir, seed=1))
    b = load_image_data(cfg(dataset_dir, seed=1))
    c = load_image_data(cfg(dataset_dir, seed=2))
    # The same seed holds out the same images (with their labels) and trains on the same others.
    assert (a.val.images == b.val.images).all() and (a.val.labels == b.val.labels).all()
    assert (a.train.images == b.train.images).all() and (a.train.labels == b.train.labels).all()
    assert not (a.val.images == c.val.images).all()


def test_val_size_zero_validates_on_test(dataset_dir):
    data = load_image_data(cfg(dataset_dir, val_size=0))
    assert len(data.train) == 256 and data.val is data.test
    assert "test split" in data.val_source


def test_decoded_pixels_are_the_images(tmp_path):
    root = write_parquet_dataset(tmp_path / "ds", n_train=8, n_test=4)
    data = load_image_data(cfg(root, val_size=0))
    images, _ = make_images(4, seed=1)
    assert np.array_equal(data.test.images[0].permute(1, 2, 0).numpy(), images[0])  # PNG is lossless


def test_imagefolder_and_save_to_disk(tmp_path):
    images, labels = make_images(12, seed=0)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = tmp_path / "folder" / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    data = load_image_data(cfg(tmp_path / "folder", val_size=0))
    assert sorted(data.class_names) == sorted(CLASS_NAMES) and len(data.test) == 12

    ds = datasets.load_dataset(str(write_parquet_dataset(tmp_path / "pq", n_train=20, n_test=8)))
    ds.save_to_disk(str(tmp_path / "disk"))
    data = load_image_data(cfg(tmp_path / "disk", val_size=0))
    assert data.class_names == CLASS_NAMES and len(data.train) == 20


def test_columns_found_by_feature_type_or_named(tmp_path):
    ds = datasets.load_dataset(str(write_parquet_dataset(tmp_path / "pq", n_train=20, n_test=8)))
    ds = ds.rename_columns({"img": "picture", "label": "kind"})
    ds.save_to_disk(str(tmp_path / "renamed"))
    assert len(load_image_data(cfg(tmp_path / "renamed", val_size=0)).test) == 8
    data = load_image_data(cfg(tmp_path / "renamed", val_size=0, image_column="picture", label_column="kind"))
    assert data.class_names == CLASS_NAMES
    with pytest.raises(UsageError, match="no image column photo"):
        load_image_data(cfg(tmp_path / "renamed", image_column="photo"))


def test_dataset_without_image_column(tmp_path):
    plain = datasets.DatasetDict({s: datasets.Dataset.from_dict({"x": [1, 2], "label": [0, 1]}).cast_column(
        "label", datasets.ClassLabel(names=["a", "b"])) for s in ("train", "test")})
    plain.save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(UsageError, match="no image column"):
        load_image_data(cfg(tmp_path / "noimg"))


def test_label_column_that_is_not_a_classlabel(tmp_path):
    ds = datasets.load_dataset(str(write_parquet_dataset(tmp_path / "pq", n_train=20, n_test=8)))
    ds = ds.cast_column("label", datasets.Value("int64"))
    ds.save_to_disk(str(tmp_path / "intlabels"))
    with pytest.raises(UsageError, match="no label column"):
        load_image_data(cfg(tmp_path / "intlabels"))
    with pytest.raises(UsageError, match="not a ClassLabel"):
        load_image_data(cfg(tmp_path / "intlabels", label_column="label"))


def write_out_of_range_labels(root: Path) -> Path:
    """Parquet whose metadata declares 4 classes but whose labels reach 5 (as a broken export would)."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    meta = {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):
        images, labels = make_images(20, seed=0)
        encoded = [datasets.Image().encode_example(Image.fromarray(a)) for a in images]
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table = pa.table({"img": pa.array(encoded, type=image_type),
                          "label": pa.array([min(5, label + 2) for label in labels], type=pa.int64())})
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_labels_outside_the_class_range(tmp_path):
    with pytest.raises(UsageError, match="outside the 4 classes"):
        load_image_data(cfg(write_out_of_range_labels(tmp_path / "bad")))


def test_missing_path(tmp_path):
    with pytest.raises(UsageError, match="nothing/here: no such folder"):
        load_image_data(cfg(tmp_path / "nothing" / "here"))


def test_decode_cache_is_used_and_rebuilt_when_the_data_changes(tmp_path, monkeypatch):
    root = write_parquet_dataset(tmp_path / "ds", n_train=20, n_test=8, seed=0)
    cache = tmp_path / "cache"
    first = load_image_data(cfg(root, val_size=0, decode_cache=str(cache)))
    assert len(list(cache.glob("*.safetensors"))) == 2  # train and test (and their image sizes, as JSON)

    import train.decode
    monkeypatch.setattr(train.decode, "decode_all", lambda *a: pytest.fail("decoded although cached"))
    monkeypatch.setattr(train.decode, "common_size", lambda *a: pytest.fail("sizes read although cached"))
    again = load_image_data(cfg(root, val_size=0, decode_cache=str(cache)))
    assert (again.train.images == first.train.images).all()
    monkeypatch.undo()

    write_parquet_dataset(root, n_train=20, n_test=8, seed=5)  # same files, new images
    changed = load_image_data(cfg(root, val_size=0, decode_cache=str(cache)))
    images, _ = make_images(8, seed=6)
    assert np.array_equal(changed.test.images[0].permute(1, 2, 0).numpy(), images[0])
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_exact_validation_and_training_sizes(dataset_dir):
    data = load_image_data(cfg(dataset_dir, val_images=40, train_images=100))
    assert len(data.val) == 40 and len(data.train) == 100
    assert np.bincount(data.val.labels.numpy(), minlength=4).tolist() == [10, 10, 10, 10]
    assert "40 images held out" in data.val_source and "training uses 100 of the other 216" in data.val_source
    with pytest.raises(UsageError, match="cannot split 256 training images"):
        load_image_data(cfg(dataset_dir, val_images=300))


@pytest.mark.parametrize("sizes", [dict(), dict(val_images=40, train_images=100), dict(val_size=0)],
                         ids=["val-size", "train-images", "no-val"])
def test_the_split_parts_are_the_rows_asked_for_in_one_decoded_tensor(dataset_dir, sizes):
    """Train and validation are the rows train_test_split picks, in its order, as views of the one decoded
    train tensor (no second copy of it: decode's memory check counts one)."""
    from sklearn.model_selection import train_test_split

    options = cfg(dataset_dir, **sizes)
    data = load_image_data(options)
    whole = load_image_data(cfg(dataset_dir, val_size=0.0)).train  # every train row, in the dataset's order
    assert len(whole) == 256
    rest, labels = np.arange(256), whole.labels.numpy()
    held_out = options.val_images or options.val_size
    if held_out:
        rest, val_idx = train_test_split(rest, test_size=held_out, stratify=labels, random_state=0)
        assert torch.equal(data.val.images, whole.images[val_idx]) and torch.equal(data.val.labels,
                                                                                     whole.labels[val_idx])
        assert data.val.images.untyped_storage().data_ptr() == data.train.images.untyped_storage().data_ptr()
    if options.train_images:
        rest, _ = train_test_split(rest, train_size=options.train_images, stratify=labels[rest], random_state=0)
    assert torch.equal(data.train.images, whole.images[rest]) and torch.equal(data.train.labels, whole.labels[rest])


def test_rows_are_permuted_in_place():
    from train.data import Split

    images = torch.randint(0, 256, (500, 3, 4, 4), dtype=torch.uint8)
    split = Split(images.clone(), torch.arange(500))
    order = np.random.default_rng(0).permutation(500)
    a, b = split.split([order[:300], order[300:450]])  # 50 rows in no part
    assert torch.equal(a.images, images[order[:300]]) and torch.equal(a.labels, torch.as_tensor(order[:300]))
    assert torch.equal(b.images, images[order[300:450]]) and torch.equal(b.labels, torch.as_tensor(order[300:450]))
    assert a.images.data_ptr() == split.images.data_ptr()
