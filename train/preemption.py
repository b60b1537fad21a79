"""Stop cleanly on SIGTERM/SIGUSR1 (what Slurm sends before a time limit or preemption).

The handler only sets a flag. After each optimizer step every rank reports its
flag and all stop together if any rank was signalled, so no rank is left waiting
in a collective; the caller then writes a checkpoint and exits with EXIT_PREEMPTED.
"""

import signal
import sys

import torch

# EX_TEMPFAIL from sysexits.h: "try again later". `accelerate launch` turns every
# non-zero status into 1, so the run folder also gets a PREEMPTED marker file.
EXIT_PREEMPTED = 75
MARKER = "PREEMPTED"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self, accelerator):
        self.accelerator, self.signalled = accelerator, None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signalled is None:  # a second signal changes nothing: the checkpoint is already coming
            self.signalled = signal.Signals(signum).name
            print(f"received {self.signalled}: stopping after this step to write a checkpoint",
                  file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.signalled is not None
        flag = torch.tensor([float(self.signalled is not None)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
