"""Model files and training checkpoints, written atomically and verified before use.

The best model is a safetensors file with its arch and class names in the metadata.
Nothing here unpickles arbitrary objects: weights are safetensors, Accelerate's
optimizer/scheduler/RNG files are read with torch.load(weights_only=True), the rest is JSON.
"""

import dataclasses
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from train import hub, run_dir
from train.errors import UsageError
from train.failpoints import delay, failpoint
from train.files import atomic_write, default_mode, dumps, sha256, writing
from train.models import ModelSpec, clean_keys

# Accelerate's save_state name for the model's current weights in a checkpoint folder.
MODEL_FILE = "model.safetensors"


def cpu_copy(tensors: dict) -> dict:
    """A CPU copy of a state dict that safetensors can write (contiguous, unshared)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return cpu_copy(model.state_dict())


def save_model(state_dict: dict, path: Path, spec: ModelSpec) -> None:
    metadata = {**spec.to_metadata(), "format": "pt"}
    with writing(path):
        atomic_write(path, lambda tmp: save_file(clean_keys(state_dict), str(tmp), metadata=metadata))


MODEL_KINDS = ("a run folder (model.safetensors), a model.safetensors, a checkpoint folder (trainer_state.json), "
               "a Hub model folder (config.json, from train.export --hub) or hf://REPO_ID[@REVISION]")


def load_model(path) -> tuple:
    """Return (state_dict, ModelSpec, names of the spec's fields the file did not record) from any MODEL
    argument (MODEL_KINDS); or a one-line UsageError. Every kind gives the same model for the same weights."""
    if str(path).startswith(hub.PREFIX):
        path = hub.download(str(path))
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        saved = json.loads((path / TRAINER_STATE).read_text())
        state_dict, _ = _read_model_file(path / MODEL_FILE)
        return clean_keys(state_dict), ModelSpec.from_dict(saved), ModelSpec.missing_from_dict(saved)
    if path.is_dir() and hub.is_hub_folder(path):
        state_dict, _ = _read_model_file(path / run_dir.MODEL)
        return clean_keys(state_dict), hub.read_hub_folder(path), set()
    if path.is_dir() and not (path / run_dir.MODEL).is_file():
        raise UsageError(f"{path} holds no model: expected {MODEL_KINDS}")
    state_dict, metadata = _read_model_file(path / run_dir.MODEL if path.is_dir() else path)
    try:
        spec = ModelSpec.from_metadata(metadata)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a model file of this project (metadata: {type(e).__name__} {e})") from None
    return clean_keys(state_dict), spec, ModelSpec.missing_from_dict(metadata)


def build_trained(state_dict: dict, spec: ModelSpec, source) -> torch.nn.Module:
    """The network `spec` describes with its trained weights, in eval mode; or a one-line UsageError."""
    model = spec.build()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UsageError(f"the weights in {source} do not fit {spec.arch} (cifar_stem {spec.cifar_stem}): "
                         f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return model.eval()


def _read_model_file(path: Path) -> tuple:
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable model file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None


# ---------------------------------------------------------------------------
# Full training state for exact resume: checkpoints/<name>/ holds Accelerate's
# save_state files (model, optimizer, scheduler, scaler, RNG), trainer_state.json
# (counters, best metric, metrics history, partial epoch totals), the best weights
# so far, and manifest.json (size and sha256 of every file), written last.

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"


class CheckpointError(UsageError):
    """A checkpoint that is incomplete, corrupt, or from another model."""


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())}
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(dumps({"files": files}, indent=1)))


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(state) -> str:
    # (epoch, batch) orders checkpoints; the step is there for people.
    return f"e{state.epoch:04d}-b{state.batch_in_epoch:06d}-step{state.step:08d}"


class Checkpointer:
    def __init__(self, accelerator, run_folder: Path, keep: int, spec: ModelSpec):
        self.accelerator, self.root, self.keep = accelerator, Path(run_folder) / run_dir.CHECKPOINTS, keep
        self.identity = spec.to_dict()  # a checkpoint continues only the model it was made for
        self.saves = 0

    def save(self, state, weights: dict, preempted: bool = False) -> Path:
        """Every rank calls this; the folder appears under its final name only once complete.
        `weights`: {name: state dict} saved beside Accelerate's files as <name>.safetensors (best, ema)."""
        accelerator, self.saves = self.accelerator, self.saves + 1
        final = self.root / checkpoint_name(state)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:  # a full or read-only disk fails here, before the rename: the previous checkpoint stays intact
            with writing(tmp):
                accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every rank's RNG file is in place
            if accelerator.is_main_process:
                with writing(tmp):
                    self._write_rest(tmp, state, weights, preempted)
        except OSError:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # give back the space the failed write took
            raise
        if accelerator.is_main_process:
            if final.exists():  # an identical position saved before a crash: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._rotate()
        accelerator.wait_for_everyone()
        return final

    def _write_rest(self, tmp: Path, state, weights: dict, preempted: bool) -> None:
        (tmp / TRAINER_STATE).write_text(dumps({**self.identity, **dataclasses.asdict(state)}))
        for name, tensors in weights.items():
            if tensors is not None:
                save_file(clean_keys(tensors), str(tmp / f"{name}.safetensors"))
        failpoint("kill_during_save", self.saves)
        failpoint("enospc_during_save", self.saves, tmp / MANIFEST)
        delay("preempted_save" if preempted else "save")
        for path in tmp.iterdir():  # safetensors (ours and Accelerate's model file) writes 0600
            default_mode(path)
        _fsync_tree(tmp)
        _write_manifest(tmp)

    def complete(self) -> list:
        """Complete checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _rotate(self) -> None:
        for old in self.complete()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_partial(self) -> None:
        """Temporary folders left by a crash during saving are never complete: drop them."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, folder: Path) -> dict:
        """Check the manifest and identity; return the trainer state, or raise CheckpointError naming the file."""
        folder = Path(folder)
        manifest_file = folder / MANIFEST
        try:
            files = json.loads(manifest_file.read_text())["files"]
        except (OSError, ValueError, KeyError):
            raise CheckpointError(f"checkpoint {folder} is incomplete: {manifest_file} is missing or unreadable"
                                  ) from None
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            if path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
                raise CheckpointError(f"checkpoint file {path} is truncated or corrupt (size or sha256 differs "
                                      f"from {manifest_file.name})")
        saved = json.loads((folder / TRAINER_STATE).read_text())
        for key, value in self.identity.items():
            if saved.get(key, value) != value:  # older checkpoints recorded only arch and class names
                raise CheckpointError(f"checkpoint {folder / TRAINER_STATE} is for {key} {saved.get(key)!r}, "
                                      f"this run has {value!r}")
        return saved

    def restore(self, resume: str) -> tuple:
        """(trainer state dict, {name: weights}) from `resume` — "auto": the newest complete checkpoint
        that loads, skipping broken ones with a warning; else that checkpoint folder — or (None, {})."""
        main = self.accelerator.is_main_process
        self.remove_partial()
        auto = resume == "auto"
        candidates, failed = self.complete() if auto else [Path(resume)], []
        for folder in candidates:
            try:
                saved, weights = self.load(folder)
            except CheckpointError as e:
                if not auto:
                    raise
                failed.append(str(e))
                if main:
                    print(f"warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
                continue
            if main:
                print(f"resuming from {folder} (epoch {saved['epoch'] + 1}, batch {saved['batch_in_epoch']}, "
                      f"step {saved['step']})", flush=True)
            return saved, weights
        if failed:  # starting over would silently throw away the run's progress and rewrite its metrics
            raise CheckpointError(f"--resume auto: none of the {len(failed)} checkpoints in {self.root} loads "
                                  f"({'; '.join(failed)}); remove them to start over, or fix the one you want")
        if main and self.root.is_dir():  # a first start, with no checkpoint folder yet, is not news
            print(f"no complete checkpoint in {self.root}: starting fresh", flush=True)
        return None, {}

    def load(self, folder: Path) -> tuple:
        """Restore every prepared object from `folder`; return (trainer state dict, {name: weights})."""
        saved = self.verify(folder)
        try:
            self.accelerator.load_state(str(folder))
        except (RuntimeError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:  # e.g. a shape mismatch
            raise CheckpointError(f"checkpoint {folder} could not be loaded: {str(e).splitlines()[0]}") from None
        extra = {p.stem: clean_keys(load_file(str(p))) for p in folder.glob("*.safetensors") if p.name != MODEL_FILE}
        return saved, extra
