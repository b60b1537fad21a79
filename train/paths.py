"""Whether a --dataset names a local folder or a Hugging Face Hub id: decided here, at once, from the disk.

A Hub id is `name` or `owner/name`. A name is a local path when it exists, starts like a path (`.`, `/`,
`~`), has more than one `/`, or its first part is a folder here: `mydata/cifar10` beside a `mydata/` folder
is a mistyped path, not a Hub id to wait 30 s for. A local path that does not exist is an error at once,
with the nearest names that do exist.
"""

import os
from pathlib import Path

from train.errors import UsageError, did_you_mean


def is_local(name: str) -> bool:
    path = Path(os.path.expanduser(name))
    return (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def is_hub_id(name: str) -> bool:
    return bool(name) and not is_local(name)


def check_dataset(name: str) -> None:
    """Refuse a local --dataset that does not exist, suggesting the closest names in its nearest existing folder."""
    path = Path(os.path.expanduser(name))
    if not is_local(name) or path.exists():
        return
    parent = next((p for p in path.parents if p.is_dir()), None)
    entries = [p.name for p in parent.iterdir() if not p.name.startswith(".")] if parent else []
    missing = path.relative_to(parent).parts[0] if parent else name
    show = str if parent == Path(".") else lambda entry: f"{parent}/{entry}"
    raise UsageError(f"--dataset {name}: no such folder{did_you_mean(missing, entries, show=show)}")
