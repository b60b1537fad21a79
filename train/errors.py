"""The one exception type that reaches the user as a single line and exit status 2, and the helpers that
keep every error to one line."""

import difflib
import os
import sys

# Every exit status of this project's commands (the README's table).
EXIT_USAGE = 2
EXIT_DIVERGED = 3  # training stopped by a non-finite loss (train/loop.py)
EXIT_IO = 74  # EX_IOERR from sysexits.h: a full, read-only or forbidden disk
# EX_TEMPFAIL from sysexits.h, "try again later": stopped by a signal at a checkpoint (train/preemption.py).
# `accelerate launch` turns every non-zero status into 1, so the run folder also gets a PREEMPTED marker file.
EXIT_PREEMPTED = 75
# A stall: a process made no progress for --stall-timeout, or one is gone (train/stall.py). GNU timeout's status for
# "timed out"; the run folder gets a STALLED marker, as a preempted run gets PREEMPTED, and is retried the same way.
EXIT_STALLED = 124
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


class UsageError(Exception):
    """Bad input from the user (arguments, config, dataset, checkpoint): not a bug in this code."""

    every_rank = False  # most bad input is seen by every rank alike, and rank 0 says it


class PeerTimeout(UsageError):
    """A process waited longer than --dist-timeout for the others: only the one that waited knows."""

    every_rank = True


def exit_status(command) -> int:
    """command()'s exit status; bad input (a UsageError) is one line on stderr and EXIT_USAGE."""
    try:
        return command()
    except UsageError as e:
        return report_usage_error(e)


def report_usage_error(error: UsageError) -> int:
    if error.every_rank or os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_USAGE



def report_write_error(error: OSError) -> int:
    """A full, read-only or forbidden disk: one line naming the path, from whichever process hit it."""
    where = f" {error.filename}" if error.filename else ""
    print(f"error: could not write{where}: {error.strerror or error}; free space or choose another "
          f"--output-dir, then continue with --resume auto", file=sys.stderr, flush=True)
    return EXIT_IO


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def did_you_mean(word: str, options, cutoff: float = 0.6, show=str) -> str:
    """'; did you mean a, b?' for the options close to a mistyped word (each written as show(option)), or ''."""
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=cutoff)
    return f"; did you mean {', '.join(show(c) for c in close)}?" if close else ""
