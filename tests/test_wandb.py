"""W&B through real offline run files, read back with W&B's own `wandb leet inspect`.

The end-to-end runs of train/main.py are marked slow; the Tracker tests run the real Tracker, Accelerator
and wandb in offline mode (in this process, or in a child process where the environment matters).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, MAIN, ROOT, check, child_env, read_metrics, read_summary, run_main, wandb_records
from conftest import wandb_summary as summary
from train import tracking
from train.config import Config

CLASSES = ["red", "green", "blue", "yellow"]


def offline_runs(wandb_dir):
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def history(run_dir) -> list:
    return [r["history"]["item"] for r in wandb_records(run_dir) if r.get("type") == "history"]


def offline_args(dataset, out):
    return ["--dataset", str(dataset), "--output-dir", str(out), *FAST, "--wandb-mode", "offline"]


def check_run_contents(run_dir, epochs=3):
    info = summary(run_dir)
    assert info["config"]["arch"] == "resnet18" and info["config"]["world_size"] >= 1
    # Every option of the run is in the logged config (the secrets filter drops none of them).
    assert set(Config().to_dict()) <= set(info["config"])
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
    # W&B's own confusion-matrix chart: its table holds (actual, predicted, count) for every cell
    assert final["test/confusion_matrix_table"]["_type"] == "table-file"
    (table,) = (run_dir / "files").glob("media/table/test/confusion_matrix_table_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    info["chart"] = {(a, p): n for a, p, n in table["data"]}
    return info


def artifacts(run_dir) -> list:
    """The artifact records of an offline run, as W&B's own reader gives them."""
    return [r["artifact"] for r in wandb_records(run_dir)
            if r.get("type") == "artifact" and r["artifact"]["type"] == "model"]


@pytest.mark.slow
def test_offline_run_has_curves_test_metrics_per_class_and_the_model_at_the_end(dataset_dir, tmp_path):
    """One run for the curves and metrics and for `--wandb-log-model end` (off by default: see the resumed run)."""
    out = tmp_path / "run"
    check(run_main([*offline_args(dataset_dir, out), "--wandb-log-model", "end"],
                   env={"WANDB_DIR": str(tmp_path / "wb"), "WANDB_DATA_DIR": str(tmp_path / "wb-data")}))
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 1
    info = check_run_contents(runs[0])
    local = read_summary(out)
    assert info["summary"]["test/acc"] == pytest.approx(local["test_acc"])
    assert info["summary"]["best_epoch"] == local["best_epoch"]
    assert [r["val/f1_macro"] for r in history(runs[0]) if "val/f1_macro" in r] == \
           pytest.approx([r["val_f1_macro"] for r in read_metrics(out)])
    assert info["name"] == "resnet18-lr0.02-bs32"
    matrix = local["confusion_matrix"]
    assert info["chart"] == {(CLASSES[i], CLASSES[j]): matrix[i][j] for i in range(4) for j in range(4)}

    (artifact,) = artifacts(runs[0])
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    assert artifact["name"] == f"model-{run_id}"
    assert set(artifact["aliases"]) == {"best", "latest", f"epoch-{local['best_epoch']}"}
    files = {c["path"]: c for c in artifact["manifest"]["contents"]}
    assert set(files) == {"model.safetensors", "config.yaml", "summary.json", "report.md"}
    staged = Path(files["model.safetensors"]["local_path"])  # what `wandb sync` uploads
    assert staged.read_bytes() == (out / "model.safetensors").read_bytes()
    metadata = json.loads(artifact["metadata"])
    assert metadata["model"]["arch"] == "resnet18" and metadata["model"]["class_names"] == CLASSES
    assert (metadata["test_acc"], metadata["test_f1_macro"]) == (local["test_acc"], local["test_f1_macro"])


@pytest.mark.slow
def test_best_logs_a_version_only_when_the_best_epoch_improves(dataset_dir, tmp_path):
    out = tmp_path / "run"
    args = [a if a != "3" else "5" for a in offline_args(dataset_dir, out)]  # --epochs 5: it stops improving
    check(run_main([*args, "--wandb-log-model", "best"], env={"WANDB_DIR": str(tmp_path / "wb"),
                                                              "WANDB_DATA_DIR": str(tmp_path / "wb-data")}))
    best, improved = -1.0, []
    for record in read_metrics(out):
        if record["val_f1_macro"] > best:
            best, improved = record["val_f1_macro"], improved + [record["epoch"]]
    assert 1 <= len(improved) < 5, improved  # decisive: some epochs did not improve
    (run,) = offline_runs(tmp_path / "wb")
    versions = artifacts(run)
    assert [set(a["aliases"]) for a in versions] == [{"best", "latest", f"epoch-{e}"} for e in improved]
    assert [json.loads(a["metadata"])["epoch"] for a in versions] == improved
    assert all({c["path"] for c in a["manifest"]["contents"]} >= {"model.safetensors", "config.yaml"}
               for a in versions)


@pytest.mark.slow
def test_a_model_artifact_that_fails_to_log_is_one_warning_and_the_run_goes_on(dataset_dir, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # W&B cannot stage the artifact's files under it, as on a read-only home
    out = tmp_path / "run"
    proc = check(run_main([*offline_args(dataset_dir, out), "--wandb-log-model", "end", "--epochs", "1",
                           "--limit-batches", "2"],
                          env={"WANDB_DIR": str(tmp_path / "wb"), "WANDB_DATA_DIR": str(blocked / "wandb")}))
    warnings = [line for line in proc.stderr.splitlines() if "model artifact" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B: logging the model artifact failed")
    (run,) = offline_runs(tmp_path / "wb")
    assert not artifacts(run) and summary(run)["summary"]["test/acc"] == pytest.approx(read_summary(out)["test_acc"])


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_makes_exactly_one_wandb_run(ddp_run):
    runs = offline_runs(ddp_run.parent / "wb")
    assert len(runs) == 1
    assert check_run_contents(runs[0])["config"]["world_size"] == 2


@pytest.mark.slow
def test_unreachable_wandb_never_fails_the_run(dataset_dir, tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_DIR": str(tmp_path / "wb"), "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40,
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    proc = check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--epochs", "1",
                           "--limit-batches", "2"], env=env))
    assert "warning: W&B: could not start the run" in proc.stderr
    assert len(read_metrics(out)) == 1 and "test_f1_macro" in read_summary(out)


@pytest.mark.slow
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
    assert not artifacts(first) and not artifacts(second)  # --wandb-log-model is off by default
    steps = [r["_step"] for r in history(second)]
    assert steps == sorted(steps) and steps[-1] == 24
    assert [r["_step"] for r in history(second) if "train/loss" in r][0] > 12
    epochs = {r["epoch"] for r in history(first) + history(second) if "val/f1_macro" in r}
    assert epochs == {1, 2, 3}


@pytest.mark.slow
def test_disabled_wandb_is_never_imported_and_leaves_no_folder(dataset_dir, tmp_path):
    out = tmp_path / "run"
    code = (f"import runpy, sys\nMAIN_PATH = {MAIN!r}\n"
            f"sys.argv = ['train/main.py', '--dataset', {str(dataset_dir)!r}, '--output-dir', {str(out)!r}, "
            "'--arch', 'resnet18', '--epochs', '1', '--limit-batches', '2', '--no-wandb']\n"
            "try:\n    runpy.run_path(MAIN_PATH, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('WANDB_IMPORTED' if 'wandb' in sys.modules else 'WANDB_NOT_IMPORTED')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(WANDB_MODE=""),
                          capture_output=True, text=True, timeout=300)
    assert "WANDB_NOT_IMPORTED" in proc.stdout, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("wandb")) and not (out / "wandb.json").exists()


# ---- The Tracker itself: real Accelerator, real wandb (offline), real run files ----------------------------

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
SECRETS = {"wandb_api_key": "s3cr3t-api-key-1", "HF_TOKEN": "s3cr3t-hf-token-2", "client_secret": "s3cr3t-client-3",
           "db_password": "s3cr3t-password-4", "apiKey": "s3cr3t-camel-5", "GitHubToken": "s3cr3t-camel-6"}
FINAL = {"test_loss": 0.5, "test_acc": 0.9, "test_f1_macro": 0.9, "best_epoch": 1, "best_val_f1_macro": 0.9,
         "wall_seconds": 1.0, "test_per_class_accuracy": {"a": 0.9}, "confusion_matrix": [[9]]}  # a summary.json


def run_config(**kw) -> Config:
    return Config(arch="resnet18", lr=0.02, batch_size=32, wandb_mode="offline", **kw)


@pytest.fixture
def offline_tracker(tmp_path, monkeypatch):
    """Start a Tracker as train/main.py does, in offline mode; yields a function (cfg, config) -> Tracker."""
    from train.process import make_accelerator

    for var in (*SLURM_VARS, "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no console capture inside pytest
    monkeypatch.setenv("WANDB_SILENT", "true")

    def start(cfg=None, config=None):
        cfg = cfg or run_config()
        out = tmp_path / "run"
        out.mkdir(exist_ok=True)
        tracker = tracking.Tracker(make_accelerator(cfg, track=True), cfg, out, enabled=True)
        tracker.start(config if config is not None else cfg.to_dict())
        assert tracker.active
        return tracker

    yield start
    import wandb

    if wandb.run is not None:  # a test that turned the Tracker off leaves its W&B run to us
        wandb.finish()


@pytest.mark.parametrize("key", sorted(SECRETS))
def test_secret_looking_keys_are_filtered(key):
    config = {"arch": "resnet18", "lr": 0.02, "keep_checkpoints": 2, key: SECRETS[key]}
    assert tracking.public_config(config) == {"arch": "resnet18", "lr": 0.02, "keep_checkpoints": 2}


def test_no_option_of_the_run_is_filtered():
    options = Config().to_dict()
    assert tracking.public_config(options) == options


def test_secrets_never_reach_the_wandb_run_files(offline_tracker, tmp_path):
    cfg = run_config()
    tracker = offline_tracker(cfg, {**cfg.to_dict(), "world_size": 1, **SECRETS})
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    (run,) = offline_runs(tmp_path / "wb")
    logged = summary(run)["config"]
    assert set(logged) == {*cfg.to_dict(), "world_size"}
    raw = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert not [key for key, value in SECRETS.items() if value.encode() in raw]


def test_logging_error_turns_wandb_off_for_the_rest_of_the_run(offline_tracker, tmp_path, monkeypatch, capsys):
    tracker = offline_tracker()
    tracker.log({"train/loss": 1.0}, step=1)
    run = tracker.accelerator.get_tracker("wandb", unwrap=True)
    healthy_log, calls = run.log, []

    def failing_log(*args, **kwargs):  # what a W&B backend that went away does to the caller
        calls.append(kwargs.get("step"))
        raise ConnectionError("W&B backend went away")

    monkeypatch.setattr(run, "log", failing_log)
    tracker.log({"train/loss": 0.9}, step=2)
    assert "logging failed (ConnectionError: W&B backend went away); W&B is off" in capsys.readouterr().err
    monkeypatch.setattr(run, "log", healthy_log)  # W&B would work again: the run must not go back to it
    tracker.log({"train/loss": 0.8}, step=3)
    tracker.log_final(FINAL, ["a"])
    tracker.finish()
    assert calls == [2] and capsys.readouterr().err == ""
    import wandb

    wandb.finish()
    (run_dir,) = offline_runs(tmp_path / "wb")
    assert [(r["_step"], r["train/loss"]) for r in history(run_dir)] == [(1, 1.0)]
    assert not any(key.startswith("test/") for key in summary(run_dir)["summary"])


def test_a_finished_wandb_run_is_a_logging_error_not_a_crash(offline_tracker, capsys):
    tracker = offline_tracker()
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.accelerator.get_tracker("wandb", unwrap=True).finish()  # W&B ended under us: a real wandb error
    capsys.readouterr()
    for step in (2, 3, 4):
        tracker.log({"train/loss": 0.9}, step=step)
    tracker.finish()
    err = capsys.readouterr().err
    assert not tracker.active
    assert err.count("warning: W&B:") == 1 and "logging failed (UsageError" in err, err


@pytest.mark.parametrize("env, name, group", [
    ({}, "resnet18-lr0.02-bs32", ""),
    ({"SLURM_JOB_ID": "4242"}, "resnet18-lr0.02-bs32-job4242", ""),
    # An array task has its own SLURM_JOB_ID; the name and group use the array job's id.
    ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"},
     "resnet18-lr0.02-bs32-job4242_7", "sweep-4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4243", "SLURM_ARRAY_TASK_ID": "0"},
     "resnet18-lr0.02-bs32-job4243_0", "sweep-4243"),
], ids=["no-slurm", "slurm-job", "array-task", "array-task-0"])
def test_run_name_and_group_from_slurm(env, name, group, monkeypatch):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    cfg = run_config()
    assert tracking.default_run_name(cfg) == name and tracking.default_group(cfg) == group
    assert tracking.default_run_name(Config(arch="mobilenet_v2", lr=0.1, batch_size=128)) == \
        name.replace("resnet18-lr0.02-bs32", "mobilenet_v2-lr0.1-bs128")
    assert tracking.default_group(run_config(wandb_group="mine")) == "mine"  # --wandb-group wins


def test_slurm_array_run_is_named_and_grouped_in_wandb(offline_tracker, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4250")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    tracker = offline_tracker()
    tracker.finish()
    (run,) = offline_runs(tmp_path / "wb")
    assert summary(run)["name"] == "resnet18-lr0.02-bs32-job4242_7"
    assert [r["run"].get("run_group") for r in wandb_records(run) if r.get("type") == "run"] == ["sweep-4242"]


def test_credentials_are_found_in_the_environment_or_netrc(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not tracking._has_credentials()
    netrc = tmp_path / ".netrc"  # what `wandb login` writes
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert tracking._has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    assert not tracking._has_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking._has_credentials()


def tracker_script(argv: list, out: Path) -> str:
    """Python that goes through train/main.py's W&B steps for `argv` and prints the Tracker's state."""
    return (f"import json, sys\nfrom pathlib import Path\nfrom train import tracking\n"
            f"from train.config import parse_config\nfrom train.process import make_accelerator\n"
            f"cfg = parse_config({argv!r} + ['--output-dir', {str(out)!r}])\n"
            f"track = tracking.wanted(cfg)\nout = Path(cfg.output_dir)\nout.mkdir(parents=True)\n"
            f"tracker = tracking.Tracker(make_accelerator(cfg, track), cfg, out, enabled=track)\n"
            f"tracker.start(cfg.to_dict())\ntracker.log({{'train/loss': 1.0}}, step=1)\n"
            f"tracker.log_final({FINAL!r}, ['a'])\ntracker.finish()\n"
            f"print(json.dumps({{'wanted': track, 'active': tracker.active, 'imported': 'wandb' in sys.modules}}))\n")


def run_script(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    home = tmp_path / "home"  # empty: no ~/.netrc, no ~/.config/wandb
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in child_env().items()
             if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CONFIG_HOME", *SLURM_VARS)}
    clean.update({"HOME": str(home), "WANDB_DIR": str(tmp_path / "wb"), "WANDB_CONFIG_DIR": str(home / "wandb"),
                  **env})
    # stdin closed and a time limit: a run that waited for someone to type an API key would fail here.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, env", [
    ([], {"WANDB_MODE": "disabled"}),
    (["--wandb-mode", "disabled"], {}),
    (["--no-wandb"], {}),
], ids=["WANDB_MODE=disabled", "--wandb-mode disabled", "--no-wandb"])
def test_disabled_wandb_is_never_imported(argv, env, tmp_path):
    proc = run_script(tracker_script(["--arch", "resnet18", *argv], tmp_path / "run"), tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"wanted": False, "active": False, "imported": False}
    assert "W&B" not in proc.stderr and not (tmp_path / "wb").exists()
    assert not (tmp_path / "run" / "wandb.json").exists()


def test_installed_wandb_without_credentials_logs_offline_in_one_line(tmp_path):
    """What `pip install -e ".[test]"` gives: wandb installed, no key, no mode asked for. Nowhere to send anything
    either: an attempt to go online would fail (and say so), not hang or upload."""
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "20"}
    proc = run_script(tracker_script(["--arch", "resnet18", "--lr", "0.02", "--batch-size", "32"], tmp_path / "run"),
                      tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"wanted": True, "active": True, "imported": True}
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if re.search("wandb|W&B", line, re.I)]
    assert len(said) == 1 and said[0].startswith("warning: W&B: no API key (wandb login, or WANDB_API_KEY): logging "
                                                 "offline, quietly; upload later with `wandb sync "), said
    assert "could not start the run" not in proc.stderr, proc.stderr[-3000:]  # offline at once, not after a failure
    (run,) = offline_runs(tmp_path / "wb")
    assert not [p for p in (tmp_path / "wb" / "wandb").glob("run-*")]  # no online run folder
    info = summary(run)
    assert info["name"] == "resnet18-lr0.02-bs32" and info["summary"]["_step"] == 1


def test_attempts_that_ended_in_a_stall_tag_the_run_and_are_in_its_summary(offline_tracker, tmp_path):
    """What train/process.py does as an attempt starts (and the stall watch as one stalls): the stalls stall.json
    records, as stall.record wrote them, reach the W&B run."""
    from train import stall

    out = tmp_path / "run"
    beats = {r: {"rank": r, "host": f"node{r}", "hostname": "h", "pid": r, "phase": stall.FETCH, "step": 4,
                 "seconds": 7.0, "first": False, "waiting": r == 0, "state": "running", "beat": 1} for r in (0, 1)}
    line = stall.stall_line(stall.Verdict([1], {1: "overdue"}), beats, out)
    stall.record(out, stall.Verdict([1], {1: "overdue"}), beats, line, 5)
    tracker = offline_tracker()
    tracker.note_stalls(stall.earlier_stalls(out))
    tracker.finish()
    (run,) = offline_runs(tmp_path / "wb")
    records = [r["run"] for r in wandb_records(run) if r.get("type") == "run"]
    assert "stalled" in records[-1].get("tags", [])
    assert summary(run)["summary"]["stalls"] == [line]
