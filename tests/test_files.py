"""Files that must never be seen half-written or trusted when damaged: the best model, the decode cache."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from synthetic import write_parquet_dataset
from test_data import cfg
from train.model_files import load_model, save_model
from train.files import atomic_write, umask
from train.data import load_image_data
from train.models import ModelSpec

SPEC = ModelSpec("resnet18", ("a", "b"))


def test_a_failed_model_write_leaves_the_previous_model_intact(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model({"w": torch.ones(3)}, path, SPEC)
    before = path.read_bytes()

    def half_then_fail(tmp):
        tmp.write_bytes(before[:10])  # what a full disk or a kill leaves of a write
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_model(path)[0]["w"], torch.ones(3))


def test_a_corrupt_decode_cache_is_decoded_again_and_replaced(tmp_path):
    root = write_parquet_dataset(tmp_path / "ds", n_train=20, n_test=8)
    cache = tmp_path / "cache"
    first = load_image_data(cfg(root, val_size=0, decode_cache=str(cache)))
    for f in cache.iterdir():  # the images and the remembered image sizes
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a crash mid-write elsewhere
    again = load_image_data(cfg(root, val_size=0, decode_cache=str(cache)))
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.images, first.test.images)
    for f in cache.glob("*.safetensors"):  # rewritten whole
        assert load_file(str(f))["images"].shape[0] in (20, 8)


def test_json_is_strict_with_non_finite_numbers_as_null():
    import json

    from train.files import dumps

    text = dumps({"loss": float("nan"), "history": [{"acc": float("inf")}, {"acc": 0.5}], "n": 3})
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict == {"loss": None, "history": [{"acc": None}, {"acc": 0.5}], "n": 3}


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_the_best_model_gets_the_mode_the_umask_gives(tmp_path, mask):
    """safetensors writes 0600; the model file gets what any new file gets under the umask (0644 under 022)."""
    saved = os.umask(mask)
    try:
        assert umask() == mask
        save_model({"w": torch.ones(3)}, tmp_path / "model.safetensors", SPEC)
        atomic_write(tmp_path / "notes.txt", lambda tmp: tmp.write_text("x"))
    finally:
        os.umask(saved)
    for name in ("model.safetensors", "notes.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


@pytest.mark.slow
def test_every_file_of_a_run_folder_has_the_umask_mode(trained_run):
    """Weights (model.safetensors, checkpoints' model, best) as readable as the metrics beside them."""
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    assert {"model.safetensors", "best.safetensors", "optimizer.bin", "report.md"} <= {p.name for p in files}
    modes = {str(p.relative_to(trained_run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask())}, modes
