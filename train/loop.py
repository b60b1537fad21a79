"""One training epoch and one evaluation pass, shared by every split and every run mode."""

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


@dataclass
class EvalResult:
    loss: float
    preds: np.ndarray
    labels: np.ndarray


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    # Reseeding every batch from its coordinates makes augmentation and dropout
    # independent of history, so a resumed run draws exactly what it would have.
    return (seed * 1_000_003 + epoch * 100_003 + batch) * 1009 + rank


def train_one_epoch(accelerator, model, optimizer, scheduler, loader, cfg, state: TrainState,
                    should_stop=lambda: False) -> dict:
    """Train until the loader ends, --max-steps, or should_stop(); return summed loss/correct/seen."""
    model.train()
    transform = BatchTransform(cfg.image_size, train=True)
    totals = torch.zeros(3, device=accelerator.device)  # loss sum, correct, seen
    loader.set_epoch(state.epoch)
    batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
    batches.set_epoch(state.epoch)
    bar = tqdm(total=len(loader), initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True)
    start, stopped = time.perf_counter(), False
    for images, labels in batches:
        torch.manual_seed(step_seed(cfg.seed, state.epoch, state.batch_in_epoch, accelerator.process_index))
        with accelerator.accumulate(model):
            logits = model(transform(images))
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.clip_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.batch_in_epoch += 1
        totals += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum(),
                               torch.tensor(len(labels), device=totals.device)])
        bar.update()
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        state.step += 1
        if state.step % cfg.log_every == 0:  # the only host sync inside the epoch
            seen = totals[2].item()
            bar.set_postfix(loss=f"{totals[0].item() / seen:.4f}",
                            img_s=f"{seen * accelerator.num_processes / (time.perf_counter() - start):.0f}")
        if (cfg.max_steps and state.step >= cfg.max_steps) or should_stop():
            stopped = True
            break
    if stopped:
        batches.end()  # leaving a prepared loader early must unregister it from Accelerate's gradient state
    bar.close()
    return {"totals": accelerator.reduce(totals, reduction="sum"), "seconds": time.perf_counter() - start,
            "stopped": stopped}


def fit(accelerator, model, optimizer, scheduler, train_loader, val_loader, cfg, state: TrainState,
        class_names, on_epoch_end) -> None:
    """Train and validate epoch by epoch from `state`; on_epoch_end(record, improved) after each."""
    while state.epoch < cfg.epochs:
        start = time.perf_counter()
        trained = train_one_epoch(accelerator, model, optimizer, scheduler, train_loader, cfg, state)
        val = evaluate(accelerator, model, val_loader, cfg.image_size)
        metrics = classification_metrics(val.preds, val.labels, class_names)
        loss_sum, correct, seen = trained["totals"].tolist()
        record = {"epoch": state.epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
                  "val_loss": val.loss, "val_acc": metrics["acc"], "val_f1_macro": metrics["f1_macro"],
                  "val_per_class_accuracy": metrics["per_class_accuracy"],
                  "lr": optimizer.param_groups[0]["lr"], "step": state.step,
                  "epoch_seconds": time.perf_counter() - start,
                  "images_per_second": seen / max(1e-9, trained["seconds"])}
        improved = record["val_f1_macro"] > state.best_val_f1_macro
        if improved:
            state.best_epoch, state.best_val_f1_macro = record["epoch"], record["val_f1_macro"]
        state.history.append(record)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        on_epoch_end(record, improved)
        if accelerator.is_main_process:
            print(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                  f"macro-F1 {record['val_f1_macro']:.4f} | {record['epoch_seconds']:.1f} s, "
                  f"{record['images_per_second']:.0f} img/s", flush=True)
        if trained["stopped"]:
            break


@torch.no_grad()
def evaluate(accelerator, model, loader, image_size: int) -> EvalResult:
    """Loss and predictions over every sample exactly once, on every process (DDP padding removed)."""
    model.eval()
    transform = BatchTransform(image_size, train=False)
    losses, preds, labels = [], [], []
    for images, targets in loader:
        logits = model(transform(images))
        loss = F.cross_entropy(logits.float(), targets, reduction="none")
        loss, pred, targets = accelerator.gather_for_metrics((loss, logits.argmax(1), targets))
        losses.append(loss.cpu())
        preds.append(pred.cpu())
        labels.append(targets.cpu())
    loss = torch.cat(losses) if losses else torch.zeros(0)
    return EvalResult(loss=float(loss.mean()) if len(loss) else float("nan"),
                      preds=torch.cat(preds).numpy() if preds else np.zeros(0, int),
                      labels=torch.cat(labels).numpy() if labels else np.zeros(0, int))
