"""Each kind of bad input: one line on stderr naming the problem, exit status 2, no traceback.

What train/main.py does with each case is checked in this process (main_in_process); that the process itself
exits 2 with that one line, by one real cold start (test_a_real_process_exits_2_with_the_line)."""

import subprocess
import sys

import pytest

from conftest import MAIN, ROOT, child_env, main_in_process
from test_data import write_out_of_range_labels

CASES = {
    "unknown arch": (["--arch", "mobilenet_v5"], {}, "unknown --arch 'mobilenet_v5'; did you mean mobilenet_v2"),
    "missing dataset": (["--dataset", "{tmp}/no/such/dataset"], {}, "does not exist"),
    "no image column": (["--dataset", "{noimg}"], {}, "no image column"),
    "labels out of range": (["--dataset", "{badlabels}"], {}, "outside the 4 classes"),
    "batch size": (["--batch-size", "0"], {}, "--batch-size must be positive"),
    "epochs": (["--epochs", "0"], {}, "--epochs must be positive"),
    "lr": (["--lr", "-0.1"], {}, "--lr must be positive"),
    "val size": (["--val-size", "1.0"], {}, "--val-size must be in [0, 1)"),
    "fp16 on cpu": (["--dataset", "{good}"], {"ACCELERATE_MIXED_PRECISION": "fp16", "CUDA_VISIBLE_DEVICES": ""},
                    "use --mixed_precision bf16"),
    "config unknown key": (["--config", "{badconfig}"], {}, "unknown key 'learning_rate'"),
    "sync-bn on cpu": (["--dataset", "{good}", "--arch", "resnet18", "--sync-bn"], {"CUDA_VISIBLE_DEVICES": ""},
                       "--sync-bn needs GPUs"),
    "compile mode without compile": (["--compile-mode", "reduce-overhead"], {}, "needs --compile"),
    "cuda graphs on cpu": (["--dataset", "{good}", "--arch", "resnet18", "--compile", "--compile-mode",
                            "reduce-overhead"], {"CUDA_VISIBLE_DEVICES": ""}, "captures CUDA graphs: it needs a GPU"),
    # Checked before the device: the same on a GPU, where the second micro-batch would read overwritten gradients.
    "cuda graphs with accumulation": (["--compile", "--compile-mode", "reduce-overhead", "--grad-accum-steps", "2"],
                                      {}, "(CUDA graphs) cannot accumulate gradients"),
    "mixup alpha": (["--mixup-alpha", "-1"], {}, "--mixup-alpha must be >= 0"),
    # torchvision downloads ImageNet weights at run time; with no route out that must be one line too.
    "pretrained offline": (["--dataset", "{good}", "--arch", "resnet18", "--pretrained"],
                           {"TORCH_HOME": "{tmp}/torch-home", "https_proxy": "http://127.0.0.1:9",
                            "HTTPS_PROXY": "http://127.0.0.1:9"}, "could not download ImageNet weights for resnet18"),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory, dataset_dir):
    import datasets

    tmp = tmp_path_factory.mktemp("bad")
    noimg = tmp / "noimg"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"x": [1, 2], "label": [0, 1]}).cast_column(
        "label", datasets.ClassLabel(names=["a", "b"])) for s in ("train", "test")}).save_to_disk(str(noimg))
    (tmp / "bad.yaml").write_text("learning_rate: 0.1\n")
    return {"tmp": tmp, "noimg": noimg, "badlabels": write_out_of_range_labels(tmp / "badlabels"),
            "good": dataset_dir, "badconfig": tmp / "bad.yaml"}


def case_args(places, name):
    args, env, _ = CASES[name]
    argv = [a.format(**places) for a in args] + ["--output-dir", str(places["tmp"] / "runs" / name.replace(" ", "-"))]
    return argv, {k: v.format(**places) for k, v in env.items()}


def assert_one_clear_line(proc, name):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert CASES[name][2] in lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(places, case):
    argv, env = case_args(places, case)
    proc = main_in_process(argv, env=env)
    assert_one_clear_line(proc, case)


@pytest.mark.slow
def test_a_real_process_exits_2_with_the_line(places):
    argv, env = case_args(places, "labels out of range")
    proc = subprocess.run([sys.executable, MAIN, *argv], cwd=ROOT, env=child_env(**env), capture_output=True,
                          text=True, timeout=300)
    assert_one_clear_line(proc, "labels out of range")
