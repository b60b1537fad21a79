"""Export a trained model: to ONNX, checked with onnxruntime against PyTorch on real images; or as a Hugging
Face Hub model folder with its model card (train/hub.py), optionally pushed to the Hub.

    python -m train.export runs/x --onnx model.onnx [--dataset ID --split test | --images a.png dir/]
    python -m train.export runs/x --hub hub/x [--dataset-id uoft-cs/cifar10] [--push-to-hub USER/REPO]

The graph takes normalised RGB float images (N, 3, S, S), any N (dynamic batch axis), and returns logits;
its metadata holds what a runtime needs to prepare them: class_names, mean, std, image_size (and arch,
cifar_stem, decode_size). Opset 18: what torch's exporter targets, run by onnxruntime 1.14 and newer.
The check runs up to --check images through both and fails (exit 1, one line) unless the largest
absolute logit difference is within --tolerance and the top-1 class is the same for every image.
Needs the optional extra: pip install -e ".[export]".
"""

import argparse
import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from train import hub, run_dir
from train.augment import BatchTransform
from train.checkpoint import build_trained, load_model
from train.errors import UsageError, report_usage_error
from train.files import atomic_write

OPSET = 18
EXTRA = 'the export extra is not installed: pip install -e ".[export]" (onnx, onnxruntime, onnxscript)'


def check_extra() -> None:
    try:
        for name in ("onnx", "onnxruntime", "onnxscript"):
            importlib.import_module(name)
    except ImportError:
        raise UsageError(EXTRA) from None


def export(model: torch.nn.Module, spec, path: Path) -> None:
    import onnx

    example = torch.zeros(2, 3, spec.image_size, spec.image_size)

    def write(tmp):
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each of its passes
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                        dynamo=True, verbose=False)
        graph = program.model_proto
        for key, value in spec.to_dict().items():
            graph.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
        graph.metadata_props.add(key="input", value="RGB float (N, 3, image_size, image_size): pixel / 255, "
                                                    "minus mean, divided by std, per channel")
        onnx.save(graph, str(tmp))

    atomic_write(path, write)


def check_images(args, spec) -> torch.Tensor:
    """Real images to compare on, decoded as the run decoded them: uint8 (N, 3, S, S)."""
    from train.predict import decode_inputs

    dataset = "" if args.images else (args.dataset or _run_dataset(args.model))
    images, _, _, _ = decode_inputs(spec, args.images, dataset, args.split, "export check", limit=args.check)
    if not len(images):
        raise UsageError("no readable image to check the exported model on")
    return images


def _run_dataset(model_path: str) -> str:
    config = Path(model_path) / run_dir.CONFIG
    if not config.is_file():
        raise UsageError("give --dataset or --images: real images to check the exported model on")
    import yaml

    return yaml.safe_load(config.read_text())["dataset"]


@torch.no_grad()
def compare(model, spec, path: Path, images: torch.Tensor) -> tuple:
    """(largest absolute logit difference, images with the same top-1, images) between PyTorch and onnxruntime."""
    import onnxruntime

    x = BatchTransform(spec.image_size, mean=spec.mean, std=spec.std)(images)
    expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    return float(np.abs(got - expected).max()), int((got.argmax(1) == expected.argmax(1)).sum()), len(x)


def run(args) -> int:
    if args.hub:
        return run_hub(args)
    check_extra()
    state_dict, spec, _ = load_model(args.model)
    model = build_trained(state_dict, spec, args.model)
    images = check_images(args, spec)
    out = Path(args.onnx)
    export(model, spec, out)
    diff, same, n = compare(model, spec, out, images)
    print(f"wrote {out} (opset {OPSET}); checked on {n} images: max |logit difference| {diff:.2e} "
          f"(tolerance {args.tolerance:.0e}), top-1 identical on {same}/{n}", flush=True)
    if diff > args.tolerance or same != n:
        print(f"error: {out} does not match PyTorch (max |logit difference| {diff:.2e}, top-1 identical on "
              f"{same}/{n}); do not ship it", file=sys.stderr, flush=True)
        return 1
    return 0


def run_hub(args) -> int:
    out = Path(args.hub)
    hub.write_folder(Path(args.model), out, args.dataset_id, args.push_to_hub)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", flush=True)
    if args.push_to_hub:
        url = hub.push(out, args.push_to_hub, private=args.private)
        print(f"pushed {out} to {args.push_to_hub}: {url}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run folder, model.safetensors, checkpoint folder, Hub model folder or "
                                      "hf://REPO_ID[@REVISION] (--hub: a finished run folder)")
    parser.add_argument("--onnx", default="", help="the ONNX file to write")
    parser.add_argument("--dataset", default="", help="check on this dataset's images (default: the run's dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", nargs="*", default=[], help="or on these image files and folders")
    parser.add_argument("--check", type=int, default=256, help="images to check on (default: 256)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference allowed")
    hub_options = parser.add_argument_group("Hugging Face Hub")
    hub_options.add_argument("--hub", default="", help="write a Hub model folder here: weights, config.json, "
                             "model card (README.md), config.yaml, plots")
    hub_options.add_argument("--dataset-id", default="", help="the Hub dataset the model card names (default: "
                             "the run's --dataset; give it when that was a local copy)")
    hub_options.add_argument("--push-to-hub", default="", metavar="REPO_ID", help="then upload the folder to this "
                             "Hub model repository (huggingface_hub; `hf auth login` first)")
    hub_options.add_argument("--private", action="store_true", help="create the repository private")
    try:
        args = parser.parse_args(argv)
        if bool(args.onnx) == bool(args.hub):
            raise UsageError("give --onnx FILE or --hub DIR (one of them)")
        if args.push_to_hub and not args.hub:
            raise UsageError("--push-to-hub needs --hub DIR: the folder to write and upload")
        return run(args)
    except UsageError as e:
        return report_usage_error(e)


if __name__ == "__main__":
    sys.exit(main())
