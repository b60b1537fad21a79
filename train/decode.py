"""Images decoded once into uint8 tensors: one geometry for every split, memory checked first, in parallel.

The geometry: when every image of every split has one square size, images are kept as stored. Otherwise each
is resized (shorter side, antialiased) and centre-cropped to a square of --decode-size pixels (default
--image-size), so train and test see the same geometry and no image is stretched.
"""

import io
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from train.errors import UsageError

# Every decode error PIL raises for a damaged or foreign file; UnidentifiedImageError is an OSError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Geometry:
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


def choose_geometry(commons: list, decode_size: int, image_size: int) -> Geometry:
    """One geometry for all splits, from each split's common size (None: mixed sizes)."""
    first = commons[0]
    if first is not None and all(c == first for c in commons) and first[0] == first[1] and decode_size in (0, first[0]):
        return Geometry(first[0], resize=False)
    return Geometry(decode_size or image_size, resize=True)


def memory_needed(images: int, geometry: Geometry, workers: int = 0) -> int:
    """Bytes decode_all needs at its peak for `images` images under `geometry` with `workers` (counted as decode_all
    counts them): the output, plus, when decoding in parallel, the chunks in flight, one per worker, about 3
    chunks' bytes each: its encoded images (cut at about the bytes they decode to) pickled here while they
    are sent, and in the worker as received and as unpickled, then decoded there (measured: 3.2 with random
    pixels, whose PNGs are as large as their pixels). Decoded chunks are read straight into the output.
    PIL's own buffers, for one image at a time, are not counted."""
    per_image, rows = _image_bytes(geometry), _chunk_rows(geometry)
    workers = _workers(workers, -(-images // rows))
    return images * per_image + (0 if workers <= 1 else 3 * workers * rows * per_image)


def check_memory(images: int, geometry: Geometry, where: str, workers: int = 0) -> None:
    """Refuse, with the numbers and the options, a decode that would not fit in this machine's memory."""
    import psutil

    needed = memory_needed(images, geometry, workers)
    available = psutil.virtual_memory().available
    if needed > 0.8 * available:
        raise UsageError(f"{where}: decoding {images} images at {geometry.size}x{geometry.size} needs "
                         f"{needed / 1e9:.1f} GB of memory, {available / 1e9:.1f} GB is available; use a smaller "
                         "--decode-size, fewer images (--train-images) or a machine with more memory")


def decode_all(raw: list, geometry: Geometry, where: str, skip_bad: bool, workers: int = 0,
               skipped_because: str = "--skip-bad-images", files: bool = False) -> tuple:
    """(uint8 (N, 3, S, S), indices of the rows kept or None when all were), decoded by `workers` processes
    (0: one per CPU this process may use). Each chunk of rows lands in its own place, so the result is the
    same whatever the number of workers. Processes rather than threads: for small images PIL's Python
    code, not its GIL-free C decoder, takes most of the time.

    Memory: the output is allocated once, in its final layout, and each chunk is written into it as it
    arrives; rows left out are compacted in place and the result is a view of its first rows. The peak is
    memory_needed(len(raw), geometry, workers). `files`: `raw` are image files (named by path), not a dataset's rows."""
    import torch

    out = np.empty((len(raw), 3, geometry.size, geometry.size), dtype=np.uint8)
    chunks = _chunks(raw, geometry)
    workers = _workers(workers, len(chunks))
    if workers > 1 and sys.executable:  # workers are interpreters: none where Python is embedded
        failures = _decode_parallel(raw, geometry, chunks, workers, out)
    else:
        failures = _decode_rows(raw, geometry, out, 0)
    failures.sort()  # in row order
    for i, error in failures:
        path = f" ({raw[i]['path']})" if raw[i].get("path") else ""
        item = f"image file {raw[i]['path']}" if files else f"row {i}{path}"
        if not skip_bad:
            raise UsageError(f"{where}, {item}: cannot decode the image ({error}); fix or remove it, "
                             "or pass --skip-bad-images to leave such rows out")
        print(f"warning: {where}, {item}: undecodable image skipped ({skipped_because}): {error}",
              file=sys.stderr, flush=True)
    if not failures:
        return torch.from_numpy(out), None
    bad = [i for i, _ in failures]
    keep = np.ones(len(raw), dtype=bool)
    keep[bad] = False
    return torch.from_numpy(_compact(out, bad)), torch.from_numpy(np.flatnonzero(keep).astype(np.int64))


CHUNK = 2048  # at most this many images per task
CHUNK_BYTES = 4 << 20  # and at most this many bytes of decoded (and of encoded) images per task


def _decode_parallel(raw: list, geometry: Geometry, chunks: list, workers: int, out: np.ndarray) -> list:
    """Decode `chunks` of `raw` into `out` with `workers` worker processes (_with_workers); [(row, error text)].

    One thread per worker hands it one chunk at a time, its encoded images pickled, and reads the decoded
    chunk straight into its rows of `out`: in flight, per worker, one task here and the task and its
    decoded chunk in the worker."""
    import pickle
    import threading

    todo, lock, failures, errors = iter(chunks), threading.Lock(), [], []

    def feed(worker):
        try:
            while not errors:
                with lock:
                    bounds = next(todo, None)
                if bounds is None:
                    return
                start, stop = bounds
                _write_message(worker.stdin, pickle.dumps((raw[start:stop], geometry, start), pickle.HIGHEST_PROTOCOL))
                failures.extend(pickle.loads(_read_message(worker.stdout)))
                _read_exactly(worker.stdout, memoryview(out[start:stop]).cast("B"))
        except BaseException as e:  # a worker that died (EOF, broken pipe) or this process interrupted
            errors.append(e)
        finally:
            try:
                worker.stdin.close()  # the worker's signal to exit
            except OSError:  # it is gone already
                pass

    codes = _with_workers(workers, feed)
    if errors:
        raise RuntimeError(f"a decode worker failed (exit statuses {codes}; its error, if any, is above): "
                           f"{type(errors[0]).__name__}: {errors[0]}")
    return failures


def _with_workers(n: int, feed) -> list:
    """Start `n` decode workers, run feed(worker) in a thread for each, and return their exit statuses; if this
    process is interrupted meanwhile, kill them first.

    The workers are fresh interpreters running _serve, started with subprocess (fork and exec in C: safe in a
    multi-threaded process, where a bare os.fork, multiprocessing's "fork", can deadlock the child on a lock another
    thread held). Not multiprocessing's "spawn" or "forkserver" either: their workers may re-import the main script
    (train/main.py, a benchmark) and so PyTorch, seconds a worker. These import only numpy, PIL and this module."""
    import subprocess
    import threading

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where this `train` package is
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); import train.decode as d; d._serve()"]
    pool = []
    try:
        for _ in range(n):
            pool.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        threads = [threading.Thread(target=feed, args=(worker,), daemon=True) for worker in pool]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        for worker in pool:
            worker.kill()
        raise
    finally:
        codes = [worker.wait() for worker in pool]
    return codes


def _serve() -> None:
    """A decode worker: decodes the chunks sent on stdin (_decode_parallel) until stdin closes; writes, for each, the
    failed rows and the decoded bytes. Its own prints, if any, go to stderr, not into the results."""
    import pickle
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us by closing stdin
    results = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    tasks = sys.stdin.buffer
    while (task := _read_message(tasks)) is not None:
        items, geometry, start = pickle.loads(task)
        del task
        out = np.empty((len(items), 3, geometry.size, geometry.size), dtype=np.uint8)
        failed = _decode_rows(items, geometry, out, start)
        del items
        _write_message(results, pickle.dumps(failed))
        results.write(memoryview(out).cast("B"))
        results.flush()
        del out


def _write_message(stream, payload: bytes) -> None:
    stream.write(len(payload).to_bytes(8, "little"))
    stream.write(payload)
    stream.flush()


def _read_message(stream):
    """The next message's bytes, or None at the end of the stream (between messages)."""
    header = stream.read(8)
    if not header:
        return None
    if len(header) < 8:
        raise EOFError("the other end closed mid-message")
    payload = bytearray(int.from_bytes(header, "little"))
    _read_exactly(stream, memoryview(payload))
    return payload


def _read_exactly(stream, view: memoryview) -> None:
    while len(view):
        n = stream.readinto(view)
        if not n:
            raise EOFError("the other end closed mid-message")
        view = view[n:]


def _decode_rows(items: list, geometry: Geometry, out: np.ndarray, start: int) -> list:
    """Decode `items` into `out` (one (3, S, S) row each), [(row, error text)] for those that fail; rows are
    numbered from `start`. A failed row is left as it was."""
    failed = []
    for j, item in enumerate(items):
        try:
            out[j] = _decode(item, geometry).transpose(2, 0, 1)
        except DECODE_ERRORS as e:  # as text: not every exception survives the trip back from a worker
            failed.append((start + j, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"))
    return failed


def _compact(out: np.ndarray, bad: list) -> np.ndarray:
    """The rows of `out` not in `bad` (sorted), moved in place to its front: a view of its first rows."""
    flat, row = out.reshape(-1), out[0].size  # 1-D: numpy moves overlapping same-direction data without a copy
    kept = bad[0]
    for k, b in enumerate(bad):
        stop = bad[k + 1] if k + 1 < len(bad) else len(out)
        if stop > b + 1:
            flat[kept * row:(kept + stop - b - 1) * row] = flat[(b + 1) * row:stop * row]
            kept += stop - b - 1
    return out[:kept]


def _chunks(raw: list, geometry: Geometry) -> list:
    """[(start, stop)] rows per task: _chunk_rows(geometry) rows at most, cut early once their encoded images reach
    the bytes a full chunk decodes to (large files resized down)."""
    rows, limit = _chunk_rows(geometry), _chunk_rows(geometry) * _image_bytes(geometry)
    chunks, start, size = [], 0, 0
    for i, item in enumerate(raw):
        size += len(item.get("bytes") or b"")
        if i + 1 - start == rows or size >= limit:
            chunks.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(raw):
        chunks.append((start, len(raw)))
    return chunks


def _chunk_rows(geometry: Geometry) -> int:
    return max(1, min(CHUNK, CHUNK_BYTES // _image_bytes(geometry)))


def _image_bytes(geometry: Geometry) -> int:
    return 3 * geometry.size ** 2


def _workers(workers: int, chunks: int) -> int:
    """Processes decode_all uses for `workers` (0: one per CPU this process may use) and that many chunks."""
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(workers, chunks)


def _decode(item, geometry: Geometry) -> np.ndarray:
    with Image.open(_source(item)) as img:
        img = img.convert("RGB")  # decodes fully: a truncated file fails here, in its row
    if geometry.resize:
        w, h = img.size
        scale = geometry.size / min(w, h)
        w, h = max(geometry.size, round(w * scale)), max(geometry.size, round(h * scale))
        img = img.resize((w, h), Image.BILINEAR)  # PIL's resize filters antialias when shrinking
        left, top = (w - geometry.size) // 2, (h - geometry.size) // 2
        img = img.crop((left, top, left + geometry.size, top + geometry.size))
    elif img.size != (geometry.size, geometry.size):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, its header said {geometry.size}x{geometry.size}")
    return np.asarray(img)


def _source(item):
    return io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
