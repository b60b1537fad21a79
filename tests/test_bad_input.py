"""Each kind of bad input: one line on stderr naming the problem, exit status 2, no traceback.

What train/main.py does with each case is checked in this process (main_in_process); that the process itself
exits 2 with that one line, by one real cold start (test_a_real_process_exits_2_with_the_line)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MAIN, ROOT, child_env, main_in_process
from test_data import write_out_of_range_labels

CASES = {
    "unknown arch": (["--arch", "mobilenet_v5"], {}, "unknown --arch 'mobilenet_v5'; did you mean mobilenet_v2"),
    "missing dataset": (["--dataset", "{tmp}/no/such/dataset"], {}, "--dataset {tmp}/no/such/dataset: no such folder"),
    # A mistyped folder is named with what is there, not taken for a Hub id.
    "mistyped dataset": (["--dataset", "{tmp}/data/cifar01"], {}, "no such folder; did you mean {tmp}/data/cifar10?"),
    "hub unreachable": (["--dataset", "someone/cifar10"], {}, "could not load dataset someone/cifar10: "
                        "ConnectionError: Couldn't reach 'someone/cifar10' on the Hub (OfflineModeIsEnabled); give a "
                        "local folder instead, or fetch it once where there is network: python -c \"import datasets; "
                        "datasets.load_dataset('someone/cifar10').save_to_disk('data/cifar10')\" and pass --dataset "
                        "data/cifar10"),
    "unknown option": (["--epohs", "3"], {}, "unrecognized arguments: --epohs 3; did you mean --epochs?"),
    "option of another trainer": (["--learning-rate", "0.1"], {}, "--learning-rate 0.1; did you mean --lr?"),
    "empty choice": (["--wandb-mode", "on"], {}, "--wandb-mode must be one of online, offline, disabled, got 'on'"),
    "no image column": (["--dataset", "{noimg}"], {}, "no image column"),
    "labels out of range": (["--dataset", "{badlabels}"], {}, "outside the 4 classes"),
    "batch size": (["--batch-size", "0"], {}, "--batch-size must be positive"),
    "epochs": (["--epochs", "0"], {}, "--epochs must be positive"),
    "lr": (["--lr", "-0.1"], {}, "--lr must be positive"),
    "val size": (["--val-size", "1.0"], {}, "--val-size must be in [0, 1)"),
    "fp16 on cpu": (["--dataset", "{good}"], {"ACCELERATE_MIXED_PRECISION": "fp16", "CUDA_VISIBLE_DEVICES": ""},
                    "use --mixed_precision bf16"),
    "config unknown key": (["--config", "{badconfig}"], {}, "unknown key 'learning_rate'; did you mean lr?"),
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
    (tmp / "data" / "cifar10").mkdir(parents=True)
    return {"tmp": tmp, "noimg": noimg, "badlabels": write_out_of_range_labels(tmp / "badlabels"),
            "good": dataset_dir, "badconfig": tmp / "bad.yaml"}


def case_args(places, name):
    args, env, _ = CASES[name]
    argv = [a.format(**places) for a in args] + ["--output-dir", str(places["tmp"] / "runs" / name.replace(" ", "-"))]
    return argv, {k: v.format(**places) for k, v in env.items()}


def assert_one_clear_line(proc, name, places):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert CASES[name][2].format(**places) in lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(places, case):
    argv, env = case_args(places, case)
    proc = main_in_process(argv, env=env)
    assert_one_clear_line(proc, case, places)
    out = Path(argv[-1])
    assert not (out.is_dir() and not any(out.iterdir())), "an empty run folder was left behind"


@pytest.mark.slow
def test_a_real_process_exits_2_with_the_line(places):
    argv, env = case_args(places, "labels out of range")
    proc = subprocess.run([sys.executable, MAIN, *argv], cwd=ROOT, env=child_env(**env), capture_output=True,
                          text=True, timeout=300)
    assert_one_clear_line(proc, "labels out of range", places)


HEAVY = ("torch", "torchvision", "accelerate", "datasets", "huggingface_hub")


@pytest.fixture
def heavy_imports_fail(tmp_path):
    """A PYTHONPATH whose sitecustomize makes importing torch, torchvision, Accelerate, datasets or huggingface_hub
    fail (their files can still be found and read): a command that answers did not spend the seconds of importing
    them, nor ask the Hub."""
    (tmp_path / "sitecustomize.py").write_text(f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r} and not getattr(self, "looking", False):
            self.looking = True
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.looking = False
            if spec is not None:
                spec.loader = self
            return spec

    def exec_module(self, module):
        raise ImportError(f"{{module.__name__}} was imported")

import importlib.util
sys.meta_path.insert(0, Refuse())
""")
    return str(tmp_path)


@pytest.mark.parametrize("args, status, expected", [
    (["--help"], 0, "Mixed precision and the number of processes come from `accelerate launch`"),
    (["--dataset", "data/cifar01"], 2, "error: --dataset data/cifar01: no such folder; did you mean data/cifar10?"),
    (["--arch", "mobilenetv2"], 2, "error: unknown --arch 'mobilenetv2'; did you mean mobilenet_v2"),
    (["--lr", "0"], 2, "error: --lr must be positive"),
])
def test_help_and_bad_input_answer_before_torch_is_imported(places, heavy_imports_fail, args, status, expected):
    # Run where `data/cifar10` exists: `data/cifar01` is then a mistyped path, decided with the Hub unreachable.
    env = child_env(PYTHONPATH=heavy_imports_fail, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                    HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, MAIN, *args], cwd=places["tmp"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert expected in (proc.stdout if status == 0 else proc.stderr)
    assert "was imported" not in proc.stderr
