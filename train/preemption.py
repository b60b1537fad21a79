"""Stop cleanly on SIGTERM/SIGUSR1 (what Slurm sends before a time limit or preemption) and on Ctrl-C.

`listen()` runs first thing in every training process, so a signal during data loading is kept,
not fatal. The handler only records the signal; `requested()` reads it. The training loop agrees
the processes' requests at its sync steps (train/loop.py), so all stop at the same step; the
caller then writes a checkpoint and exits with errors.EXIT_PREEMPTED.

Under Slurm, slurm/common.sh sets CIFAR_ACCELERATE_PID_DIR: each training process writes its pid
there, so the batch script signals exactly the training processes, whatever the launch command.

Ctrl-C (SIGINT) is a stop signal too, once there is work to save (training has begun): `accelerate
launch` passes it on as SIGTERM (one process) or SIGINT (torchrun, several), and a terminal sends it to
`python train/main.py`. Before training there is nothing to save, and a second Ctrl-C means "now": both
stop the process at once, with one line and status 130. The single-process launcher kills its child 5 s
after Ctrl-C; one process stops at the very next step, so its checkpoint is written within them.

A sweep worker sets CIFAR_ACCELERATE_STOP_WITH to itself: a training process whose worker is gone (SIGKILL,
the OOM killer) stops as if it got SIGTERM, at a checkpoint, instead of training on alone (train/sweep.py).
"""

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from train import progress
from train.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PID_DIR_ENV = "CIFAR_ACCELERATE_PID_DIR"
STOP_WITH_ENV = "CIFAR_ACCELERATE_STOP_WITH"  # "pid:start time" of the process whose end stops this one

_received = None  # name of the first signal received, if any
_listening = False
_work_to_save = False  # before there is (training has not begun), Ctrl-C stops at once
_what = "stopping after this step to write a checkpoint"  # what the process says it does about a signal
_standing_down = False  # the process is leaving on a stall (train/stall.py): a signal then changes nothing


def _handle(signum, frame):
    global _received
    name = signal.Signals(signum).name
    if _standing_down:
        return
    if signum == signal.SIGINT and (not _work_to_save or _received == name):
        _stop_now("nothing to save yet" if not _work_to_save else
                  "the newest complete checkpoint is intact: --resume auto continues from it")
    if _received is None:  # another signal changes nothing: the checkpoint is already coming
        _received = name
        again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
        _say(f"received {name}: {_what}{again}")


def _stop_now(why: str) -> None:
    _say(f"interrupted: stopping now ({why})")
    os._exit(EXIT_INTERRUPTED)  # no traceback, no cleanup that could hang: what a second Ctrl-C asks for


def _say(line: str) -> None:
    """To the person's terminal where there is one: `accelerate launch` pipes stderr through itself, and a
    line that arrives as Ctrl-C interrupts the launcher's copying can be lost there; else to stderr."""
    print(line, file=progress.terminal() or sys.stderr, flush=True)


def stand_down() -> None:
    """The process is about to exit on a stall: the launcher's SIGTERM to the others is not a preemption."""
    global _standing_down
    _standing_down = True


def work_to_save() -> None:
    """From now on a first Ctrl-C saves the work (a checkpoint at the next step) instead of stopping at once."""
    global _work_to_save
    _work_to_save = True


def listen(what: str = _what, signals=SIGNALS) -> None:
    """Record SIGTERM/SIGUSR1 (or `signals`) from now on, and register this process as a training process
    (a sweep worker registers too: it passes the signal on to its trial's processes, train/sweep.py)."""
    global _listening, _what
    if _listening:
        return
    _listening, _what = True, what
    for sig in signals:
        signal.signal(sig, _handle)
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        pid_file = Path(pid_dir) / str(os.getpid())
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(" ".join(sys.argv) + "\n")
        atexit.register(pid_file.unlink, missing_ok=True)
    if os.environ.get(STOP_WITH_ENV):
        pid, start = os.environ[STOP_WITH_ENV].split(":")
        threading.Thread(target=_stop_with, args=(int(pid), float(start)), daemon=True).start()


def this_process() -> str:
    """This process as STOP_WITH_ENV names it: its pid and start time (a reused pid starts later)."""
    import psutil  # Accelerate's dependency

    return f"{os.getpid()}:{psutil.Process().create_time()}"


def _stop_with(pid: int, start: float, every: float = 1.0) -> None:
    """Watch the process this one stops with; once it is gone, stop as on SIGTERM (at a checkpoint). Its start
    time is compared once, within a second (a reused pid starts later); psutil then tells whether that same
    process still runs, unmoved by changes of the wall clock."""
    import psutil  # Accelerate's dependency

    try:
        watched = psutil.Process(pid)
        alive = abs(watched.create_time() - start) < 1
        while alive:
            time.sleep(every)
            alive = watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        pass  # gone
    finally:
        with contextlib.suppress(Exception):  # a closed or broken stderr must not keep this process going
            print(f"the sweep process that started this one (pid {pid}) is gone", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


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
