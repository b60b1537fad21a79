"""Classify images with a trained model, preprocessed exactly as the run evaluated.

    python -m train.predict runs/x photo.png more_photos/ [--top-k 5] [--out predictions.csv]
    python -m train.predict runs/x --dataset uoft-cs/cifar10 --split test [--metrics metrics.json]

MODEL: a run folder, a model.safetensors or a checkpoint folder; the model and its input (arch, classes, stem,
decode and input size, normalisation) come from its record. Writes a CSV (input, then top-k classes with
their probabilities) to stdout or --out. With a labelled --dataset it also prints accuracy, macro-F1 and the
confusion matrix (and writes them to --metrics). Exit status: 0 when every input was classified, 1 when some
image could not be read (one line each on stderr; the others are still classified), 2 for bad input.
"""

import argparse
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from train import decode
from train.augment import BatchTransform
from train.model_files import add_model_argument, build_trained, load_model
from train.errors import UsageError, exit_status
from train.files import dumps


def image_files(inputs: list) -> list:
    """Files as given; folders searched recursively for files of the formats PIL reads."""
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"{item} is neither an image file nor a folder")
    if not found:
        raise UsageError(f"no image files in {', '.join(map(str, inputs))}")
    return found


def dataset_images(name: str, split: str, spec):
    """(encoded images, labels or None, names of the rows) of a Hugging Face dataset split."""
    from train.data import encoded_images, find_columns, load_dataset_dict

    splits = load_dataset_dict(name)
    if split not in splits:
        raise UsageError(f"dataset {name} has no split '{split}' (it has: {', '.join(splits)})")
    ds = splits[split]
    image_col, label_col, classes = find_columns(ds.features, SimpleNamespace(dataset=name, image_column="",
                                                                               label_column=""))
    if classes != list(spec.class_names):
        raise UsageError(f"dataset {name} has classes {classes}, the model {list(spec.class_names)}")
    raw = encoded_images(ds, image_col)
    labels = np.asarray(ds.data.column(label_col).to_numpy(zero_copy_only=False))
    return raw, labels, [str(i) for i in range(len(raw))]


def decode_inputs(spec, files: list, dataset: str, split: str, where: str, limit: int = 0) -> tuple:
    """(uint8 images, labels or None, names, whether some were unreadable) of image files and folders or of a
    dataset split (the first `limit`, when given), decoded as the run decoded its own: at spec.decode_size (as
    stored when all share that size), to be resized to spec.image_size on the device. An unreadable image is
    left out, with one line on stderr."""
    side = spec.decode_size or spec.image_size
    if dataset:
        raw, labels, names = dataset_images(dataset, split, spec)
        geometry = decode.choose_geometry([decode.common_size(raw)], side, spec.image_size)
    else:
        paths = image_files(files)
        raw, labels, names = [{"path": str(p), "bytes": None} for p in paths], None, [str(p) for p in paths]
        geometry = decode.Geometry(side, resize=True)
    if limit:
        raw, names, labels = raw[:limit], names[:limit], labels[:limit] if labels is not None else None
    images, rows = decode.decode_all(raw, geometry, where, skip_bad=True, skipped_because="left out", files=not dataset)
    if rows is not None:
        names, labels = [names[i] for i in rows.tolist()], labels[rows.numpy()] if labels is not None else None
    return images, labels, names, rows is not None


@torch.no_grad()
def probabilities(model, images: torch.Tensor, spec, batch_size: int, device) -> torch.Tensor:
    """Softmax over the classes for uint8 (N, 3, S, S) images, as evaluation computes its logits."""
    transform = BatchTransform(spec.image_size, mean=spec.mean, std=spec.std)
    model = model.to(device)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not sys.stderr.isatty()):
        x = transform(images[start:start + batch_size].to(device))
        out.append(model(x).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(spec.class_names))


def write_csv(stream, names: list, probs: torch.Tensor, class_names: list, top_k: int) -> None:
    k = min(top_k, len(class_names))
    writer = csv.writer(stream)
    writer.writerow(["input"] + [f"{kind}{i}" for i in range(1, k + 1) for kind in ("class", "prob")])
    values, indices = probs.topk(k, dim=1)
    for name, p, idx in zip(names, values.tolist(), indices.tolist()):
        writer.writerow([name] + [v for c, q in zip(idx, p) for v in (class_names[c], f"{q:.6f}")])


def run(args) -> int:
    state_dict, spec, _ = load_model(args.model)
    model = build_trained(state_dict, spec, args.model)
    images, labels, names, some_unreadable = decode_inputs(spec, args.inputs, args.dataset, args.split, "predict")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probs = probabilities(model, images, spec, args.batch_size, device)
    if args.out:
        with open(args.out, "w", newline="") as f:
            write_csv(f, names, probs, list(spec.class_names), args.top_k)
    else:
        write_csv(sys.stdout, names, probs, list(spec.class_names), args.top_k)
    if labels is not None:
        report_metrics(probs.argmax(1).numpy(), labels, list(spec.class_names), args.metrics)
    return 1 if some_unreadable else 0


def report_metrics(preds, labels, class_names, path) -> None:
    from train.metrics import classification_metrics

    metrics = classification_metrics(preds, labels, class_names)
    print(f"accuracy {metrics['acc']:.4f}, macro-F1 {metrics['f1_macro']:.4f} on {metrics['num_samples']} images",
          *confusion_lines(metrics["confusion_matrix"], class_names, path), sep="\n", file=sys.stderr, flush=True)
    if path:
        Path(path).write_text(dumps(metrics, indent=2) + "\n")


WIDTH = 100  # characters of the widest line printed: a terminal or a log shows it unwrapped


def confusion_lines(matrix, class_names: list, path) -> list:
    """The confusion matrix as a table (rows: true class; columns: predicted class, numbered as the rows), or,
    where that would be wider than WIDTH (many classes), one line saying where it is."""
    cm = np.asarray(matrix)
    names = [f"{i} {name[:20]}" for i, name in enumerate(class_names)]
    first, cell = max(map(len, names)), len(str(max(int(cm.max(initial=0)), len(class_names) - 1))) + 2
    table = [" " * first + "".join(f"{i:>{cell}}" for i in range(len(class_names)))]
    table += [f"{name:<{first}}" + "".join(f"{int(v):>{cell}}" for v in row) for name, row in zip(names, cm)]
    if len(table[0]) <= WIDTH:
        return ["confusion matrix (rows: true class; columns: predicted class, numbered as the rows):", *table]
    where = f"in {path}" if path else "--metrics FILE writes it"
    return [f"confusion matrix: {len(class_names)} x {len(class_names)} classes, too wide to print ({where})"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively)")
    parser.add_argument("--dataset", default="", help="a Hugging Face dataset (hub id or local folder) instead")
    parser.add_argument("--split", default="test", help="its split (default: test)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image in the CSV (default: 5)")
    parser.add_argument("--out", default="", help="CSV file (default: stdout)")
    parser.add_argument("--metrics", default="", help="with a labelled --dataset: also write the metrics here")
    parser.add_argument("--batch-size", type=int, default=256)
    return exit_status(lambda: run(checked(parser.parse_args(argv))))


def checked(args):
    if bool(args.inputs) == bool(args.dataset):
        raise UsageError("give image files or folders, or --dataset (not both)")
    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError("--top-k and --batch-size must be positive")
    return args


if __name__ == "__main__":
    sys.exit(main())
