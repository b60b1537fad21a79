"""Training checkpoints, written atomically and verified before use (the model's own files: train/model_files.py).

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

from safetensors.torch import load_file, save_file

from train import run_dir, stall
from train.errors import UsageError, first_line
from train.failpoints import delay, failpoint
from train.files import atomic_write, default_mode, dumps, sha256, writing
from train.model_files import CHECKPOINT_WEIGHTS, TRAINER_STATE
from train.models import ModelSpec, clean_keys

# ---------------------------------------------------------------------------
# Full training state for exact resume: checkpoints/<name>/ holds Accelerate's
# save_state files (model, optimizer, scheduler, scaler, RNG), trainer_state.json
# (counters, best metric, metrics history, partial epoch totals), the best weights
# so far, and manifest.json (size and sha256 of every file), written last.

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
        stall.mark(stall.CHECKPOINT, state.step)
        final = self.root / checkpoint_name(state)
        tmp = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:  # a full or read-only disk fails here, before the rename: the previous checkpoint stays intact
            with writing(tmp):
                accelerator.save_state(str(tmp))
                delay("checkpoint_write")  # the stall tests block one rank here, halfway through its part
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
        (tmp / TRAINER_STATE).write_text(dumps({**self.identity, **dataclasses.asdict(state),
                                                "format_version": run_dir.FORMAT_VERSION}))
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
            if saved.get(key, value) != value:  # format 1: a checkpoint may record only arch and class names
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
            raise CheckpointError(f"checkpoint {folder} could not be loaded: {first_line(e)}") from None
        extra = {p.stem: clean_keys(load_file(str(p))) for p in folder.glob("*.safetensors")
                 if p.name != CHECKPOINT_WEIGHTS}
        return saved, extra
