"""Stop cleanly on SIGTERM/SIGUSR1 (what Slurm sends before a time limit or preemption).

`listen()` runs first thing in every training process, so a signal during data loading is kept,
not fatal. The handler only records the signal; `requested()` reads it. The training loop agrees
the processes' requests at its sync steps (train/loop.py), so all stop at the same step; the
caller then writes a checkpoint and exits with EXIT_PREEMPTED.

Under Slurm, slurm/common.sh sets CIFAR_ACCELERATE_PID_DIR: each training process writes its pid
there, so the batch script signals exactly the training processes, whatever the launch command.
"""

import atexit
import os
import signal
import sys
from pathlib import Path

# EX_TEMPFAIL from sysexits.h: "try again later". `accelerate launch` turns every
# non-zero status into 1, so the run folder also gets a PREEMPTED marker file.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PID_DIR_ENV = "CIFAR_ACCELERATE_PID_DIR"

_received = None  # name of the first signal received, if any
_listening = False


def _handle(signum, frame):
    global _received
    if _received is None:  # a second signal changes nothing: the checkpoint is already coming
        _received = signal.Signals(signum).name
        print(f"received {_received}: stopping after this step to write a checkpoint", file=sys.stderr, flush=True)


def listen() -> None:
    """Record SIGTERM/SIGUSR1 from now on, and register this process as a training process."""
    global _listening
    if _listening:
        return
    _listening = True
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        pid_file = Path(pid_dir) / str(os.getpid())
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(" ".join(sys.argv) + "\n")
        atexit.register(pid_file.unlink, missing_ok=True)


def attempt() -> str:
    """Which attempt of a Slurm job this process belongs to, for the PREEMPTED marker."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else f"pid {os.getpid()}"


def requested() -> bool:
    """Whether this process received a stop signal."""
    return _received is not None


def signalled() -> str | None:
    """The name of the first stop signal received, if any."""
    return _received
