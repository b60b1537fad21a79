"""Small image datasets in the hub's parquet layout, with structure a model can learn quickly."""

from pathlib import Path

import numpy as np

CLASS_NAMES = ["red", "green", "blue", "yellow"]
_COLOURS = np.array([[200, 40, 40], [40, 190, 60], [50, 60, 210], [210, 200, 40]], dtype=np.float32)


def make_images(n: int, seed: int, num_classes: int = len(CLASS_NAMES), size: int = 32):
    """Class k: a noisy image of colour k with a stripe pattern whose direction also depends on k."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for label in labels:
        stripes = ((xx if label % 2 else yy) // 4 % 2)[..., None] * 40.0
        base = _COLOURS[label % len(_COLOURS)] * (0.8 + 0.4 * rng.random())
        img = base + stripes + rng.normal(0, 25, (size, size, 3))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images, labels.tolist()


def write_parquet_dataset(root: Path, n_train: int = 256, n_test: int = 101, seed: int = 0,
                          class_names=CLASS_NAMES, label_offset: int = 0) -> Path:
    """Write train/test parquet files as the hub stores them (`data/<split>-00000-of-00001.parquet`)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = make_images(n, split_seed, len(class_names))
        ds = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in images], "label": [label + label_offset for label in labels]},
            features=features if not label_offset else None)
        if not label_offset:
            ds = ds.cast(features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root
