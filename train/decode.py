"""Images decoded once into uint8 tensors: one size policy for every split, memory checked first, in parallel.

Policy: when every image of every split has one square size, images are kept as stored. Otherwise each
is resized (shorter side, antialiased) and centre-cropped to a square of --decode-size pixels (default
--image-size), so train and test see the same geometry and no image is stretched.
"""

import io
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from train.errors import UsageError

# Every decode error PIL raises for a damaged or foreign file; UnidentifiedImageError is an OSError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Policy:
    size: int  # side of the decoded square
    resize: bool  # False: every image already has this size

    def describe(self) -> str:
        if not self.resize:
            return f"as stored: every image is {self.size}x{self.size}"
        return f"shorter side resized to {self.size} px, centre-cropped to {self.size}x{self.size}"


def header_size(item):
    """(width, height) from the image's header alone, or None when it cannot be read."""
    try:
        with Image.open(_source(item)) as img:
            return img.size
    except DECODE_ERRORS:
        return None


def common_size(raw: list):
    """The (width, height) every readable image of a split has, or None when they differ (or there are none)."""
    sizes = {header_size(item) for item in raw} - {None}
    return list(sizes.pop()) if len(sizes) == 1 else None


def choose_policy(commons: list, decode_size: int, image_size: int) -> Policy:
    """One policy for all splits, from each split's common size (None: mixed sizes)."""
    first = commons[0]
    if first is not None and all(c == first for c in commons) and first[0] == first[1] and decode_size in (0, first[0]):
        return Policy(first[0], resize=False)
    return Policy(decode_size or image_size, resize=True)


def check_memory(images: int, policy: Policy, where: str) -> None:
    """Refuse, with the numbers and the options, a decode that would not fit in this machine's memory."""
    import psutil

    needed = images * 3 * policy.size ** 2
    available = psutil.virtual_memory().available
    if needed > 0.8 * available:
        raise UsageError(f"{where}: decoding {images} images at {policy.size}x{policy.size} needs "
                         f"{needed / 1e9:.1f} GB of memory, {available / 1e9:.1f} GB is available; use a smaller "
                         "--decode-size, fewer images (--train-images) or a machine with more memory")


def decode_all(raw: list, policy: Policy, where: str, skip_bad: bool, workers: int = 0,
               skipped_because: str = "--skip-bad-images") -> tuple:
    """(uint8 (N, 3, S, S), indices of the rows kept or None when all were), decoded by `workers` processes
    (0: one per CPU this process may use). Each chunk of rows lands in its own place, so the result is the
    same whatever the number of workers. Processes rather than threads: for small images PIL's Python
    code, not its GIL-free C decoder, takes most of the time."""
    import multiprocessing

    global _WORK
    out = np.empty((len(raw), policy.size, policy.size, 3), dtype=np.uint8)
    chunks = [(start, min(start + CHUNK, len(raw))) for start in range(0, len(raw), CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(chunks))
    _WORK = (raw, policy)  # forked workers inherit it: the encoded images are not pickled to them
    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = list(pool.imap_unordered(_decode_chunk, chunks))
        else:
            results = [_decode_chunk(chunk) for chunk in chunks]
    finally:
        _WORK = None
    failures = []
    for start, decoded, failed in results:
        out[start:start + len(decoded)] = decoded
        failures += failed
    for i, error in sorted(failures):  # in row order
        path = f" ({raw[i]['path']})" if raw[i].get("path") else ""
        if not skip_bad:
            raise UsageError(f"{where}, row {i}{path}: cannot decode the image ({error}); fix or remove it, "
                             "or pass --skip-bad-images to leave such rows out")
        print(f"warning: {where}, row {i}{path}: undecodable image skipped ({skipped_because}): {error}",
              file=sys.stderr, flush=True)
    rows = None
    if failures:
        rows = torch.tensor(sorted(set(range(len(raw))) - {i for i, _ in failures}), dtype=torch.long)
        out = out[rows.numpy()]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), rows


CHUNK = 2048  # images a worker decodes per task
_WORK = None


def _decode_chunk(bounds: tuple) -> tuple:
    """(start, uint8 (n, S, S, 3), [(row, error text)]) for rows start..stop of the work."""
    raw, policy = _WORK
    start, stop = bounds
    out = np.zeros((stop - start, policy.size, policy.size, 3), dtype=np.uint8)
    failed = []
    for i in range(start, stop):
        try:
            out[i - start] = _decode(raw[i], policy)
        except DECODE_ERRORS as e:  # as text: not every exception survives the trip back from a worker
            failed.append((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"))
    return start, out, failed


def _decode(item, policy: Policy) -> np.ndarray:
    with Image.open(_source(item)) as img:
        img = img.convert("RGB")  # decodes fully: a truncated file fails here, in its row
    if policy.resize:
        w, h = img.size
        scale = policy.size / min(w, h)
        w, h = max(policy.size, round(w * scale)), max(policy.size, round(h * scale))
        img = img.resize((w, h), Image.BILINEAR)  # PIL's resize filters antialias when shrinking
        left, top = (w - policy.size) // 2, (h - policy.size) // 2
        img = img.crop((left, top, left + policy.size, top + policy.size))
    elif img.size != (policy.size, policy.size):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, its header said {policy.size}x{policy.size}")
    return np.asarray(img)


def _source(item):
    return io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
