"""Fault injection for the crash tests: a real SIGKILL or a real delay at a named point of a real run.

CIFAR_ACCELERATE_FAILPOINT=kill_after_step:7 kills the process right after optimizer
step 7; kill_during_save:2 kills it halfway through writing its 2nd checkpoint;
enospc_during_save:2 makes that write fail as on a full disk; kill_after_ask:0 kills a sweep worker
right after it asks the study for trial 0, before it draws the trial's options. NAME@R:COUNT does so on
global rank R only (kill_after_step@1:6: rank 1 dies after step 6, rank 0 trains on).
CIFAR_ACCELERATE_DELAY=preempted_save:20 sleeps 20 s halfway through writing the checkpoint of a
preemption (save:20: of every other checkpoint); data_prep:8 sleeps 8 s while a node prepares the
data (on the process that prepares it). NAME@R:SECONDS sleeps at that point on global rank R only,
whichever process the point otherwise means (data_prep@1:8: rank 1, before it prepares or waits).
NAME:PATH (an absolute path) waits at that point until PATH exists, at most 10 minutes: the test says when; a
PATH never made blocks the process there (the stall tests). NAME#N:... acts only the Nth time the process reaches
the point (fetch_batch@1#6:/never: rank 1's 6th training batch never comes).
Unset (always, outside tests), they do nothing.
"""

import collections
import errno
import os
import signal
import time

ENV = "CIFAR_ACCELERATE_FAILPOINT"
DELAY_ENV = "CIFAR_ACCELERATE_DELAY"
_reached = collections.Counter()  # point -> times this process reached it


def failpoint(name: str, count: int, path=None) -> None:
    point, _, at = os.environ.get(ENV, "").partition(":")
    point, _, rank = point.partition("@")
    if (point, at) != (name, str(count)) or rank and os.environ.get("RANK", "0") != rank:
        return
    if name.startswith("enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    os.kill(os.getpid(), signal.SIGKILL)


def delay(name: str, here: bool = True) -> None:
    """Sleep at point `name`: NAME:S where the caller says `here`, NAME@R:S on global rank R only; NAME:PATH
    until PATH exists."""
    point, _, until = os.environ.get(DELAY_ENV, "").partition(":")
    point, _, nth = point.partition("#")
    point, _, rank = point.partition("@")
    if point != name or not (os.environ.get("RANK", "0") == rank if rank else here):
        return
    _reached[name] += 1
    if nth and _reached[name] != int(nth):
        return
    if not until.startswith("/"):
        time.sleep(float(until))
        return
    deadline = time.monotonic() + 600
    while not os.path.exists(until) and time.monotonic() < deadline:
        time.sleep(0.1)
