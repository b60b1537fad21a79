"""Which worker owns a sweep's trial, and taking over a trial whose worker is gone for good.

Each RUNNING trial records its owner (host, pid, Slurm array task and slot). A worker that starts resumes its
own trial left by a preemption, or claims an orphan (its owner's Slurm job is gone, or its process no longer
exists on this host) with a file only one worker can create, waits for the orphan's training processes to stop
at a checkpoint, and resumes it: same number, same folder, its epochs so far kept, never twice at once.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from train import study
from train.supervise import all_pids, sessions

STOP_GRACE = 120  # seconds a dead worker's training gets to stop at a checkpoint before the next worker kills it



def owner() -> dict:
    """Who runs a trial: enough for another worker to tell whether that worker is still alive."""
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = f"{slurm}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if slurm else os.environ.get("SLURM_JOB_ID", "")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": task,
            "slot": os.environ.get("CIFAR_SWEEP_SLOT", "0")}


def is_alive(who: dict) -> bool:
    """Whether a trial's owner may still be running: its Slurm job is still queued or running (requeued jobs
    are), or, without Slurm, its process still exists on this host. Another host's process cannot be checked.
    Slurm's answer is an empty queue for a job that ended, "Invalid job id" once it is forgotten; anything else
    (the controller unreachable or busy) is no answer, and no answer is no proof."""
    if who.get("slurm"):
        try:
            queue = subprocess.run(["squeue", "-h", "-j", who["slurm"], "-o", "%T"], capture_output=True,
                                   text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return True
        if queue.returncode:
            return "Invalid job id" not in queue.stderr
        return bool(queue.stdout.split())
    if who.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mine(who: dict) -> bool:
    """A trial this worker left RUNNING when it was preempted: the same Slurm array task (a requeued job keeps
    its ids) and slot, in a new process."""
    me = owner()
    return bool(me["slurm"]) and who.get("slurm") == me["slurm"] and who.get("slot") == me["slot"]


def is_me(who: dict) -> bool:
    """Whether a trial's owner is this worker: under Slurm, its array task and slot (a requeued attempt too);
    else this process on this host."""
    me = owner()
    if me["slurm"]:
        return mine(who)
    return (who.get("host"), who.get("pid")) == (me["host"], me["pid"])


def ran_here(trials) -> int:
    """The trials this worker ran to an end (complete, pruned or failed): what --run-cap counts."""
    done = ("COMPLETE", "PRUNED", "FAIL")
    return sum(t.state.name in done and counted(t) and is_me(t.user_attrs.get("owner") or {}) for t in trials)


def counted(trial) -> bool:
    """Whether a trial counts towards run_cap and the grid: not one asked past them."""
    return not trial.user_attrs.get("not_run")


def claim(folder: Path, trial, who: dict) -> bool:
    """Take over a trial whose worker is gone, atomically: of several workers that see it at once, the one that
    creates the claim file (O_EXCL, atomic on NFSv3 and later) resumes it."""
    gone = who.get("slurm") or f"{who.get('host')}-{who.get('pid')}"
    try:
        os.close(os.open(folder / f".claim-{trial.number:04d}-{gone}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def orphan(folder: Path, trials):
    """(trial, why, its dead worker or None) of the RUNNING trial this worker continues, or None: its own, left
    when it was preempted, or one whose worker is gone for good, resumed from its last checkpoint (same number,
    same folder) by whichever worker claims it. One at a time: a claimed trial is this worker's to run."""
    optuna = study.load_optuna()
    for t in trials:
        who = t.user_attrs.get("owner")
        if t.state != optuna.trial.TrialState.RUNNING or not who:
            continue
        if mine(who):
            return t, "this worker was preempted", None
        if not is_alive(who) and claim(folder, t, who):
            slurm = f", {who['slurm']}" if who["slurm"] else ""
            return t, f"its worker ({who['host']}, pid {who['pid']}{slurm}) is gone", who
    return None


def wait_for_training(who: dict, number: int) -> None:
    """A dead worker's training processes on this host stop at a checkpoint by themselves (they watch their
    worker, train/preemption.py): wait for them, and for a trial process still starting up, so that the trial
    never trains twice at once; kill what is left after STOP_GRACE seconds."""
    dirs = local_pid_dirs(who)
    if not dirs:
        return
    live, deadline = all_pids(dirs), time.monotonic() + STOP_GRACE
    if live:
        print(f"trial {number}: waiting for its training processes (pid {', '.join(map(str, live))}) to stop at a "
              f"checkpoint", flush=True)
    while live and time.monotonic() < deadline:
        time.sleep(0.5)
        live = all_pids(dirs)
    if live:
        print(f"trial {number}: pid {', '.join(map(str, live))} did not stop within {STOP_GRACE} s; killing them",
              flush=True)
        sessions = {pid for d in dirs for pid in sessions(d)}
        for pid in live:
            with contextlib.suppress(OSError):
                (os.killpg if pid in sessions else os.kill)(pid, signal.SIGKILL)
        while all_pids(dirs) and time.monotonic() < deadline + 30:
            time.sleep(0.5)  # gone, and their GPU memory with them, before the trial starts again
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def local_pid_dirs(who: dict) -> list:
    """The pid folders, on this host, of an owner's trial processes and of those its owner was still waiting
    for (a worker killed during that wait passes it on to the next); none for another host's owner."""
    if who.get("host") != socket.gethostname():
        return []
    return [d for d in map(Path, filter(None, (who.get("pids"), *who.get("waits", ())))) if d.is_dir()]

