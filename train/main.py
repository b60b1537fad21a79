"""Train a torchvision classifier on a Hugging Face image dataset.

    accelerate launch train/main.py --arch mobilenet_v2

This file wires the parts: it reads and checks the options, which needs neither torch nor Accelerate (so
--help and a mistyped option are answered at once), then hands the run to train/process.py (the
Accelerator, the run folder, W&B), which calls train/runner.py (what one run does). Config, data, decode,
model, loop, metrics, checkpoints, preemption, run folder and report each live in their own module.
"""

import importlib.util
import sys
import warnings

# Run as a script, this file's folder (train/) is what Python puts on sys.path, not the project's.
if importlib.util.find_spec("train") is None:
    print("error: the `train` package is not importable: install the project (pip install -e .) or run "
          "`python -m train.main` from its folder", file=sys.stderr)
    sys.exit(2)  # errors.EXIT_USAGE, which cannot be imported: it is the package that is missing

from train import paths, preemption
from train.archs import check_arch
from train.config import Config, parse_config
from train.errors import UsageError, report_usage_error, report_write_error
from train.files import DISK_ERRNOS


def check_quickly(cfg: Config) -> None:
    """What can be checked before the seconds of importing torch: the arch and a local dataset path."""
    check_arch(cfg.arch)
    paths.check_dataset(cfg.dataset)


def main(argv=None) -> int:
    # DDP's note that 1x1 convolutions' gradient strides differ from its buckets' is about size-1 dimensions:
    # nothing a user can act on, printed by every process of every run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    preemption.listen()  # before anything slow: a preemption signal during data loading is kept, not fatal
    try:
        cfg = parse_config(argv)
        check_quickly(cfg)
        from train import process  # torch, torchvision, Accelerate: seconds

        return process.run(cfg)
    except UsageError as e:
        return report_usage_error(e)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        return report_write_error(e)


if __name__ == "__main__":
    sys.exit(main())
