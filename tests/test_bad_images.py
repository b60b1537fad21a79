"""Undecodable images: one line naming dataset, split, row and column, or with --skip-bad-images left out and
counted."""


import pyarrow.parquet as pq
import pytest

from conftest import FAST, check, main_in_process, read_summary
from synthetic import write_parquet_dataset
from test_data import cfg
from train.data import load_image_data
from train.errors import UsageError


def break_image(root, split, row):
    """Truncate the PNG bytes of one row, as a damaged download would leave them."""
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    table = pq.read_table(path)
    images = table.column("img").to_pylist()
    images[row] = {"bytes": images[row]["bytes"][:60], "path": f"{split}/{row:05d}.png"}
    import pyarrow as pa

    column = pa.array(images, type=table.schema.field("img").type)
    pq.write_table(table.set_column(table.schema.get_field_index("img"), "img", column), path)


@pytest.fixture
def bad_dataset(tmp_path):
    root = write_parquet_dataset(tmp_path / "ds")
    break_image(root, "train", 123)
    return root


def test_undecodable_image_names_dataset_split_row_and_column(bad_dataset):
    with pytest.raises(UsageError) as raised:
        load_image_data(cfg(bad_dataset))
    message = str(raised.value)
    assert message.startswith(f"dataset {bad_dataset}, split 'train', column 'img', row 123 (train/00123.png): "
                              "cannot decode the image")
    assert "--skip-bad-images" in message and "\n" not in message


def test_skip_bad_images_leaves_the_row_out(bad_dataset):
    data = load_image_data(cfg(bad_dataset, val_size=0, skip_bad_images=True))
    full = load_image_data(cfg(write_parquet_dataset(bad_dataset.parent / "good"), val_size=0))
    assert data.skipped == {"train": 1, "test": 0} and len(data.train) == 255
    keep = [i for i in range(256) if i != 123]  # the others keep their labels and pixels, in order
    assert (data.train.labels == full.train.labels[keep]).all() and (data.train.images == full.train.images[keep]).all()


@pytest.mark.slow
def test_a_run_stops_with_one_line_or_reports_what_it_skipped(bad_dataset, tmp_path):
    proc = main_in_process(["--dataset", str(bad_dataset), "--output-dir", str(tmp_path / "stopped"), *FAST])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "split 'train', column 'img', row 123" in lines[0], proc.stderr

    out = tmp_path / "skipped"
    check(main_in_process(["--dataset", str(bad_dataset), "--output-dir", str(out), *FAST, "--epochs", "1",
                           "--skip-bad-images"]))
    assert read_summary(out)["skipped_images"] == {"train": 1, "test": 0}
    assert "left out, undecodable (--skip-bad-images): 1 train, 0 test" in (out / "report.md").read_text()
