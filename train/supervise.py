"""The processes a sweep worker supervises: a trial's training (its output passed on, a stop signal forwarded
to its training processes, which register their pids), and, with --workers N, the worker processes themselves.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from train import preemption, run_dir
from train.errors import EXIT_PREEMPTED, EXIT_USAGE

def run_trial(command: list, out: Path, pid_dir: Path) -> tuple:
    """Run a trial's training, its output passed through as it comes, and a stop signal this worker receives
    passed on to its training processes (they register their pids in pid_dir, as under slurm/common.sh, and
    stop at a checkpoint by themselves should this worker die); (exit status, its last error line, whether it
    stopped with a checkpoint for preemption: its PREEMPTED marker)."""
    signalled = set()
    env = {**os.environ, preemption.PID_DIR_ENV: str(pid_dir), preemption.STOP_WITH_ENV: preemption.this_process()}
    # stderr to a file, not a pipe: a training whose worker died must still be able to write while it stops.
    with open(pid_dir / "stderr", "w") as err, \
            subprocess.Popen(command, stderr=err, start_new_session=True, env=env) as proc:  # Ctrl-C: ours
        (pid_dir / f"session-{proc.pid}").touch()  # known before its processes register, for wait_for_training
        tail = _Tail(pid_dir / "stderr")
        while proc.poll() is None or _trial_pids(pid_dir):  # a launcher killed by the same SIGTERM goes first
            _forward(pid_dir, signalled)
            tail.read()
            time.sleep(0.2)
        tail.read(final=True)
    shutil.rmtree(pid_dir, ignore_errors=True)
    return proc.returncode, tail.last_error, (out / run_dir.MARKER).exists()  # train/main.py clears it at start


class _Tail:
    """A growing file's new lines, passed on to this process's stderr; the last "error: " line kept."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending, self.last_error = path, 0, b"", ""

    def read(self, final: bool = False) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            self.pending += f.read()
            self.offset = f.tell()
        *lines, self.pending = self.pending.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
        for line in (raw.decode(errors="replace") for raw in lines):
            with contextlib.suppress(OSError, ValueError):  # this worker's own stderr broken: go on forwarding
                sys.stderr.write(line + "\n")
            if line.startswith("error: "):
                self.last_error = line[len("error: "):].strip()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def all_pids(dirs: list) -> list:
    """The live processes of the trials whose pid folders are `dirs`, their first processes included."""
    return sorted({pid for d in dirs for pid in _trial_pids(d, session=True)})


def _trial_pids(pid_dir: Path, session: bool = False) -> list:
    """The trial's live training processes: the pids registered in its folder (by train/preemption.py), each
    still the process that wrote it (created before its file; a reused pid is younger), possibly orphaned by a
    launcher that died first; with `session`, also the trial's first process (train/main.py or its launcher,
    the leader of the trial's session), which registers nothing."""
    import psutil  # Accelerate's dependency

    live = []
    for file in pid_dir.iterdir() if pid_dir.is_dir() else ():
        try:
            p = psutil.Process(int(file.name.removeprefix("session-") if session else file.name))
            if p.create_time() <= file.stat().st_mtime + 1 and p.status() != psutil.STATUS_ZOMBIE:
                live.append(p.pid)
        except (ValueError, OSError, psutil.Error):
            continue  # not a pid, gone, or its file removed as it exited
    return sorted(set(live))


def sessions(pid_dir: Path) -> set:
    return {int(f.name.removeprefix("session-")) for f in pid_dir.glob("session-*")}


def _forward(pid_dir: Path, signalled: set) -> None:
    """Pass the signal this worker received on to each training process, once (INT as TERM: the training
    checkpoints on TERM); a process that registers later gets it then."""
    name = preemption.signalled()
    if not name:
        return
    sig = signal.SIGTERM if name == "SIGINT" else signal.Signals[name]
    for pid in _trial_pids(pid_dir):
        if pid not in signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            signalled.add(pid)


def start_workers(args, argv: list, folder: Path) -> int:
    """--workers N: N worker processes on this machine, one GPU per --workers-per-gpu of them, the CPUs shared.
    A stop signal (Ctrl-C too) is passed on to every worker, and each stops its trial at a checkpoint."""
    threads = max(1, len(os.sched_getaffinity(0)) // (args.workers * args.processes_per_trial))
    procs = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM if signum == signal.SIGINT else signum)
    for sig in (*preemption.SIGNALS, signal.SIGINT):
        signal.signal(sig, forward)
    for i, gpus in enumerate(worker_gpus(_gpus(), args.workers, args.workers_per_gpu, args.processes_per_trial)):
        env = {"OMP_NUM_THREADS": str(threads), **os.environ, "CIFAR_SWEEP_SLOT": str(i),
               preemption.STOP_WITH_ENV: preemption.this_process()}  # a worker stops should this process die
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus
            print(f"worker {i}: GPU {gpus}", flush=True)
        command = [sys.executable, "-m", "train.sweep", *_without_storage(argv), "--workers", "1", "--sweep-dir",
                   str(folder)]
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))  # Ctrl-C: ours to pass on
    codes = [p.wait() for p in procs]
    # Bad input stops the sweep; a preempted worker's job is requeued (slurm/sweep.sh); else the first failure.
    return next((c for c in (EXIT_USAGE, EXIT_PREEMPTED) if c in codes), next((c for c in codes if c), 0))


def _without_storage(argv: list) -> list:
    """The command line less --storage URL: the workers get it in the environment, out of `ps` (a password)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--storage" and not arg.startswith("--storage="):
            kept.append(arg)
        skip = arg == "--storage"
    return kept


def worker_gpus(gpus: list, workers: int, per_gpu: int, per_trial: int) -> list:
    """Each worker's CUDA_VISIBLE_DEVICES ("" without GPUs): per_gpu workers share each group of per_trial
    GPUs, groups in order, around again when there are more workers than groups."""
    if not gpus:
        return [""] * workers
    return [",".join(gpus[((i // per_gpu) * per_trial + k) % len(gpus)] for k in range(per_trial))
            for i in range(workers)]


def default_workers(args) -> int:
    """One worker per GPU (per --processes-per-trial GPUs), times --workers-per-gpu; one GPU-less one on CPU."""
    return max(1, len(_gpus()) // args.processes_per_trial) * args.workers_per_gpu


def _gpus() -> list:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]

