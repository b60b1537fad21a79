"""File I/O shared by the run folder, checkpoints and the decode cache: atomic writes, hashes, strict JSON."""

import hashlib
import json
import math
import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves the old file, and no half of a new one
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(obj, **kwargs) -> str:
    """Strict JSON: NaN and infinities, which json.dumps would write as bare NaN/Infinity (not JSON, and
    refused by jq, JavaScript and many loaders), become null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)
