"""Optimizer and learning-rate schedule, both counted in optimizer steps of one process.

Each process takes the same number of optimizer steps whatever the world size,
so the schedule is stepped once per optimizer step (Accelerate is told not to
multiply it by the number of processes).
"""

import math

import torch


def use_fused(device_type: str, mixed_precision: str) -> bool:
    """Fused SGD/AdamW kernels on GPUs, except with fp16.

    With fp16, GradScaler hands fused optimizers the inf check to do inside the kernel, so an
    overflow step is skipped without Accelerate seeing it (optimizer_step_was_skipped stays False,
    the schedule advances), and fused SGD whose first step overflows leaves its momentum buffers
    uninitialised. fp32 and bf16 need no scaler.
    """
    return device_type == "cuda" and mixed_precision != "fp16"


def build_optimizer(cfg, model: torch.nn.Module, mixed_precision: str = "no") -> torch.optim.Optimizer:
    """SGD or AdamW, fused into one kernel per step where that is correct (see use_fused)."""
    # No weight decay on norms and biases, as in torchvision's reference recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if decay and use_fused(decay[0].device.type, mixed_precision) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(warmup_epochs(cfg) * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.scheduler == "none":
        return 1.0
    if cfg.scheduler == "step":
        step_size = (cfg.lr_step_size or max(1, cfg.epochs // 3)) * steps_per_epoch
        return cfg.lr_gamma ** ((step - warmup) // step_size)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    # onecycle: after a linear warmup, cosine-anneal to 1/1000 of the peak (OneCycleLR's own shape differs).
    return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_epochs(cfg) -> float:
    if cfg.scheduler == "onecycle" and cfg.warmup_epochs == 0:
        return 0.3 * cfg.epochs  # OneCycleLR's default pct_start
    return cfg.warmup_epochs


def build_scheduler(cfg, optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))


def set_peak_lr(scheduler, peak_lr: float) -> bool:
    """Make a restored schedule run at `peak_lr` from where it stands; return whether that changed it.

    A checkpoint restores the schedule's own peak (LambdaLR keeps base_lrs in its state), which would
    silently override --lr when a run that diverged is resumed with a lower one.
    """
    schedule = getattr(scheduler, "scheduler", scheduler)  # inside Accelerate's wrapper
    if all(base == peak_lr for base in schedule.base_lrs):
        return False
    schedule.base_lrs = [peak_lr] * len(schedule.base_lrs)
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
        group["initial_lr"], group["lr"] = peak_lr, peak_lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
    return True


def mean_lr(scheduler, steps: int) -> float:
    """The mean learning rate of the last `steps` optimizer steps (an epoch's), from the schedule's own position:
    what those steps trained with, not the rate after the schedule moved on (0 after a cosine's last step). Read
    from the schedule, not recorded per step, so a resumed epoch gives the same number."""
    schedule = getattr(scheduler, "scheduler", scheduler)  # inside Accelerate's wrapper
    end = schedule.last_epoch  # the position the next step would train at
    positions = range(max(0, end - steps), end)
    if not positions:
        return schedule.optimizer.param_groups[0]["lr"]
    factor = schedule.lr_lambdas[0]
    return schedule.base_lrs[0] * sum(factor(k) for k in positions) / len(positions)
