"""File I/O shared by the run folder, checkpoints and the decode cache: atomic writes, hashes, strict JSON."""

import errno
import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
LOW_SPACE = 64 << 20  # bytes left after a failed write that make "the disk is full" the likely cause


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new, never half of one.
    The file gets the mode a new file gets under the umask, whatever mode `write` created it with."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves the old file, and no half of a new one
        tmp.unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read without changing it: /proc (Linux 4.7+); else os.umask set and put back, which
    leaves a moment in which another thread would create files under umask 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: Path) -> None:
    """Give a regular file the mode open() gives a new file under the umask (0644 under umask 022, 0664 under
    002). safetensors writes its files 0600 (through a private temporary file), which would keep a shared run
    folder's weights from the group that can read everything else in it."""
    if Path(path).is_file() and not Path(path).is_symlink():
        os.chmod(path, 0o666 & ~umask())


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


def disk_error(path: Path, error: BaseException):
    """The OSError behind a failed write under `path` when the disk is full, read-only or forbidden, else None.

    Libraries report these in their own words (torch: "unexpected pos ...", safetensors: "StorageFull"),
    so besides the exception chain this looks at the disk itself.
    """
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            return OSError(cause.errno, cause.strerror, cause.filename or str(path))
        cause = cause.__cause__ or cause.__context__
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK):
        return OSError(errno.EACCES, "not writable (read-only or forbidden)", str(path))
    if shutil.disk_usage(folder).free < LOW_SPACE:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextmanager
def writing(path: Path):
    """Make a failed write under `path` that the disk caused an OSError naming the path (one line for the user)."""
    try:
        yield
    except Exception as e:
        disk = disk_error(path, e)
        if disk is None:
            raise
        raise disk from None
