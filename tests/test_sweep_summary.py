import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, child_env
from train.sweep_summary import summarise


@pytest.mark.slow  # needs a trained run
def test_summary_lists_every_run_with_its_state(trained_run, tmp_path):
    sweep = tmp_path / "sweep-7"
    shutil.copytree(trained_run, sweep / "resnet18-lr0.02-bs32")
    preempted = sweep / "resnet34-lr0.1-bs32"
    preempted.mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", preempted / "config.yaml")
    shutil.copy(trained_run / "metrics.jsonl", preempted / "metrics.jsonl")
    (preempted / "PREEMPTED").write_text("SIGUSR1 at step 3\n")
    (sweep / "resnet50-lr0.1-bs32").mkdir()

    rows = {r["run"]: r for r in summarise(sweep)}
    assert rows["resnet18-lr0.02-bs32"]["state"] == "finished"
    assert rows["resnet18-lr0.02-bs32"]["test_acc"] > 0.6 and rows["resnet18-lr0.02-bs32"]["epochs"] == 3
    assert rows["resnet34-lr0.1-bs32"]["state"].startswith("preempted")
    assert rows["resnet50-lr0.1-bs32"]["state"] == "not started"
    table = (sweep / "sweep_summary.md").read_text()
    assert table.count("\n") == 5 and "| not started |" in table
    assert (sweep / "sweep_summary.png").stat().st_size > 1000


def test_missing_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.sweep_summary", str(tmp_path / "nope")], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not a folder of runs" in proc.stderr
