"""Hugging Face dataset -> decoded uint8 tensors -> index-batched DataLoaders.

Each split is decoded once into an (N, 3, H, W) uint8 tensor: per-item PIL
decoding through `with_transform` costs more than a small network's forward
pass. Augmentation then runs per batch on the training device (train/augment.py).
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

from train import decode
from train.errors import UsageError, first_line
from train.failpoints import delay
from train.paths import check_dataset, is_local

# After a Hub failure: the two ways forward, as one line.
HUB_HELP = ("; give a local folder instead, or fetch it once where there is network: python -c \"import datasets; "
            "datasets.load_dataset('{name}').save_to_disk('data/{short}')\" and pass --dataset data/{short} "
            "(HF_HUB_OFFLINE=1 reads the Hub's cache without asking the Hub)")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self):
        return len(self.labels)

    def subset(self, indices) -> "Split":
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return Split(self.images[indices], self.labels[indices])

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def split(self, parts: list) -> list:
        """A Split of the rows of each index array in `parts`, in its order, each a view of these images: the
        rows are permuted in place (the parts in turn, the rows no part takes after them). Copies, as subset()
        makes, would double the decoded train split at its peak, beyond what decode's memory check counts.
        This split's own order is gone afterwards."""
        taken = np.concatenate(parts)
        order = np.concatenate([taken, np.setdiff1d(np.arange(len(self)), taken)])
        _permute_rows(self.images.numpy(), order)
        labels, out, start = self.labels[torch.as_tensor(order)], [], 0
        for part in parts:
            out.append(Split(self.images[start:start + len(part)], labels[start:start + len(part)]))
            start += len(part)
        return out


def _permute_rows(rows: np.ndarray, order: np.ndarray) -> None:
    """rows[:] = rows[order], in place, one row of extra memory: each cycle of the permutation is followed
    from its first row, which is kept aside until the cycle closes."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        first, i = rows[start].copy(), start
        while order[i] != start:
            rows[i] = rows[order[i]]
            done[i], i = True, order[i]
        rows[i], done[i] = first, True


@dataclass
class ImageData:
    train: Split
    val: Split
    test: Split
    class_names: list
    val_source: str  # where validation images come from, for the report
    skipped: dict = field(default_factory=dict)  # undecodable rows left out per split (--skip-bad-images)
    decoded: str = ""  # the decode geometry (decode.Geometry), for config.yaml and the report
    val_is_test: bool = False  # --val-size 0: the test split also chose the best epoch

    def limit(self, batches: int, batch_size: int, eval_batch_size: int, world_size: int) -> None:
        """Keep the first `batches` batches of every split (--limit-batches, for smoke runs)."""
        self.train = self.train.subset(range(min(len(self.train), batches * batch_size * world_size)))
        self.val = self.val.subset(range(min(len(self.val), batches * eval_batch_size * world_size)))
        self.test = self.test.subset(range(min(len(self.test), batches * eval_batch_size * world_size)))

    def place(self, device: torch.device, budget: float = 0.5) -> bool:
        """Keep every split on the GPU when it fits in `budget` of its free memory: batches are then
        gathered where they are trained. Otherwise they stay in host memory, pinned per batch."""
        if device.type != "cuda":
            return False
        splits = {id(s): s for s in (self.train, self.val, self.test)}.values()  # val may be test
        needed = sum(s.images.numel() + 8 * s.labels.numel() for s in splits)
        if needed > budget * torch.cuda.mem_get_info(device)[0]:
            return False
        moved = {id(s): s.to(device) for s in splits}
        self.train, self.val, self.test = moved[id(self.train)], moved[id(self.val)], moved[id(self.test)]
        return True

    def sizes(self) -> dict:
        return {"train": len(self.train), "val_source": self.val_source, "test": len(self.test),
                "skipped": self.skipped, "decoded": self.decoded}


def load_image_data(cfg) -> ImageData:
    splits = load_dataset_dict(cfg.dataset)
    for needed in ("train", "test"):
        if needed not in splits:
            raise UsageError(f"dataset {cfg.dataset} has no '{needed}' split (it has: {', '.join(splits)})")
    image_col, label_col, class_names = find_columns(splits["train"].features, cfg)
    (train, test), skipped, geometry = decode_splits([splits["train"], splits["test"]], ["train", "test"], image_col,
                                                   label_col, len(class_names), cfg)
    held_out = cfg.val_images or cfg.val_size
    labels, rest = train.labels.numpy(), np.arange(len(train))
    try:
        if held_out:
            rest, val_idx = train_test_split(rest, test_size=held_out, stratify=labels, random_state=cfg.seed)
        if cfg.train_images and cfg.train_images < len(rest):
            rest, _ = train_test_split(rest, train_size=cfg.train_images, stratify=labels[rest],
                                       random_state=cfg.seed)
    except ValueError as e:  # more images asked for than there are, or too few for every class
        raise UsageError(f"cannot split {len(train)} training images as asked (--val-size/--val-images/"
                         f"--train-images): {first_line(e)}") from None
    if not held_out:
        (train,) = train.split([rest])
        return ImageData(train, test, test, class_names, "the test split (--val-size 0)", skipped,
                         geometry.describe(), val_is_test=True)
    source = f"{len(val_idx)} images held out of the train split (stratified, seed {cfg.seed})"
    if cfg.train_images:
        source += f"; training uses {len(rest)} of the other {len(train) - len(val_idx)}"
    train, val = train.split([rest, val_idx])
    return ImageData(train, val, test, class_names, source, skipped, geometry.describe())


def load_dataset_dict(name: str):
    import datasets  # slow import; keep it off the --help path
    import huggingface_hub

    datasets.disable_progress_bars()  # our own bar reports progress; theirs would bury error lines
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retries' warnings: a failure is our one line
    check_dataset(name)
    path = Path(os.path.expanduser(name))
    try:
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        loaded = datasets.load_dataset(str(path) if is_local(name) else name)
    except Exception as e:  # offline hub, missing files, bad layout: all the user's to fix
        help = "" if is_local(name) else HUB_HELP.format(name=name, short=name.split("/")[-1])
        raise UsageError(f"could not load dataset {name}: {first_line(e)}{help}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise UsageError(f"dataset {name} must have named splits (train, test)")
    return loaded


def find_columns(features, cfg):
    """Return (image column, label column, class names) from the dataset's features."""
    import datasets

    image_col = cfg.image_column or next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    label_col = cfg.label_column or next((k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None)
    if image_col is None or image_col not in features:
        raise UsageError(f"dataset {cfg.dataset} has no image column {image_col or ''} (columns: "
                         f"{', '.join(features)}); name it with --image-column")
    if label_col is None or label_col not in features:
        raise UsageError(f"dataset {cfg.dataset} has no label column {label_col or ''} (columns: "
                         f"{', '.join(features)}); name it with --label-column")
    label_feature = features[label_col]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise UsageError(f"label column '{label_col}' is {label_feature}, not a ClassLabel: class names are "
                         "unknown; cast it with dataset.cast_column(..., ClassLabel(names=[...]))")
    return image_col, label_col, list(label_feature.names)


def decode_splits(datasets_: list, names: list, image_col, label_col, num_classes, cfg) -> tuple:
    """([Split per dataset], {name: rows skipped}, Policy): labels checked, images decoded under one size
    geometry, each split read from the decode cache when this exact data was decoded so before."""
    labels = [_labels(ds, label_col, num_classes) for ds in datasets_]
    where = [f"dataset {cfg.dataset}, split '{name}', column '{image_col}'" for name in names]
    raw = [None] * len(datasets_)

    def column(i):  # the encoded images, read only when needed
        if raw[i] is None:
            raw[i] = encoded_images(datasets_[i], image_col)
        return raw[i]

    commons = [_cached_json(_cache_file(ds, image_col, cfg.decode_cache, "sizes", ".json"),
                            lambda i=i: {"common": decode.common_size(column(i))})["common"]
               for i, ds in enumerate(datasets_)]
    geometry = decode.choose_geometry(commons, cfg.decode_size, cfg.image_size)
    tag = f"{geometry.size}{'r' if geometry.resize else ''}"
    splits, skipped = [], {}
    for i, ds in enumerate(datasets_):
        cache = _cache_file(ds, image_col, cfg.decode_cache, tag, ".safetensors")
        cached = _read_cache(cache, len(labels[i]), cfg.skip_bad_images) if cache else None
        if cached is None:
            decode.check_memory(len(ds), geometry, where[i])
            cached = decode.decode_all(column(i), geometry, where[i], cfg.skip_bad_images)
            if cache:
                _write_cache(cache, *cached)
        images, rows = cached
        splits.append(Split(images, labels[i] if rows is None else labels[i][rows]))
        skipped[names[i]] = 0 if rows is None else len(labels[i]) - len(rows)
    return splits, skipped, geometry


def encoded_images(ds, image_col: str) -> list:
    """The image column as stored ({"bytes", "path"} per row), not decoded."""
    import datasets

    return ds.cast_column(image_col, datasets.Image(decode=False)).data.column(image_col).to_pylist()


def _labels(ds, label_col, num_classes) -> torch.Tensor:
    labels = torch.tensor(ds.data.column(label_col).to_numpy(zero_copy_only=False), dtype=torch.long)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise UsageError(f"label column '{label_col}' holds {labels[bad][0].item()}, outside the "
                         f"{num_classes} classes 0..{num_classes - 1}")
    return labels


def _cache_file(ds, image_col: str, cache_dir: str, tag: str, suffix: str):
    # The fingerprint changes whenever the data files do, so a stale cache is never read.
    if cache_dir in ("", "off") or not getattr(ds, "_fingerprint", None):
        return None
    return Path(os.path.expanduser(cache_dir)) / f"{ds._fingerprint}-{image_col}-{len(ds)}-{tag}{suffix}"


def _cached_json(path, compute) -> dict:
    """compute(), remembered in `path` (None: not remembered)."""
    import json

    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    value = compute()
    if path is not None:
        _write_to_cache(path, lambda tmp: tmp.write_text(json.dumps(value)))
    return value


def _read_cache(path: Path, n: int, skip_bad: bool):
    """(images, kept rows or None) from the cache, or None to decode again."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path)) if path.is_file() else {}
    except (SafetensorError, OSError):
        return None  # unreadable: decode again and overwrite it
    images, rows = saved.get("images"), saved.get("rows")
    if images is None or (rows is not None and not skip_bad):  # rows were skipped: without the option, say so
        return None
    return (images, rows) if len(images) == (n if rows is None else len(rows)) else None


def _write_cache(path: Path, images: torch.Tensor, rows) -> None:
    from safetensors.torch import save_file

    tensors = {"images": images, **({"rows": rows} if rows is not None else {})}
    _write_to_cache(path, lambda tmp: save_file(tensors, str(tmp)))


def _write_to_cache(path: Path, write) -> None:
    from train.files import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:  # a read-only or full disk costs the next run a decode, nothing more
        print(f"warning: could not write the decode cache {path}: {e}", file=sys.stderr, flush=True)


class _Indices(Dataset):
    """Yields indices; the collate function gathers whole batches from the split's tensors at once."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class _GatherBatch:
    def __init__(self, split: Split, train: bool = False):
        self.split, self.train = split, train

    def __call__(self, indices):
        if self.train:
            delay("fetch_batch")  # the stall tests block one rank's training batch here
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.split.images.is_cuda:  # a CPU index into GPU tensors would be a blocking copy: two syncs a batch
            idx = idx.pin_memory().to(self.split.images.device, non_blocking=True)
        return self.split.images[idx], self.split.labels[idx]


class EpochShuffle(Sampler):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(split: Split, batch_size: int, *, shuffle_seed=None, num_workers=0) -> DataLoader:
    sampler = EpochShuffle(len(split), shuffle_seed) if shuffle_seed is not None else None
    on_host = split.images.device.type == "cpu"
    return DataLoader(_Indices(len(split)), batch_size=batch_size, sampler=sampler,
                      collate_fn=_GatherBatch(split, train=shuffle_seed is not None),
                      num_workers=num_workers if on_host else 0,
                      pin_memory=on_host and torch.cuda.is_available(),
                      persistent_workers=num_workers > 0 and on_host)
