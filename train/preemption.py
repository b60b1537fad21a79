"""Stop cleanly on SIGTERM/SIGUSR1 (what Slurm sends before a time limit or preemption).

`listen()` runs first thing in every training process, so a signal during data loading is kept,
not fatal. The handler only records the signal. Every --log-every optimizer steps (and at epoch
starts) every rank reports its flag and all stop together if any rank was signalled, so no rank is
left waiting in a collective; the caller then writes a checkpoint and exits with EXIT_PREEMPTED.

Under Slurm, slurm/common.sh sets CIFAR_ACCELERATE_PID_DIR: each training process writes its pid
there, so the batch script signals exactly the training processes, whatever the launch command.
"""

import atexit
import os
import signal
import sys
from pathlib import Path

import torch

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


class StopFlag:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        listen()  # main() already did, unless the loop is driven from elsewhere (benchmark, tests)

    @property
    def signalled(self):
        return _received

    def should_stop(self, agree: bool = True) -> bool:
        """One process: whether a signal came. Several: only where `agree` (the same steps on every rank),
        whether any rank got one, by an all-reduce; elsewhere False, so every rank stops at the same step."""
        if self.accelerator.num_processes == 1:
            return _received is not None
        if not agree:
            return False
        flag = torch.tensor([float(_received is not None)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
