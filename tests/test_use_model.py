"""Use a trained model: `python -m train.predict` reproduces the run's test metrics, `python -m train.export`
writes an ONNX file that agrees with PyTorch, for each tested arch, with the CIFAR stem on and off among them."""

import csv
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import call, read_summary
from synthetic import CLASS_NAMES, make_images
from train.model_files import save_model
from train.export import compare_logits
from train.predict import confusion_lines
from train.models import ModelSpec


@pytest.mark.slow
def test_predict_on_the_test_split_reproduces_the_run(trained_run, dataset_dir, tmp_path):
    proc = call("train.predict", trained_run, "--dataset", dataset_dir, "--split", "test", "--top-k", "2",
                  "--metrics", tmp_path / "metrics.json")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["input", "class1", "prob1", "class2", "prob2"] and len(rows) == 102
    assert all(row[1] in CLASS_NAMES and 0 <= float(row[4]) <= float(row[2]) <= 1 for row in rows[1:])
    metrics, summary = json.loads((tmp_path / "metrics.json").read_text()), read_summary(trained_run)
    assert metrics["acc"] == summary["test_acc"] and metrics["f1_macro"] == summary["test_f1_macro"]
    assert metrics["confusion_matrix"] == summary["confusion_matrix"]
    assert f"accuracy {summary['test_acc']:.4f}, macro-F1 {summary['test_f1_macro']:.4f}" in proc.stderr
    # The confusion matrix as a table: rows true class, columns predicted; no line of hundreds of characters.
    lines = proc.stderr.splitlines()
    start = lines.index("confusion matrix (rows: true class; columns: predicted class, numbered as the rows):")
    assert lines[start + 1].split() == ["0", "1", "2", "3"]
    rows = [line.split() for line in lines[start + 2:start + 6]]
    assert [row[:2] for row in rows] == [[str(i), name] for i, name in enumerate(CLASS_NAMES)]
    assert [list(map(int, row[2:])) for row in rows] == summary["confusion_matrix"]
    assert max(map(len, lines)) <= 100


@pytest.mark.slow
def test_predict_on_files_and_folders_goes_on_past_an_unreadable_one(trained_run, tmp_path):
    images, labels = make_images(6, seed=11)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels).save(tmp_path / "in" / ("sub" if i % 2 else "") / f"{i}.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    proc = call("train.predict", trained_run, tmp_path / "in", "--out", tmp_path / "out.csv", "--top-k", "9")
    assert proc.returncode == 1  # documented: some input could not be read
    broken = [line for line in proc.stderr.splitlines() if "broken.png" in line]
    assert len(broken) == 1 and broken[0].startswith(f"warning: predict, image file {tmp_path / 'in' / 'broken.png'}: "
                                                     "undecodable image skipped") and " row " not in broken[0]
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(rows) == 6 and set(rows[0]) == {"input", *(f"{k}{i}" for i in range(1, 5) for k in ("class", "prob"))}
    predicted = {row["input"].rsplit("/", 1)[-1]: row["class1"] for row in rows}
    right = sum(predicted[f"{i}.png"] == CLASS_NAMES[label] for i, label in enumerate(labels))
    assert right >= 5  # the trained run tells the colours apart


@pytest.mark.slow
def test_predict_bad_inputs_are_one_line(trained_run, tmp_path):
    for args in ([tmp_path / "missing-run", tmp_path], [trained_run, tmp_path / "nothing.png"], [trained_run]):
        proc = call("train.predict", *args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# Each arch once, the stem on and off among them: on MobileNets the CIFAR stem only changes strides; ResNet's, the
# one that changes layers (a 3x3 first convolution, no max-pool), is exported with it.
@pytest.mark.slow
@pytest.mark.parametrize("arch, stem", [("mobilenet_v2", False), ("mobilenet_v3_small", True), ("resnet18", True)])
def test_export_agrees_with_pytorch(arch, stem, dataset_dir, tmp_path):
    import onnx
    import onnxruntime

    spec = ModelSpec(arch, tuple(CLASS_NAMES), cifar_stem=stem, image_size=32, decode_size=32)
    torch.manual_seed(0)
    save_model(spec.build().eval().state_dict(), tmp_path / "model.safetensors", spec)
    out = tmp_path / "model.onnx"
    proc = call("train.export", tmp_path / "model.safetensors", "--onnx", out, "--dataset", dataset_dir,
                  "--check", 64)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checked on 64 images: max |logit difference|" in proc.stdout and "top-1 identical on 64/64" in proc.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == CLASS_NAMES and meta["arch"] == arch
    assert json.loads(meta["cifar_stem"]) is stem and json.loads(meta["image_size"]) == 32 and "mean" in meta
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(3, 3, 32, 32).numpy()})[0].shape == (3, 4)  # any batch size


@pytest.mark.slow
def test_export_without_the_extra_names_it(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an import finds where it is not installed
    proc = call("train.export", trained_run, "--onnx", tmp_path / "m.onnx")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        'error: the export extra is not installed: pip install -e ".[export]" (onnx, onnxruntime, onnxscript)'
    assert not (tmp_path / "m.onnx").exists()


def test_a_near_tie_that_flips_within_the_tolerance_is_no_disagreement():
    """The lab's case: largest difference 2e-6, and one image whose top-2 logits were 1.3e-6 apart flipped."""
    expected = np.array([[2.0, 2.0 + 1.3e-6, -1.0], [0.5, 3.0, 1.0], [4.0, 1.0, 0.0]], dtype=np.float64)
    got = expected + np.array([[2e-6, 0, 0], [0, 1e-6, 0], [0, 0, -1e-6]])  # image 0's top-1 flips to class 0
    check = compare_logits(expected, got, tolerance=1e-3)
    assert (check.same, check.decisive, check.n) == (2, 0, 3) and check.max_diff == pytest.approx(2e-6)
    assert check.passed(1e-3)
    flipped = got.copy()
    flipped[2] = [3.9, 4.0, 0.0]  # PyTorch's margin there is 3: a flip is a real error
    check = compare_logits(expected, flipped, tolerance=1e-3)
    assert (check.same, check.decisive) == (1, 1) and not check.passed(1e-3)
    assert not compare_logits(expected, got, tolerance=1e-7).passed(1e-7)  # 2e-6 is beyond this tolerance


@pytest.mark.slow
def test_a_rejected_export_is_not_left_where_a_checked_one_goes(trained_run, dataset_dir, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("an earlier export")
    # Tolerance 0: the trained ResNet's logits (magnitude ~5) differ in their last float32 bits (~1e-6).
    proc = call("train.export", trained_run, "--onnx", out, "--dataset", dataset_dir, "--check", 8,
                "--tolerance", 0)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: the export does not match"), \
        proc.stderr[-2000:]
    assert f"{out} was not written; the rejected graph is {out}.rejected, not to be shipped" in lines[0]
    assert out.read_text() == "an earlier export"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.rejected"]  # no temporary
    import onnxruntime

    onnxruntime.InferenceSession(str(out) + ".rejected", providers=["CPUExecutionProvider"])  # complete, to look into


def test_a_confusion_matrix_too_wide_to_print_is_named_where_it_is():
    lines = confusion_lines([[0] * 40] * 40, [f"class{i}" for i in range(40)], "metrics.json")
    assert lines == ["confusion matrix: 40 x 40 classes, too wide to print (in metrics.json)"]
    assert confusion_lines([[0] * 40] * 40, [f"class{i}" for i in range(40)], "") == \
        ["confusion matrix: 40 x 40 classes, too wide to print (--metrics FILE writes it)"]
