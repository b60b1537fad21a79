"""W&B through real offline run files, read back with W&B's own `wandb leet inspect`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, MAIN, check, child_env, read_metrics, read_summary, run_main

pytestmark = pytest.mark.slow
CLASSES = ["red", "green", "blue", "yellow"]


def wandb_cli(*args) -> str:
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True, timeout=120).stdout


def offline_runs(wandb_dir):
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def history(run_dir) -> list:
    records = [json.loads(line) for line in wandb_cli("leet", "inspect", "--json", str(run_dir)).splitlines()
               if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def summary(run_dir) -> dict:
    return json.loads(wandb_cli("leet", "inspect", "--summary", "--json", str(run_dir)))


def offline_args(dataset, out):
    return ["--dataset", str(dataset), "--output-dir", str(out), *FAST, "--wandb-mode", "offline"]


def check_run_contents(run_dir, epochs=3):
    info = summary(run_dir)
    assert info["config"]["arch"] == "resnet18" and info["config"]["world_size"] >= 1
    assert not any("key" in k.lower() for k in info["config"])
    rows = history(run_dir)
    per_epoch = ["epoch", "train/epoch_loss", "train/epoch_acc", "val/loss", "val/acc", "val/f1_macro",
                 "epoch_seconds", *[f"val/acc_{c}" for c in CLASSES]]
    for key in per_epoch:
        assert len([r for r in rows if key in r]) == epochs, key
    assert any("train/loss" in r and "train/lr" in r and "train/images_per_second" in r for r in rows)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps)
    final = info["summary"]
    for key in ("test/acc", "test/f1_macro", "test/loss", "best_epoch", "wall_seconds",
                *[f"test/acc_{c}" for c in CLASSES]):
        assert key in final, key
    assert final["test/per_class"]["_type"] == "table-file"
    assert {"plots/loss", "plots/accuracy", "plots/confusion_matrix"} <= set(final)
    return info


def test_offline_run_has_config_curves_test_metrics_and_per_class(dataset_dir, tmp_path):
    out = tmp_path / "run"
    check(run_main(offline_args(dataset_dir, out), env={"WANDB_DIR": str(tmp_path / "wb")}))
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 1
    info = check_run_contents(runs[0])
    local = read_summary(out)
    assert info["summary"]["test/acc"] == pytest.approx(local["test_acc"])
    assert info["summary"]["best_epoch"] == local["best_epoch"]
    assert [r["val/f1_macro"] for r in history(runs[0]) if "val/f1_macro" in r] == \
           pytest.approx([r["val_f1_macro"] for r in read_metrics(out)])
    assert info["name"] == "resnet18-lr0.02-bs32"


@pytest.mark.ddp
def test_ddp_makes_exactly_one_wandb_run(dataset_dir, tmp_path):
    check(run_main(offline_args(dataset_dir, tmp_path / "run"), processes=2, env={"WANDB_DIR": str(tmp_path / "wb")}))
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 1
    assert check_run_contents(runs[0])["config"]["world_size"] == 2


def test_unreachable_wandb_never_fails_the_run(dataset_dir, tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_DIR": str(tmp_path / "wb"), "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40,
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST], env=env))
    assert "warning: W&B: could not start the run" in proc.stderr
    assert len(read_metrics(out)) == 3 and "test_f1_macro" in read_summary(out)


def test_resumed_run_continues_the_same_wandb_run(dataset_dir, tmp_path):
    out, wb = tmp_path / "run", tmp_path / "wb"
    run_args = [*offline_args(dataset_dir, out), "--resume", "auto", "--checkpoint-every-steps", "3"]
    killed = run_main(run_args, env={"WANDB_DIR": str(wb), "CIFAR_ACCELERATE_FAILPOINT": "kill_after_step:13"})
    assert killed.returncode != 0
    check(run_main(run_args, env={"WANDB_DIR": str(wb)}))
    first, second = offline_runs(wb)
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    for run in (first, second):
        assert [p.name for p in run.glob("*.wandb")] == [f"run-{run_id}.wandb"]
    assert summary(second)["run_id"] == run_id
    # The resumed run refills the epochs of its checkpoint (what a killed process may not have flushed),
    # then logs from the checkpoint's step 12 on, in increasing steps; W&B keeps the first copy of a step.
    steps = [r["_step"] for r in history(second)]
    assert steps == sorted(steps) and steps[-1] == 24
    assert [r["_step"] for r in history(second) if "train/loss" in r][0] > 12
    epochs = {r["epoch"] for r in history(first) + history(second) if "val/f1_macro" in r}
    assert epochs == {1, 2, 3}


def test_disabled_wandb_is_never_imported_and_leaves_no_folder(dataset_dir, tmp_path):
    out = tmp_path / "run"
    code = (f"import runpy, sys\nMAIN_PATH = {MAIN!r}\n"
            f"sys.argv = ['train/main.py', '--dataset', {str(dataset_dir)!r}, '--output-dir', {str(out)!r}, "
            "'--arch', 'resnet18', '--epochs', '1', '--no-wandb']\n"
            "try:\n    runpy.run_path(MAIN_PATH, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('WANDB_IMPORTED' if 'wandb' in sys.modules else 'WANDB_NOT_IMPORTED')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(WANDB_MODE=""),
                          capture_output=True, text=True, timeout=300)
    assert "WANDB_NOT_IMPORTED" in proc.stdout, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("wandb")) and not (out / "wandb.json").exists()
