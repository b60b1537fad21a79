import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest
import yaml

from synthetic import write_parquet_dataset  # tests/ is on sys.path: pytest puts a conftest's folder there

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "train" / "main.py")

# Small and quick: resnet18 learns the synthetic classes in 2-3 epochs (MobileNets at 32 px do not).
FAST = ["--arch", "resnet18", "--batch-size", "32", "--eval-batch-size", "64", "--lr", "0.02", "--epochs", "3",
        "--log-every", "2"]


CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Before anything imports huggingface_hub or datasets (they read these once): calls in this process see what a
# child sees.
os.environ.update({k: CHILD_ENV[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})


# accelerate launch's rendezvous port, one per pytest-xdist worker (gw0, gw1, ...): two workers' DDP runs at once do
# not meet on Accelerate's default 29500 (which the local Slurm's single-node jobs keep), where the second would
# warn and look for a free port, racing the first to bind it.
PORT = str(29600 + 10 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0))
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1",
          "--main_process_port", PORT]


def child_env(**extra) -> dict:
    return {**os.environ, **CHILD_ENV, **extra}


def run_main(args, *, processes: int = 0, env=None, timeout=600, launch_args=()) -> subprocess.CompletedProcess:
    """Run train/main.py as users do: plain python, or `accelerate launch` with N CPU processes (gloo)."""
    if processes:
        cmd = [*LAUNCH, "--dynamo_backend", "no", *launch_args]
        cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
        cmd += [MAIN, *args]
        env = child_env(ACCELERATE_USE_CPU="true", **(env or {}))
    else:
        cmd = [sys.executable, MAIN, *args]
        env = child_env(**(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _as_a_child(env: dict):
    """This process dressed as run_main's child for one call: its environment, one thread, its own signal
    handlers, warning filters and Accelerate state, all put back afterwards."""
    import torch
    from accelerate.state import AcceleratorState

    from train import preemption

    saved_env, threads, cwd = dict(os.environ), torch.get_num_threads(), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (*preemption.SIGNALS, signal.SIGINT)}
    os.environ.update(env)
    os.chdir(ROOT)
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 gives a child: bit-identical numbers
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        preemption._received, preemption._listening, preemption._work_to_save = None, False, False
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@contextlib.contextmanager
def _captured_output():
    """stdout and stderr, file descriptors 1 and 2 included (child processes write there), each to a file of its
    own, line by line in the order written; yields a dict that gets "out" and "err". CSV's CR LF reads as LF, as
    from a text-mode pipe; a lone CR (a progress-bar frame) stays, where such a pipe would turn it into LF."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        streams, saved = (sys.stdout, sys.stderr), (os.dup(1), os.dup(2))
        for stream in streams:
            stream.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
                                  for fd in (1, 2))
        got = {}
        try:
            yield got
        finally:
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = streams
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            for key, file in (("out", out), ("err", err)):
                file.seek(0)
                got[key] = file.read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def call(name: str, *args, env=None) -> subprocess.CompletedProcess:
    """`python -m NAME ARGS...` in this process, output captured: for tests whose subject is what the command
    does, not the process it runs in (a cold start costs ~6 s of imports). Its `main(argv)` is what the
    module's `__main__` block calls; an exception is exit status 1 with its traceback on stderr, as in a process.
    Modules that read their environment at import (huggingface_hub's cache and offline flags) need module()."""
    import importlib

    argv = list(map(str, args))
    with _as_a_child({**CHILD_ENV, **(env or {})}), _captured_output() as output:
        try:
            code = importlib.import_module(name).main(argv)
        except SystemExit as e:  # argparse's errors and --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([name, *argv], code or 0, output["out"], output["err"])


def main_in_process(args, env=None) -> subprocess.CompletedProcess:
    """train/main.py ARGS in this process (see call()): one process, no signal or launcher under test."""
    return call("train.main", *args, env=env)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def read_metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pytest_collection_modifyitems(items):
    """`pytest -m quick`: the tests that start no process and need no trained run, in a few minutes."""
    for item in items:
        if not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.quick)


def once(tmp_path_factory, name: str, build) -> Path:
    """Folder NAME made by build(folder) once for the whole test run, shared by every pytest-xdist worker: the
    first worker to ask builds it under a lock, the others wait for the lock and read what it built. Read-only
    for the tests that use it (copy it to change it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if build() fails
        if not (base / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker's build that failed half-way
            folder.mkdir()
            build(folder)
            (base / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session", autouse=True)
def one_core_per_worker():
    """Under pytest-xdist each worker computes on one thread, as each child it starts does: -n 2 fills 2 cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def decode_cache(tmp_path_factory):
    """Runs started by the tests cache decoded images here, not in the user's ~/.cache; one cache for every
    worker, so each split is decoded once in the whole run (cache files are written atomically)."""
    os.environ["CIFAR_ACCELERATE_CACHE"] = str(once(tmp_path_factory, "decode-cache", lambda folder: None))


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """256 train / 101 test images (an odd test size, to catch DDP padding), hub parquet layout."""
    return once(tmp_path_factory, "synthetic", lambda folder: write_parquet_dataset(folder / "ds")) / "ds"


@pytest.fixture
def parts_for(dataset_dir):
    """build(**options) -> (Config, Parts): a run's prepared parts in this process, for driving the loop."""
    from accelerate.state import AcceleratorState

    from train.config import Config
    from train.data import load_image_data
    from train.process import make_accelerator
    from train.runner import build_parts

    AcceleratorState._reset_state(reset_partial_state=True)
    data = load_image_data(Config(dataset=str(dataset_dir), decode_cache="off"))

    def build(**options):
        cfg = Config(**{"dataset": str(dataset_dir), "arch": "resnet18", "batch_size": 16, "epochs": 1,
                        "wandb": False, **options})
        return cfg, build_parts(cfg, make_accelerator(cfg, track=False), data)
    yield build
    AcceleratorState._reset_state(reset_partial_state=True)


# 230 training images / 32 = 8 steps an epoch, 24 in all; a checkpoint every 3 steps and at each epoch end.
RESUME_ARGS = [*FAST, "--checkpoint-every-steps", "3", "--resume", "auto"]
TEST_KEYS = ("test_loss", "test_acc", "test_f1_macro", "test_per_class_accuracy", "confusion_matrix",
             "num_test_samples", "best_epoch", "best_val_f1_macro", "steps")
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1_macro", "lr", "step")


def resume_args(dataset, out):
    return ["--dataset", str(dataset), "--output-dir", str(out), *RESUME_ARGS]


def assert_same_run(run, reference):
    """Bit-identical best weights, test metrics and per-epoch metrics (timings aside)."""
    from safetensors.torch import load_file

    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "best weights differ"
    got, want = read_summary(run), read_summary(reference)
    assert {k: got[k] for k in TEST_KEYS} == {k: want[k] for k in TEST_KEYS}
    assert [{k: r[k] for k in EPOCH_KEYS} for r in read_metrics(run)] == \
           [{k: r[k] for k in EPOCH_KEYS} for r in read_metrics(reference)]


@pytest.fixture(scope="session")
def resume_reference(dataset_dir, tmp_path_factory) -> Path:
    """An uninterrupted run that interrupted-and-resumed runs must reproduce exactly."""
    return once(tmp_path_factory, "ref", lambda folder: check(run_main(resume_args(dataset_dir, folder / "run")))
                ) / "run"


@pytest.fixture(scope="session")
def trained_run(resume_reference) -> Path:
    """The single-process training run that tests which only read a run's outputs share (one run, not two)."""
    return resume_reference


@pytest.fixture(scope="session")
def ddp_resume_reference(dataset_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (4 steps an epoch): what resumed DDP and 2-node runs reproduce bit for bit."""
    return once(tmp_path_factory, "ddp-ref",
                lambda folder: check(run_main(resume_args(dataset_dir, folder / "run"), processes=2))) / "run"


@pytest.fixture(scope="session")
def ddp_run(dataset_dir, tmp_path_factory) -> Path:
    """One 2-process run with W&B offline (its files in the run folder's wandb/), for the tests that read what a
    DDP run leaves: counts, metrics, the one W&B run. 27 validation images: odd, so one rank's last batch is padded
    with a repeat."""
    def build(folder):
        check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(folder / "run"), *FAST, "--val-images",
                        "27", "--wandb-mode", "offline"], processes=2, env={"WANDB_DIR": str(folder / "wb")}))
    return once(tmp_path_factory, "ddp", build) / "run"


def assert_resumed(proc: subprocess.CompletedProcess, total_steps: int) -> tuple:
    """The run continued from the checkpoint it names and took only the steps that checkpoint lacked.

    On CPU a fresh start reproduces the reference bit for bit, so equal results alone cannot tell a
    resume from a silent restart. Returns (checkpoint name, its step).
    """
    named = re.search(r"resuming from (\S+) \(epoch \d+, batch \d+, step (\d+)\)", proc.stdout)
    assert named, f"did not resume:\n{proc.stdout[-2000:]}"
    step = int(named.group(2))
    taken = re.search(r"(\d+) optimizer steps in this attempt \(from step (\d+) to (\d+)\)", proc.stdout)
    assert taken and int(taken.group(2)) == step and int(taken.group(3)) == total_steps, proc.stdout[-2000:]
    assert int(taken.group(1)) == total_steps - step < total_steps
    assert "starting fresh" not in proc.stdout and not re.search(r"^warning:", proc.stderr, re.M), proc.stderr[-2000:]
    return Path(named.group(1)).name, step


def module(name, *args, env=None) -> subprocess.CompletedProcess:
    """python -m NAME ARGS... from the project folder, output captured."""
    return subprocess.run([sys.executable, "-m", name, *map(str, args)], cwd=ROOT, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=600)


def wandb_cli(*args) -> str:
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True, timeout=120).stdout


def wandb_records(run) -> list:
    """Every record of an offline W&B run, as W&B's own reader gives them."""
    return [json.loads(line) for line in wandb_cli("leet", "inspect", "--json", str(run)).splitlines() if line.strip()]


def wandb_summary(run) -> dict:
    return json.loads(wandb_cli("leet", "inspect", "--summary", "--json", str(run)))


def write_sweep(path, **sweep) -> Path:
    """A sweep file (W&B's format) for python -m train.sweep or slurm/sweep.sh."""
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def study_trials(folder) -> list:
    """The trials of a sweep folder's study, read from its journal file as the workers left it."""
    import optuna

    from train.study import STUDY, storage_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=STUDY, storage=storage_for(folder)).get_trials()
