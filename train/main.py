"""Train a torchvision classifier on a Hugging Face image dataset.

    accelerate launch train/main.py --arch mobilenet_v2

This file only wires the parts together: config, data, model, loop, metrics,
checkpoints, preemption, run folder and report each live in their own module.
"""

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` importable and stop train/ shadowing top-level names
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402

from train import report, run_dir, tracking  # noqa: E402
from train.checkpoint import CHECKPOINTS, Checkpointer, cpu_state_dict, load_model, save_model  # noqa: E402
from train.config import Config, parse_config  # noqa: E402
from train.data import load_image_data, make_loader  # noqa: E402
from train.ema import EMA  # noqa: E402
from train.errors import UsageError, report_usage_error  # noqa: E402
from train.failpoints import failpoint  # noqa: E402
from train.loop import Hooks, Parts, TrainState, evaluate, fit  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402
from train.models import build_model, check_arch  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402
from train.preemption import EXIT_PREEMPTED, MARKER, StopFlag  # noqa: E402


def make_accelerator(cfg: Config, track: bool) -> Accelerator:
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, step_scheduler_with_optimizer=False,
                              log_with="wandb" if track else None)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU (on CPU Accelerate would silently train in fp32); "
                         "use --mixed_precision bf16")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator


def resolve_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    resume_from = Path(cfg.resume) if cfg.resume not in ("", "auto") else None
    if resume_from is not None and not resume_from.is_dir():
        raise UsageError(f"--resume {cfg.resume}: no such checkpoint folder")
    home = resume_from.parent.parent if resume_from and resume_from.parent.name == CHECKPOINTS else None
    # Every rank must agree on one folder, and the default name holds a timestamp.
    name = [cfg.output_dir or (str(home) if home else "") or
            run_dir.default_output_dir(cfg.arch + ("-eval" if cfg.eval_only else ""))]
    broadcast_object_list(name)
    cfg.output_dir = name[0]
    path = Path(cfg.output_dir)
    continuing = cfg.resume == "auto" or (home is not None and home.resolve() == path.resolve())
    if not continuing:
        run_dir.refuse_to_overwrite(path)
    accelerator.wait_for_everyone()  # nobody creates files before every rank has checked
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).unlink(missing_ok=True)
    return path


def build_parts(cfg: Config, accelerator: Accelerator, data) -> Parts:
    model = build_model(cfg.arch, len(data.class_names), cfg.pretrained, cfg.cifar_stem).to(accelerator.device)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        if accelerator.device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        model = torch.compile(model)
    train_loader, val_loader = accelerator.prepare(
        make_loader(data.train, cfg.batch_size, shuffle_seed=cfg.seed, num_workers=cfg.num_workers),
        make_loader(data.val, cfg.eval_batch_size, num_workers=cfg.num_workers))
    steps_per_epoch = -(-len(train_loader) // cfg.grad_accum_steps)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Parts(accelerator, model, optimizer, scheduler, train_loader, val_loader, len(data.class_names))


def restore(cfg: Config, checkpointer: Checkpointer) -> tuple:
    """Return (TrainState, {name: weights}) from the checkpoint --resume names, or a fresh start."""
    saved, weights = checkpointer.restore(cfg.resume) if cfg.resume else (None, {})
    if saved is None:
        return TrainState(), {}
    return TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__}), weights


class RunHooks(Hooks):
    """Keeps the best weights, writes metrics and checkpoints, and listens for preemption."""

    def __init__(self, cfg, parts: Parts, out: Path, checkpointer: Checkpointer, weights, classes, clock, tracker):
        self.cfg, self.parts, self.out, self.checkpointer = cfg, parts, out, checkpointer
        self.classes, self.clock, self.tracker, self.stop = classes, clock, tracker, StopFlag(parts.accelerator)
        self.model = parts.accelerator.unwrap_model(parts.model, keep_torch_compile=False)
        self.best, self.ema = weights.get("best"), EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        if self.ema and "ema" in weights:
            self.ema.load(weights["ema"])

    def save(self, state):
        state.wall_seconds = self.clock()
        self.checkpointer.save(state, {"best": self.best, "ema": self.ema.cpu_state() if self.ema else None})

    def on_step(self, state, snapshot):
        if self.ema:
            self.ema.update(self.model)
        failpoint("kill_after_step", state.step)
        every = self.cfg.checkpoint_every_steps
        if every and state.step % every == 0:
            snapshot()
            self.save(state)

    def on_log(self, state, values):
        self.tracker.log(values, step=state.step)

    def on_epoch_end(self, state, record, improved):
        self.tracker.log(tracking.epoch_values(record), step=state.step)
        acc = self.parts.accelerator
        if improved:  # every rank keeps the best weights, so the final test needs no shared filesystem
            self.best = self.ema.cpu_state() if self.ema else cpu_state_dict(self.model)
        if acc.is_main_process:
            run_dir.append_metrics(self.out, record)
            if improved:
                save_model(self.best, self.out / run_dir.MODEL, self.cfg.arch, self.classes)
        self.save(state)

    def should_stop(self):
        return self.stop.should_stop()

    def evaluation(self):
        return self.ema.swapped_in(self.model) if self.ema else super().evaluation()


def train(cfg: Config, accelerator: Accelerator, data, out: Path, started: float, tracker) -> tuple:
    """Train (or continue training); return (model with the best weights, state, fit's reason)."""
    parts = build_parts(cfg, accelerator, data)
    checkpointer = Checkpointer(accelerator, out, cfg.keep_checkpoints, cfg.arch, data.class_names)
    state, weights = restore(cfg, checkpointer)
    if accelerator.is_main_process:
        run_dir.write_metrics(out, state.history)  # a resumed run's history, without the epochs it will redo
    for record in state.history:  # W&B keeps the first copy of a step: this refills what a killed run lost
        tracker.log(tracking.epoch_values(record), step=record["step"])
    earlier = state.wall_seconds
    hooks = RunHooks(cfg, parts, out, checkpointer, weights, data.class_names,
                     clock=lambda: earlier + time.time() - started, tracker=tracker)
    reason = fit(parts, cfg, state, data.class_names, hooks)
    state.wall_seconds = hooks.clock()
    if reason == "signal":
        hooks.save(state)
        if accelerator.is_main_process:
            (out / MARKER).write_text(f"{hooks.stop.signalled} at step {state.step}\n")
            print(f"preempted: checkpoint written; continue with --resume auto --output-dir {out}", flush=True)
        return parts.model, state, reason
    if accelerator.is_main_process:  # also when a resumed run's best epoch came before the resume
        save_model(hooks.best, out / run_dir.MODEL, cfg.arch, data.class_names)
    accelerator.unwrap_model(parts.model, keep_torch_compile=False).load_state_dict(hooks.best)
    return parts.model, state, reason


def load_for_eval(cfg: Config, class_names: list) -> torch.nn.Module:
    state_dict, arch, saved_classes = load_model(cfg.checkpoint)
    if saved_classes != class_names:
        raise UsageError(f"{cfg.checkpoint} was trained on classes {saved_classes}, the dataset has {class_names}")
    cfg.arch = arch
    model = build_model(arch, len(class_names))
    model.load_state_dict(state_dict)
    return model


def test_and_report(cfg, accelerator, model, test_loader, state, data, out, started, tracker) -> None:
    test = evaluate(accelerator, model, test_loader, cfg.image_size, tta=cfg.tta)
    metrics = classification_metrics(test.preds, test.labels, data.class_names)
    if not accelerator.is_main_process:
        return
    trained = bool(state.history)
    summary = {"best_epoch": state.best_epoch if trained else None,
               "best_val_f1_macro": state.best_val_f1_macro if trained else None,
               "test_loss": test.loss, "test_acc": metrics["acc"], "test_f1_macro": metrics["f1_macro"],
               "test_per_class_accuracy": metrics["per_class_accuracy"],
               "confusion_matrix": metrics["confusion_matrix"], "num_test_samples": metrics["num_samples"],
               "epochs_trained": state.epoch, "steps": state.step,
               "wall_seconds": state.wall_seconds or time.time() - started,
               "world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}
    if cfg.tta:  # reported beside, never instead of, the plain numbers
        flipped = classification_metrics(test.preds_tta, test.labels, data.class_names)
        summary.update(test_acc_tta=flipped["acc"], test_f1_macro_tta=flipped["f1_macro"])
    run_dir.write_summary(out, summary)
    report.write_all(out, cfg.to_dict(), summary, state.history, data.class_names, data.sizes())
    tracker.log_final(summary, data.class_names)
    print(f"test accuracy {metrics['acc']:.4f}, macro-F1 {metrics['f1_macro']:.4f}"
          f"{f' (best epoch {state.best_epoch})' if state.best_epoch else ''}; run folder {out}", flush=True)


def run(cfg: Config) -> int:
    started = time.time()
    check_arch(cfg.arch)  # before minutes of data loading
    track = tracking.wanted(cfg)
    accelerator = make_accelerator(cfg, track)
    out = resolve_output_dir(cfg, accelerator)
    tracker = tracking.Tracker(accelerator, cfg, out, enabled=track)
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the hub download and Arrow cache are made once per node
        data = load_image_data(cfg)
    if cfg.limit_batches:
        data.limit(cfg.limit_batches, cfg.batch_size, cfg.eval_batch_size, accelerator.num_processes)
    data.place(accelerator.device)
    if cfg.eval_only:
        model, state = accelerator.prepare(load_for_eval(cfg, data.class_names)), TrainState()
    env = run_dir.environment(accelerator.num_processes, accelerator.mixed_precision)
    if accelerator.is_main_process:
        run_dir.write_config(out, cfg.to_dict(), env)
    tracker.start({**cfg.to_dict(), **env})
    try:
        if not cfg.eval_only:
            model, state, reason = train(cfg, accelerator, data, out, started, tracker)
            if reason == "signal":
                return EXIT_PREEMPTED
        test_loader = accelerator.prepare(make_loader(data.test, cfg.eval_batch_size, num_workers=cfg.num_workers))
        test_and_report(cfg, accelerator, model, test_loader, state, data, out, started, tracker)
    finally:
        tracker.finish()
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_config(argv))
    except UsageError as e:
        return report_usage_error(e)


if __name__ == "__main__":
    sys.exit(main())
