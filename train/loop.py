"""One training epoch and one evaluation pass, shared by every split and every run mode.

The loop owns every collective of training. A step only launches work; at the steps the loop chooses
(every `log_every` and `checkpoint_every` optimizer steps, a stop request of a single process, and the
end of an epoch) one gather brings every process's running totals, its first non-finite step and its
stop request to every process. Hooks are then called with plain values, on every process at the same
step; on_step, on_log and stop_requested never communicate (on_checkpoint and on_epoch_end may: all
processes write a checkpoint together).

"Only launches work" holds for the loop's own code, and so for bf16 and fp32 steps. Two things below it
wait on the host every step: fp16's GradScaler reads `found_inf` with the non-fused optimizers fp16 needs
(train/optim.py), and SyncBatchNorm (--sync-bn, DDP on GPUs) reads its per-process counts once per layer.
"""

import contextlib
import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train import progress, stall
from train.augment import BatchTransform
from train.failpoints import delay
from train.metrics import classification_metrics
from train.optim import mean_lr


class Stop(enum.Enum):
    """Why training, or one epoch of it, ended."""

    FINISHED = "finished"  # ran to its end: the epoch (train_one_epoch) or the last epoch (fit)
    MAX_STEPS = "max_steps"  # --max-steps reached
    SIGNAL = "signal"  # a process was asked to stop (preemption): the caller writes a checkpoint
    PRUNED = "pruned"  # a sweep's pruner stopped the trial after a validated epoch (train/study.py)


@dataclass
class Totals:
    """Running sums over an epoch's training batches."""

    loss_sum: float = 0.0  # mean cross-entropy times batch size
    correct: float = 0.0  # with MixUp/CutMix: argmax equal to the original label
    seen: float = 0.0

    @classmethod
    def of(cls, saved) -> "Totals":
        """From a checkpoint's record: a dict, or [loss sum, correct, seen] in some format-1 checkpoints."""
        return saved if isinstance(saved, Totals) else cls(**saved) if isinstance(saved, dict) else cls(*saved)

    def __add__(self, other: "Totals") -> "Totals":
        return Totals(self.loss_sum + other.loss_sum, self.correct + other.correct, self.seen + other.seen)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1.0, self.seen)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1.0, self.seen)


@dataclass
class TrainState:
    """Where training stands; everything a checkpoint needs beyond the tensors."""

    epoch: int = 0  # the epoch being trained (0-based); equals the number of finished epochs between epochs
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps taken in all
    best_epoch: int = 0  # 1-based; 0 before any validation
    best_val_f1_macro: float = -1.0
    history: list = field(default_factory=list)  # one metrics record per finished epoch
    partial: list = field(default_factory=list)  # per process: this epoch's Totals at the last sync point
    partial_seconds: float = 0.0
    wall_seconds: float = 0.0  # of earlier attempts, for a resumed run's total run time

    def __post_init__(self):
        self.partial = [Totals.of(p) for p in self.partial]


@dataclass
class LoopConfig:
    """The settings the loop reads (train/config.py's Config has them all; `from_config` picks these)."""

    epochs: int = 1
    seed: int = 0
    log_every: int = 50  # optimizer steps between log lines (and, under DDP, stop agreements)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at epoch ends only
    max_steps: int = 0  # 0: no limit
    clip_grad_norm: float = 0.0  # 0: off
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "LoopConfig":
        return cls(epochs=cfg.epochs, seed=cfg.seed, log_every=cfg.log_every,
                   checkpoint_every=cfg.checkpoint_every_steps, max_steps=cfg.max_steps,
                   clip_grad_norm=cfg.clip_grad_norm, label_smoothing=cfg.label_smoothing)


@dataclass
class Parts:
    """The prepared objects of a training run."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: AcceleratedScheduler
    train_loader: DataLoader
    val_loader: DataLoader | None
    train_transform: BatchTransform  # uint8 batch -> augmented, normalised inputs and (soft) targets
    eval_transform: BatchTransform
    class_names: list


class Hooks:
    """What a run does around the loop; the defaults do nothing. Called on every process at the same step."""

    def on_step(self, state: TrainState) -> None:
        """After each optimizer step. Reads nothing from the device."""

    def on_log(self, state: TrainState, values: dict) -> None:
        """Every `log_every` optimizer steps: running train loss (all processes), lr and throughput."""

    def on_checkpoint(self, state: TrainState) -> None:
        """Every `checkpoint_every` optimizer steps; state.partial holds every process's running totals."""

    def on_epoch_end(self, state: TrainState, record: dict, improved: bool) -> None:
        """After validation, with the epoch's metrics record."""

    def evaluation(self):
        """Context for validation (e.g. with EMA weights swapped in)."""
        return contextlib.nullcontext()

    def stop_requested(self) -> bool:
        """Whether this process was asked to stop (e.g. by a signal); the loop agrees it with the others."""
        return False

    def prune_requested(self) -> bool:
        """Whether training should end after the epoch just validated (a sweep's pruner, which only rank 0
        asks); the loop agrees it with the others before the next epoch, in the exchange it makes anyway."""
        return False


class Diverged(Exception):
    """A non-finite training loss. Raised on every rank at once; nothing after the last checkpoint is kept."""

    def __init__(self, step: int, epoch: int, lr: float):
        super().__init__(f"training diverged: the loss was not finite at optimizer step {step} (epoch {epoch}, "
                         f"lr {lr:.4g}); the last complete checkpoint is intact. Usually helps: a lower --lr, "
                         f"--clip-grad-norm 1.0, bf16 rather than fp16; then continue with --resume auto")


@dataclass
class EvalResult:
    loss: float
    preds: np.ndarray
    labels: np.ndarray
    preds_tta: np.ndarray = None  # with horizontal-flip test-time augmentation, when asked for


class Epoch(NamedTuple):
    totals: Totals  # over all processes
    seconds: float
    stop: Stop


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Reseeding every batch from its coordinates makes augmentation and dropout
    # independent of history, so a resumed run draws exactly what it would have.
    return (seed * 1_000_003 + epoch * 100_003 + batch) * 1009 + rank


def _exchange(accelerator: Accelerator, values: torch.Tensor, stop: bool) -> tuple:
    """The loop's one collective: (every process's row of `values`, whether any process asked to stop)."""
    flag = torch.full((1,), float(stop), device=values.device)  # a fill, not a host-to-device copy
    rows = accelerator.gather(torch.cat([values.float(), flag])[None]).tolist()
    return [row[:-1] for row in rows], any(row[-1] for row in rows)


class _Running:
    """This process's running totals and divergence record of an epoch. They stay on the device, so a step
    never waits for them; `sync` reads them, for all processes at once."""

    def __init__(self, accelerator: Accelerator, start: Totals, step: int):
        self.accelerator, device = accelerator, accelerator.device
        self.totals = torch.tensor([start.loss_sum, start.correct, start.seen], device=device)  # once an epoch
        self.step = torch.tensor(step, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # step of the first non-finite loss

    def add(self, loss: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            real: int) -> None:
        """Count the batch's first `real` samples (the others are DDP's padding, see _real_samples); `loss` is
        the batch's mean loss, the one trained on."""
        losses = losses.detach()
        self.totals[0] += losses[:real].sum()
        self.totals[1] += (logits[:real].argmax(1) == labels[:real]).sum()
        self.totals[2] += real  # Python numbers go to the kernel: no host-to-device copy
        self.first_bad.copy_(torch.where((self.first_bad == 0) & ~torch.isfinite(loss.detach()), self.step + 1,
                                         self.first_bad))

    def sync(self, stop: bool, epoch: int, lr: float) -> tuple:
        """(every process's Totals, whether any asked to stop). Raises Diverged on every process alike."""
        rows, stop = _exchange(self.accelerator, torch.cat([self.totals, self.first_bad[None].float()]), stop)
        bad = [int(row[3]) for row in rows if row[3] > 0]
        if bad:
            raise Diverged(min(bad), epoch, lr)
        return [Totals(*row[:3]) for row in rows], stop


def _real_samples(accelerator: Accelerator, batch: int, remainder: int) -> int:
    """How many of this process's batch are images of the split rather than padding. Under DDP Accelerate
    evens out the last round of batches with images from the start of the epoch; they are trained on, as
    DDP must, but counted once: the `remainder` real ones of that round come first, in process order (as
    gather_for_metrics assumes)."""
    if accelerator.num_processes == 1 or not accelerator.gradient_state.end_of_dataloader or remainder <= 0:
        return batch
    return max(0, min(batch, remainder - accelerator.process_index * batch))


def _last_round(loader) -> int:
    """Images in the last round of batches of a prepared training loader (0: every round is full). Not
    Accelerate's gradient_state.remainder: for a resumed epoch's skip_first_batches loader it divides by
    one process's batch instead of all processes' batches."""
    return loader.total_dataset_length % loader.total_batch_size


def _train_batch(parts: Parts, loop: LoopConfig, running: _Running, images, labels, remainder: int) -> None:
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    with accelerator.accumulate(model):
        inputs, targets = parts.train_transform.train_batch(images, labels)
        logits = model(inputs)
        losses = F.cross_entropy(logits, targets, label_smoothing=loop.label_smoothing, reduction="none")
        loss = losses.mean()
        delay("before_backward")  # the stall tests block one rank here, before its gradient all-reduce
        accelerator.backward(loss)
        if accelerator.sync_gradients and loop.clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), loop.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    running.add(loss, losses, logits, labels, _real_samples(accelerator, len(labels), remainder))


def _batches(parts: Parts, state: TrainState):
    """The epoch's batches from state.batch_in_epoch on (a resumed epoch skips those already trained)."""
    parts.train_loader.set_epoch(state.epoch)
    if not state.batch_in_epoch:
        return parts.train_loader
    batches = parts.accelerator.skip_first_batches(parts.train_loader, state.batch_in_epoch)
    batches.set_epoch(state.epoch)
    return batches


def _fetched(batches, state: TrainState):
    """The epoch's batches, the wait for each one marked as a phase of its own (train/stall.py): a rank that stalls
    there is named as fetching a batch, not as training."""
    batches = iter(batches)
    while True:
        stall.mark(stall.FETCH, state.step)
        try:
            batch = next(batches)
        except StopIteration:
            return
        stall.mark(stall.STEP)
        yield batch


def train_one_epoch(parts: Parts, loop: LoopConfig, state: TrainState, hooks: Hooks) -> Epoch:
    """Train from state.batch_in_epoch until the epoch ends, `max_steps`, or a stop request agreed by all
    processes. Raise Diverged, on every process, after a non-finite loss (read at the next sync point)."""
    accelerator, lr = parts.accelerator, lambda: parts.optimizer.param_groups[0]["lr"]
    parts.model.train()
    if state.batch_in_epoch == 0:
        state.partial, state.partial_seconds = [], 0.0
    running = _Running(accelerator, _resumed_totals(state.partial, accelerator), state.step)
    remainder = _last_round(parts.train_loader)
    batches, bar = _batches(parts, state), _bar(parts, loop, state)
    start, stop = time.perf_counter() - state.partial_seconds, None  # None: still running

    def sync(requested: bool = False) -> bool:
        stall.mark(stall.EXCHANGE, state.step)
        state.partial, agreed = running.sync(requested, state.epoch + 1, lr())
        state.partial_seconds = time.perf_counter() - start
        return agreed

    try:
        for images, labels in _fetched(batches, state):
            torch.manual_seed(step_seed(loop.seed, state.epoch, state.batch_in_epoch, accelerator.process_index))
            _train_batch(parts, loop, running, images, labels, remainder)
            state.batch_in_epoch += 1
            bar.update()
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                parts.scheduler.step()
            state.step += 1
            running.step += 1
            hooks.on_step(state)
            stop = _after_step(parts, loop, state, hooks, sync, bar)
            if stop:
                break
        sync()  # the epoch's totals, and a divergence in its last steps
        stop = stop or Stop.FINISHED
    finally:
        if stop is not Stop.FINISHED:
            batches.end()  # leaving a prepared loader early must unregister it from Accelerate's gradient state
        bar.close()
    return Epoch(sum(state.partial, Totals()), time.perf_counter() - start, stop)


def _bar(parts: Parts, loop: LoopConfig, state: TrainState):
    """A live bar at a terminal only, on the main process; elsewhere the run prints plain lines (train/progress.py)."""
    screen = progress.terminal()
    return tqdm(total=len(parts.train_loader), initial=state.batch_in_epoch, leave=False, dynamic_ncols=True,
                desc=f"epoch {state.epoch + 1}/{loop.epochs}", file=screen,
                disable=not (parts.accelerator.is_main_process and screen))


def _after_step(parts: Parts, loop: LoopConfig, state: TrainState, hooks: Hooks, sync, bar) -> Stop | None:
    """The decision after an optimizer step: at the steps that log, checkpoint, or where a lone process was asked
    to stop, `sync` agrees every process's numbers and stop requests; then log, stop or checkpoint, in that order.
    Returns why training stops here (SIGNAL: the caller writes the checkpoint; MAX_STEPS), or None to go on."""
    log = state.step % loop.log_every == 0
    save = bool(loop.checkpoint_every) and state.step % loop.checkpoint_every == 0
    # One process can stop at any step; several only at the sync steps, so that all stop at the same one.
    alone_and_asked = parts.accelerator.num_processes == 1 and hooks.stop_requested()
    if log or save or alone_and_asked:
        asked = sync(hooks.stop_requested())
        if log:
            total = sum(state.partial, Totals())
            values = {"train/loss": total.loss, "train/lr": parts.optimizer.param_groups[0]["lr"],
                      "train/images_per_second": total.seen / max(1e-9, state.partial_seconds)}
            bar.set_postfix(loss=f"{total.loss:.4f}", img_s=f"{values['train/images_per_second']:.0f}")
            hooks.on_log(state, values)
        if asked:
            return Stop.SIGNAL
        if save:
            hooks.on_checkpoint(state)
    return Stop.MAX_STEPS if loop.max_steps and state.step >= loop.max_steps else None


def _resumed_totals(partial: list, accelerator: Accelerator) -> Totals:
    """This process's running totals of a resumed epoch: its own, so sums stay bit-identical."""
    if len(partial) == accelerator.num_processes:
        return partial[accelerator.process_index]
    if partial and accelerator.is_main_process:  # resumed with another world size: count earlier batches once
        return sum(partial, Totals())
    return Totals()


def validate_epoch(parts: Parts, state: TrainState, totals: Totals, seconds: float) -> dict:
    val = evaluate(parts.accelerator, parts.model, parts.val_loader, parts.eval_transform)
    metrics = classification_metrics(val.preds, val.labels, parts.class_names)
    return {"epoch": state.epoch + 1, "train_loss": totals.loss, "train_acc": totals.accuracy,
            "val_loss": val.loss, "val_acc": metrics["acc"], "val_f1_macro": metrics["f1_macro"],
            "val_per_class_accuracy": metrics["per_class_accuracy"],
            "lr": mean_lr(parts.scheduler, state.step - (state.history[-1]["step"] if state.history else 0)),
            "step": state.step,
            "train_images": int(totals.seen), "val_images": len(val.labels),  # all processes, each image once
            "epoch_seconds": seconds, "images_per_second": totals.seen / max(1e-9, seconds)}


def fit(parts: Parts, loop: LoopConfig, state: TrainState, hooks: Hooks) -> Stop:
    """Train and validate epoch by epoch from `state` until the last epoch, `max_steps` or an agreed stop."""
    while state.epoch < loop.epochs and not (loop.max_steps and state.step >= loop.max_steps):
        stall.mark(stall.EXCHANGE, state.step)
        pruned = torch.full((1,), float(hooks.prune_requested()), device=parts.accelerator.device)
        rows, asked = _exchange(parts.accelerator, pruned, hooks.stop_requested())
        if asked:
            return Stop.SIGNAL  # asked during validation
        if any(row[0] for row in rows):
            return Stop.PRUNED
        epoch = train_one_epoch(parts, loop, state, hooks)
        if epoch.stop is Stop.SIGNAL:
            return epoch.stop
        start = time.perf_counter()
        stall.mark(stall.VALIDATION, state.step)
        with hooks.evaluation():
            record = validate_epoch(parts, state, epoch.totals, epoch.seconds)
        record["epoch_seconds"] += time.perf_counter() - start
        improved = record["val_f1_macro"] > state.best_val_f1_macro
        if improved:
            state.best_epoch, state.best_val_f1_macro = record["epoch"], record["val_f1_macro"]
        state.history.append(record)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        hooks.on_epoch_end(state, record, improved)
        if epoch.stop is Stop.MAX_STEPS:
            return epoch.stop
    return Stop.FINISHED


@torch.no_grad()
def evaluate(accelerator, model, loader, transform: BatchTransform, tta: bool = False) -> EvalResult:
    """Loss and predictions over every sample exactly once, on every process (DDP padding removed).
    With `tta`, also predictions from the mean of the softmax over the image and its mirror image."""
    model.eval()
    columns = {"loss": [], "pred": [], "label": [], "pred_tta": []}
    for images, targets in loader:
        x = transform(images)
        logits = model(x).float()
        batch = {"loss": F.cross_entropy(logits, targets, reduction="none"), "pred": logits.argmax(1),
                 "label": targets}
        if tta:
            batch["pred_tta"] = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)).argmax(1)
        for key, value in _gathered(accelerator, batch).items():
            columns[key].append(value)
        stall.tick()
    joined = {k: torch.cat(v).numpy() if v else None for k, v in columns.items()}
    loss = joined["loss"]
    return EvalResult(loss=float(loss.mean()) if loss is not None else float("nan"),
                      preds=joined["pred"] if joined["pred"] is not None else np.zeros(0, int),
                      labels=joined["label"] if joined["label"] is not None else np.zeros(0, int),
                      preds_tta=joined["pred_tta"])


def _gathered(accelerator, batch: dict) -> dict:
    """Every process's predictions of a batch, on the host (train/stall.py knows this function as a wait for the
    others: on a GPU the host blocks in the copy, after the collective)."""
    return {key: value.cpu() for key, value in accelerator.gather_for_metrics(batch).items()}
