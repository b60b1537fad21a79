"""Fault injection for the crash tests: a real SIGKILL at a named point of a real run.

CIFAR_ACCELERATE_FAILPOINT=kill_after_step:7 kills the process right after optimizer
step 7; kill_during_save:2 kills it halfway through writing its 2nd checkpoint.
Unset (always, outside tests), it does nothing.
"""

import os
import signal

ENV = "CIFAR_ACCELERATE_FAILPOINT"


def failpoint(name: str, count: int) -> None:
    if os.environ.get(ENV) == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
