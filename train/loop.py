"""One training epoch and one evaluation pass, shared by every split and every run mode."""

import contextlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from train.augment import BatchTransform
from train.metrics import classification_metrics


@dataclass
class TrainState:
    """Where training stands; everything a checkpoint needs beyond the tensors."""

    epoch: int = 0  # the epoch being trained (0-based); equals the number of finished epochs between epochs
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps taken in all
    best_epoch: int = 0  # 1-based; 0 before any validation
    best_val_f1_macro: float = -1.0
    history: list = field(default_factory=list)  # one metrics record per finished epoch
    partial: list = field(default_factory=list)  # per rank: this epoch's [loss sum, correct, seen] so far
    partial_seconds: float = 0.0
    wall_seconds: float = 0.0  # of earlier attempts, for a resumed run's total run time


@dataclass
class Parts:
    """The prepared objects of a training run."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    train_loader: object
    val_loader: object
    num_classes: int = 0


class Hooks:
    """What the run does around the loop; the defaults do nothing."""

    def on_step(self, state: TrainState, snapshot) -> None:
        """After each optimizer step; call snapshot() (on every rank) before saving the state."""

    def on_log(self, state: TrainState, values: dict) -> None:
        """Every --log-every optimizer steps, with running train loss, lr and throughput."""

    def on_epoch_end(self, state: TrainState, record: dict, improved: bool) -> None:
        pass

    def evaluation(self):
        """Context for validation (e.g. with EMA weights swapped in)."""
        return contextlib.nullcontext()

    def should_stop(self, agree: bool = True) -> bool:
        """Whether to stop now. `agree`: this step may run a collective to agree with the other processes;
        every process passes the same value at the same step."""
        return False


EXIT_DIVERGED = 3  # the exit status of a run stopped by a non-finite loss


class Diverged(Exception):
    """A non-finite training loss. Raised on every rank at once; nothing after the last checkpoint is kept."""

    def __init__(self, step: int, epoch: int, lr: float):
        super().__init__(f"training diverged: the loss was not finite at optimizer step {step} (epoch {epoch}, "
                         f"lr {lr:.4g}); the last complete checkpoint is intact. Usually helps: a lower --lr, "
                         f"--clip-grad-norm 1.0, bf16 rather than fp16; then continue with --resume auto")


def check_finite(accelerator, first_bad: torch.Tensor, epoch: int, lr: float) -> None:
    """Raise Diverged if any rank saw a non-finite loss. A collective: every rank calls it at the same step."""
    seen = accelerator.gather(first_bad[None]).tolist()  # the step of each rank's first bad loss, 0 if none
    bad = [step for step in seen if step > 0]
    if bad:
        raise Diverged(min(bad), epoch, lr)


@dataclass
class EvalResult:
    loss: float
    preds: np.ndarray
    labels: np.ndarray
    preds_tta: np.ndarray = None  # with horizontal-flip test-time augmentation, when asked for


def interactive() -> bool:
    return sys.stderr.isatty()


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Reseeding every batch from its coordinates makes augmentation and dropout
    # independent of history, so a resumed run draws exactly what it would have.
    return (seed * 1_000_003 + epoch * 100_003 + batch) * 1009 + rank


def train_one_epoch(parts: Parts, cfg, state: TrainState, hooks: Hooks) -> tuple:
    """Train from state.batch_in_epoch until the epoch ends ("end"), --max-steps ("max_steps") or a
    stop request ("signal"). Return (loss sum, correct, seen) over all processes, seconds, and the reason.
    Raise Diverged, on every rank, after a non-finite loss."""
    acc, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    model.train()
    transform = BatchTransform(cfg.image_size, train=True, policy=cfg.auto_augment, erasing=cfg.random_erasing,
                               mixup=cfg.mixup_alpha, cutmix=cfg.cutmix_alpha, num_classes=parts.num_classes)
    if state.batch_in_epoch == 0:
        state.partial, state.partial_seconds = [], 0.0
    totals = torch.tensor(_resumed_totals(state.partial, acc), device=acc.device)
    parts.train_loader.set_epoch(state.epoch)
    batches = parts.train_loader
    if state.batch_in_epoch:
        batches = acc.skip_first_batches(parts.train_loader, state.batch_in_epoch)
        batches.set_epoch(state.epoch)
    # A live bar on terminals only: in a Slurm log or CI its carriage-return frames are noise (the run
    # prints a plain line every --log-every steps instead: RunHooks.on_log in runner.py).
    bar = tqdm(total=len(parts.train_loader), initial=state.batch_in_epoch, leave=False, dynamic_ncols=True,
               desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not (acc.is_main_process and interactive()))
    start, reason = time.perf_counter() - state.partial_seconds, "end"
    # Divergence is recorded on the device (the step of the first non-finite loss) and read only where the
    # loop synchronises anyway: log steps, before a checkpoint is written, and at the end of the epoch.
    step_on_device = torch.tensor(state.step, device=acc.device)
    first_bad = torch.zeros((), dtype=torch.long, device=acc.device)

    def check():
        check_finite(acc, first_bad, state.epoch + 1, optimizer.param_groups[0]["lr"])

    def snapshot():
        check()  # never checkpoint weights that have diverged
        state.partial = acc.gather(totals.clone()[None]).tolist()
        state.partial_seconds = time.perf_counter() - start

    try:
        for images, labels in batches:
            torch.manual_seed(step_seed(cfg.seed, state.epoch, state.batch_in_epoch, acc.process_index))
            with acc.accumulate(model):
                inputs, targets = transform.train_batch(images, labels)
                logits = model(inputs)
                loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            totals[0] += loss.detach() * len(labels)  # Python numbers go to the kernel: no host-to-device copy
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += len(labels)
            first_bad.copy_(torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step_on_device + 1,
                                        first_bad))
            bar.update()
            if not acc.sync_gradients:
                continue
            if not acc.optimizer_step_was_skipped:
                parts.scheduler.step()
            state.step += 1
            step_on_device += 1
            if state.step % cfg.log_every == 0:  # the only host sync inside the epoch
                check()
                seen = totals[2].item()
                values = {"train/loss": totals[0].item() / seen, "train/lr": optimizer.param_groups[0]["lr"],
                          "train/images_per_second": seen * acc.num_processes / (time.perf_counter() - start)}
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_second']:.0f}")
                hooks.on_log(state, values)
            hooks.on_step(state, snapshot)
            # Under DDP agreeing to stop is a collective: only every --log-every steps, not a drain per step.
            if hooks.should_stop(agree=state.step % cfg.log_every == 0):
                reason = "signal"
                snapshot()
                break
            if cfg.max_steps and state.step >= cfg.max_steps:
                reason = "max_steps"
                break
        check()
    except Diverged:
        reason = "diverged"
        raise
    finally:
        if reason != "end":
            batches.end()  # leaving a prepared loader early must unregister it from Accelerate's gradient state
        bar.close()
    return acc.reduce(totals, reduction="sum").tolist(), time.perf_counter() - start, reason


def _resumed_totals(partial: list, acc) -> list:
    """This rank's running totals of a resumed epoch: its own, so sums stay bit-identical."""
    if len(partial) == acc.num_processes:
        return partial[acc.process_index]
    if partial and acc.is_main_process:  # resumed with another world size: count the earlier batches once
        return [sum(column) for column in zip(*partial)]
    return [0.0, 0.0, 0.0]


def validate_epoch(parts: Parts, cfg, state: TrainState, totals, seconds, class_names) -> dict:
    val = evaluate(parts.accelerator, parts.model, parts.val_loader, BatchTransform(cfg.image_size))
    metrics = classification_metrics(val.preds, val.labels, class_names)
    loss_sum, correct, seen = totals
    return {"epoch": state.epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
            "val_loss": val.loss, "val_acc": metrics["acc"], "val_f1_macro": metrics["f1_macro"],
            "val_per_class_accuracy": metrics["per_class_accuracy"],
            "lr": parts.optimizer.param_groups[0]["lr"], "step": state.step,
            "train_images": int(seen), "val_images": len(val.labels),  # all processes, each image once
            "epoch_seconds": seconds, "images_per_second": seen / max(1e-9, seconds)}


def fit(parts: Parts, cfg, state: TrainState, class_names, hooks: Hooks) -> str:
    """Train and validate epoch by epoch from `state`. Return "done", "max_steps" or "signal"."""
    while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
        if hooks.should_stop():  # a signal that arrived during validation
            return "signal"
        totals, train_seconds, reason = train_one_epoch(parts, cfg, state, hooks)
        if reason == "signal":
            return reason
        start = time.perf_counter()
        with hooks.evaluation():
            record = validate_epoch(parts, cfg, state, totals, train_seconds, class_names)
        record["epoch_seconds"] += time.perf_counter() - start
        improved = record["val_f1_macro"] > state.best_val_f1_macro
        if improved:
            state.best_epoch, state.best_val_f1_macro = record["epoch"], record["val_f1_macro"]
        state.history.append(record)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        hooks.on_epoch_end(state, record, improved)
        if parts.accelerator.is_main_process:
            print(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                  f"macro-F1 {record['val_f1_macro']:.4f} | {record['epoch_seconds']:.1f} s, "
                  f"{record['images_per_second']:.0f} img/s", flush=True)
        if reason == "max_steps":
            return reason
    return "done"


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
        for key, value in accelerator.gather_for_metrics(batch).items():
            columns[key].append(value.cpu())
    joined = {k: torch.cat(v).numpy() if v else None for k, v in columns.items()}
    loss = joined["loss"]
    return EvalResult(loss=float(loss.mean()) if loss is not None else float("nan"),
                      preds=joined["pred"] if joined["pred"] is not None else np.zeros(0, int),
                      labels=joined["label"] if joined["label"] is not None else np.zeros(0, int),
                      preds_tta=joined["pred_tta"])
