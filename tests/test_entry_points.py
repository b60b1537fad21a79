"""The commands start without editing sys.path: as a script (`train/main.py`) and as modules (`-m train.main`)."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT, child_env

TRAIN = ROOT / "train"


def test_no_module_of_train_shadows_a_top_level_module():
    """`python train/main.py` puts train/ first on sys.path: a train/logging.py or train/types.py would replace
    the standard library's module for every import in the process."""
    names = sorted(p.stem for p in TRAIN.glob("*.py") if p.stem != "__init__")
    code = f"import importlib.util; print([n for n in {names!r} if importlib.util.find_spec(n)])"
    # -P: without the current folder on sys.path, so only the standard library and installed packages are seen.
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_no_entry_point_edits_sys_path():
    for path in [*TRAIN.glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path.relative_to(ROOT)} line {node.lineno} uses sys.path")


@pytest.mark.parametrize("command", [["train/main.py"], ["-m", "train.main"], ["-m", "train.predict"],
                                     ["-m", "train.export"], ["-m", "train.compare"], ["-m", "train.sweep_summary"],
                                     ["-m", "train.sweep"]])
def test_every_command_starts(command):
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def test_main_without_the_package_installed_says_how_to_fix_it():
    # -S: no site-packages, so neither the editable install of `train` nor anything else is importable;
    # -I: nor PYTHONPATH.
    proc = subprocess.run([sys.executable, "-I", "-S", "train/main.py", "--help"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: the `train` package is not importable: install the project")
