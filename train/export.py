"""Export a trained model: to ONNX, checked with onnxruntime against PyTorch on real images; or as a Hugging
Face Hub model folder with its model card (train/hub.py), optionally pushed to the Hub.

    python -m train.export runs/x --onnx model.onnx [--dataset ID --split test | --images a.png dir/]
    python -m train.export runs/x --hub hub/x [--dataset-id uoft-cs/cifar10] [--push-to-hub USER/REPO]

The graph takes normalised RGB float images (N, 3, S, S), any N (dynamic batch axis), and returns logits;
its metadata holds what a runtime needs to prepare them: class_names, mean, std, image_size (and arch,
cifar_stem, decode_size). Opset 18: what torch's exporter targets, run by onnxruntime 1.14 and newer.
The check runs up to --check images through both and fails (exit 1, one line) unless the largest
absolute logit difference is within --tolerance and the top-1 class is the same for every image whose top-2
logits PyTorch sets more than --tolerance apart (a near-tie may flip). The graph is written under a
temporary name and becomes FILE only when it passes; a rejected one is left as FILE.rejected.
Needs the optional extra: pip install -e ".[export]".
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from train import hub, run_dir
from train.augment import BatchTransform
from train.model_files import add_model_argument, build_trained, load_model
from train.errors import UsageError, exit_status
from train.files import atomic_write

OPSET = 18
REJECTED = ".rejected"  # suffix of an export that failed its check: kept to look into, never named *.onnx
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
    config = run_dir.read_config(Path(model_path))
    if not config:
        raise UsageError("give --dataset or --images: real images to check the exported model on")
    return config["dataset"]


class Check(NamedTuple):
    """How an exported graph's logits compare with PyTorch's on the same images."""

    max_diff: float  # largest absolute logit difference
    same: int  # images with the same top-1 class
    decisive: int  # images whose top-1 differs although PyTorch's top-1 leads its top-2 by more than the tolerance
    n: int

    def passed(self, tolerance: float) -> bool:
        return self.max_diff <= tolerance and not self.decisive


def compare_logits(expected: np.ndarray, got: np.ndarray, tolerance: float) -> Check:
    """Compare PyTorch's logits (`expected`) with the export's. A top-1 that differs where PyTorch's own margin
    (top-1 minus top-2 logit) is within the tolerance is a near-tie that differences within the tolerance may
    flip (seen: a gap of 1.3e-6 under a largest difference of 2e-6): not an error; any other one is."""
    top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
    differs = got.argmax(1) != expected.argmax(1)
    decisive = differs & (top2[:, 1] - top2[:, 0] > tolerance)
    diff = float(np.abs(got - expected).max()) if expected.size else 0.0
    return Check(diff, int((~differs).sum()), int(decisive.sum()), len(expected))


@torch.no_grad()
def compare(model, spec, path: Path, images: torch.Tensor, tolerance: float) -> Check:
    """PyTorch against onnxruntime on `images` (uint8), normalised as the run evaluated."""
    import onnxruntime

    x = BatchTransform(spec.image_size, mean=spec.mean, std=spec.std)(images)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return compare_logits(model(x).numpy(), session.run(None, {"images": x.numpy()})[0], tolerance)


def run(args) -> int:
    if args.hub:
        return run_hub(args)
    check_extra()
    state_dict, spec, _ = load_model(args.model)
    model = build_trained(state_dict, spec, args.model)
    images = check_images(args, spec)
    out = Path(args.onnx)
    unchecked = out.with_name(f".{out.name}.unchecked-{os.getpid()}")  # never where a checked export goes
    try:
        export(model, spec, unchecked)
        check = compare(model, spec, unchecked, images, args.tolerance)
        return _keep_or_reject(unchecked, out, check, args.tolerance)
    finally:
        unchecked.unlink(missing_ok=True)


def _keep_or_reject(unchecked: Path, out: Path, check: Check, tolerance: float) -> int:
    """Rename the checked export to `out` when it passed, else to OUT.rejected (kept to look into); say which."""
    ties = check.n - check.same - check.decisive
    numbers = (f"max |logit difference| {check.max_diff:.2e} (tolerance {tolerance:.0e}), top-1 identical on "
               f"{check.same}/{check.n}" + (f" ({ties} near-ties within the tolerance differ)" if ties else ""))
    rejected = out.with_name(out.name + REJECTED)
    if check.passed(tolerance):
        os.replace(unchecked, out)
        rejected.unlink(missing_ok=True)  # an earlier attempt's
        print(f"wrote {out} (opset {OPSET}); checked on {check.n} images: {numbers}", flush=True)
        return 0
    os.replace(unchecked, rejected)
    print(f"error: the export does not match PyTorch ({numbers}; {check.decisive} top-1 differ beyond the "
          f"tolerance): {out} was not written; the rejected graph is {rejected}, not to be shipped",
          file=sys.stderr, flush=True)
    return 1


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
    add_model_argument(parser, "; --hub needs a finished run folder")
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
    return exit_status(lambda: run(checked(parser.parse_args(argv))))


def checked(args):
    if bool(args.onnx) == bool(args.hub):
        raise UsageError("give --onnx FILE or --hub DIR (one of them)")
    if args.push_to_hub and not args.hub:
        raise UsageError("--push-to-hub needs --hub DIR: the folder to write and upload")
    return args


if __name__ == "__main__":
    sys.exit(main())
