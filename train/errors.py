"""The one exception type that reaches the user as a single line and exit status 2."""

import os
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user (arguments, config, dataset, checkpoint): not a bug in this code."""


def report_usage_error(error: UsageError) -> int:
    # Every rank detects the same bad input; one line from rank 0 is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_USAGE
