"""What a person watching a run sees: a live bar at a terminal, plain lines anywhere else.

A terminal is where stderr or stdout is one. `accelerate launch` 1.16 pipes its child's stderr through
itself (to keep the tail for its error report), so stderr is no terminal there even when the person's
screen is; stdout still is, and the bar is drawn there. Off a terminal (a Slurm log, CI, a pipe) a bar's
carriage-return frames would be noise: the run prints a plain line every --log-every optimizer steps
(with the running loss), and at least every PLAIN_EVERY seconds (from counters on the host: no device read).
"""

import sys
import time

PLAIN_EVERY = 30.0  # seconds of wall time between plain lines, at most


def terminal():
    """The stream a live progress bar can draw on, or None."""
    return next((stream for stream in (sys.stderr, sys.stdout) if stream.isatty()), None)


class PlainLines:
    """Off a terminal: when a plain line is due, and the training speed since the last one."""

    def __init__(self, images_per_step: int, every: float | None = None):
        self.images_per_step, self.every = images_per_step, PLAIN_EVERY if every is None else every
        self.since, self.steps = time.monotonic(), 0

    def step(self) -> str | None:
        """Count an optimizer step; return the speed to report when a line is due."""
        self.steps += 1
        seconds = time.monotonic() - self.since
        if seconds < self.every:
            return None
        speed = f"{self.steps * self.images_per_step / seconds:.0f} img/s"
        self.logged()
        return speed

    def logged(self) -> None:
        """A line just went out: the next is due PLAIN_EVERY seconds from now."""
        self.since, self.steps = time.monotonic(), 0
