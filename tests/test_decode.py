"""One size geometry for every split, memory checked before decoding, and parallel decoding equal to serial."""

import io
import re
import subprocess
import sys
import textwrap
import tracemalloc

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import FAST, check, run_main
from test_data import cfg
from train.data import load_image_data
from train.decode import Geometry, decode_all, memory_needed
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
    """The documented geometry, written independently: shorter side to `side`, centre crop."""
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
    needed = memory_needed(256, Geometry(30000, resize=True))  # 691.2 GB of output, and the chunks in flight
    assert needed >= 691.2e9
    with pytest.raises(UsageError, match=r"split 'train', column 'img': decoding 256 images at 30000x30000 needs "
                                         rf"{needed / 1e9:.1f} GB of memory, .* GB is available; use a smaller "
                                         r"--decode-size"):
        load_image_data(cfg(dataset_dir, val_size=0, decode_size=30000))


def encoded_pngs(n, side=None, seed=0):
    """n PNGs of random pixels, as the dataset reader gives them: {"bytes", "path"}; side None: 20-26 x 25."""
    rng = np.random.default_rng(seed)
    raw = []
    for i in range(n):
        buffer = io.BytesIO()
        shape = (side, side, 3) if side else (20 + i % 7, 25, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
        raw.append({"bytes": buffer.getvalue(), "path": None})
    return raw


def spoil(raw, rows):
    """The same list with these rows truncated (undecodable), each named by a path."""
    raw = list(raw)
    for i in rows:
        raw[i] = {"bytes": raw[i]["bytes"][:50], "path": f"x/{i}.png"}
    return raw


def test_parallel_decoding_equals_serial(monkeypatch, capsys):
    import train.decode

    monkeypatch.setattr(train.decode, "CHUNK", 32)  # 10 chunks for 4 worker processes
    raw, geometry = encoded_pngs(300), Geometry(24, resize=True)
    serial, _ = decode_all(raw, geometry, "test", skip_bad=False, workers=1)
    parallel, _ = decode_all(raw, geometry, "test", skip_bad=False, workers=4)
    assert serial.shape == (300, 3, 24, 24) and serial.is_contiguous() and torch.equal(serial, parallel)
    assert np.array_equal(serial[5].permute(1, 2, 0).numpy(), expected(Image.open(io.BytesIO(raw[5]["bytes"])), 24))
    one_bad = spoil(raw, [77])  # an undecodable row in a worker's chunk
    with pytest.raises(UsageError, match=r"^test, row 77 \(x/77.png\): cannot decode the image"):
        decode_all(one_bad, geometry, "test", skip_bad=False, workers=4)
    bad = [0, 77, 78, 150, 299]  # the first, two together, one alone, the last
    capsys.readouterr()
    kept, rows = decode_all(spoil(raw, bad), geometry, "test", skip_bad=True, workers=4)
    parallel_warnings = capsys.readouterr().err
    kept_serially, rows_serially = decode_all(spoil(raw, bad), geometry, "test", skip_bad=True, workers=1)
    assert capsys.readouterr().err == parallel_warnings
    assert re.findall(r"row (\d+) \(x/\d+.png\): undecodable image skipped", parallel_warnings) == [str(i) for i in bad]
    good = [i for i in range(300) if i not in bad]
    assert rows.tolist() == rows_serially.tolist() == good and rows.dtype == torch.long
    assert torch.equal(kept, serial[good]) and torch.equal(kept_serially, serial[good]) and kept.is_contiguous()


def test_workers_are_not_forked_from_this_multi_threaded_process(monkeypatch):
    import os

    import train.decode

    monkeypatch.setattr(train.decode, "CHUNK", 4)  # 2 chunks, 2 workers
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("os.fork() in a multi-threaded process"))
    started, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: started.append(args) or popen(args, **kw))
    images, _ = decode_all(encoded_pngs(8), Geometry(24, resize=True), "test", skip_bad=False, workers=2)
    assert images.shape == (8, 3, 24, 24) and len(started) == 2 and all(a[0] == sys.executable for a in started)


def test_what_a_worker_imports_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, train.decode; print(sorted({'torch', 'datasets', "
                                                 "'accelerate', 'psutil', 'multiprocessing'} & set(sys.modules)))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout == "[]\n", proc.stderr


def test_a_worker_that_dies_is_an_error_not_a_hang(monkeypatch):
    import train.decode

    monkeypatch.setattr(train.decode, "CHUNK", 4)
    popen = subprocess.Popen

    def dead(args, **kw):
        worker = popen(args, **kw)
        worker.kill()
        return worker

    monkeypatch.setattr(subprocess, "Popen", dead)
    with pytest.raises(RuntimeError, match=r"a decode worker failed \(exit statuses \[-9, -9\]"):
        decode_all(encoded_pngs(8), Geometry(24, resize=True), "test", skip_bad=False, workers=2)


THREADED_CHILD = textwrap.dedent("""
    import io, threading
    import numpy as np
    from PIL import Image
    import train.decode
    from train.decode import Geometry, decode_all

    print("main ran")  # as train/main.py imports PyTorch: a worker that re-runs the script pays for it
    if __name__ == "__main__":
        train.decode.CHUNK = 16  # 4 chunks for 2 workers
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread, as PyTorch and pools have
        raw = []
        for i in range(64):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(buffer, format="PNG")
            raw.append({"bytes": buffer.getvalue(), "path": None})
        images, _ = decode_all(raw, Geometry(8, resize=False), "child", skip_bad=False, workers=2)
        assert [int(images[i, 0, 0, 0]) for i in range(64)] == list(range(64))
        print("decoded")
""")


def run_threaded_child(tmp_path, *flags) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(THREADED_CHILD)
    proc = subprocess.run([sys.executable, *flags, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.endswith("decoded\n"), proc.stderr
    return proc


def test_workers_do_not_run_the_main_script_again(tmp_path):
    # multiprocessing's "spawn" and "forkserver" workers do (the fork server's __main__ preload did nothing
    # before Python 3.14), each importing PyTorch again when the script is train/main.py
    assert run_threaded_child(tmp_path).stdout == "main ran\ndecoded\n"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python warns of fork() in a multi-threaded process from 3.12")
def test_a_multi_threaded_process_decodes_in_parallel_without_the_fork_warning(tmp_path):
    # os.fork() clears the warning it raises (-W error cannot make it fail), so the child shows every
    # DeprecationWarning, and its stderr, which its workers share, must not have that one.
    proc = run_threaded_child(tmp_path, "-W", "always::DeprecationWarning")
    assert "multi-threaded, use of fork()" not in proc.stderr, proc.stderr


def reset_peak_rss():
    """Bytes this process has resident, its high-water mark reset to them (Linux); None where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss()
    except OSError:
        return None


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.mark.parametrize("workers", [1, 2])
def test_a_decode_takes_the_memory_it_says_it_needs(monkeypatch, capsys, workers):
    import train.decode

    # Chunks as small against the output as the default chunks against a large split's output (50,000 images
    # at 224 px: 7.5 GB, chunks of 4 MB), so that what is measured is the output and its copies, if any.
    monkeypatch.setattr(train.decode, "CHUNK", 16)
    n, side, bad = 3000, 64, [5, 2000, 2001]
    raw, geometry = spoil(encoded_pngs(n, side), bad), Geometry(side, resize=False)
    output = (n - len(bad)) * 3 * side ** 2
    needed = memory_needed(n, geometry, workers)
    assert n * 3 * side ** 2 <= needed <= 1.1 * n * 3 * side ** 2
    decode_all(raw[:4], geometry, "warm-up", skip_bad=True, workers=workers)  # first-use imports (PyTorch, PIL's)
    capsys.readouterr()
    resident = reset_peak_rss()
    tracemalloc.start()  # numpy registers its arrays' memory with tracemalloc; PyTorch does not (measured by RSS)
    try:
        before = tracemalloc.get_traced_memory()[0]
        images, rows = decode_all(raw, geometry, "test", skip_bad=True, workers=workers)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert images.shape == (n - len(bad), 3, side, side) and len(rows) == n - len(bad)
    assert capsys.readouterr().err.count("undecodable image skipped") == len(bad)
    assert peak > output and abs(peak - needed) < 0.1 * needed, (peak / needed, needed)
    if resident is not None:  # every allocation of this process (PyTorch's, PIL's), as resident memory
        assert peak_rss() - resident < 1.15 * needed, ((peak_rss() - resident) / needed, needed)


@pytest.mark.slow
def test_the_geometry_is_recorded_and_a_large_size_gap_warned_about(dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--image-size", "128",
                           "--epochs", "1", "--max-steps", "1", "--limit-batches", "1"]))
    assert proc.stderr.count("warning: images are decoded at 32x32 and trained at 128x128") == 1
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["environment"]["decoded"] == "as stored: every image is 32x32"
    assert "- decoded: as stored: every image is 32x32" in (out / "report.md").read_text()
