"""One run, start to end: data prepared once per node, the model built and trained with hooks that keep
the best weights, write metrics and checkpoints and listen for preemption, then tested and reported.
train/main.py only sets up the process (accelerator, run folder, tracker) and calls these."""

import dataclasses
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator

from train import preemption, progress, report, run_dir, stall, study, tracking
from train.augment import BatchTransform
from train.checkpoint import Checkpointer
from train.model_files import build_trained, cpu_state_dict, load_model, save_model
from train.config import CUDA_GRAPH_MODES, Config
from train.data import load_image_data, make_loader
from train.ema import EMA
from train.errors import PeerTimeout, UsageError, first_line
from train.failpoints import delay, failpoint
from train.loop import Hooks, LoopConfig, Parts, Stop, TrainState, evaluate, fit
from train.metrics import classification_metrics
from train.models import ModelSpec, plain_model
from train.optim import build_optimizer, build_scheduler, set_peak_lr


@dataclasses.dataclass
class Run:
    """What train/main.py set up for one run: its options, processes, folder, tracker and start time."""

    cfg: Config
    accelerator: Accelerator
    out: Path
    tracker: tracking.Tracker
    started: float  # time.time() when this attempt started

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, line: str) -> None:
        """Print on the main process only: one line per run, not one per process."""
        if self.is_main:
            print(line, flush=True)


def build_parts(cfg: Config, accelerator: Accelerator, data) -> Parts:
    model = ModelSpec.from_config(cfg, data.class_names).build(cfg.pretrained).to(accelerator.device)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn:
        if accelerator.device.type != "cuda":
            raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_loader, val_loader = accelerator.prepare(
        make_loader(data.train, cfg.batch_size, shuffle_seed=cfg.seed, num_workers=cfg.num_workers),
        make_loader(data.val, cfg.eval_batch_size, num_workers=cfg.num_workers))
    steps_per_epoch = -(-len(train_loader) // cfg.grad_accum_steps)
    optimizer = build_optimizer(cfg, model, accelerator.mixed_precision)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode)
    train_transform = BatchTransform(cfg.image_size, train=True, auto_augment=cfg.auto_augment,
                                     erasing=cfg.random_erasing, mixup=cfg.mixup_alpha, cutmix=cfg.cutmix_alpha,
                                     num_classes=len(data.class_names))
    return Parts(accelerator, model, optimizer, scheduler, train_loader, val_loader, train_transform,
                 BatchTransform(cfg.image_size), list(data.class_names))


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile what Accelerate prepared, as its own dynamo_backend does: compiling the DDP module lets
    dynamo's DDPOptimizer split the graph at DDP's bucket boundaries, so gradient all-reduces overlap the
    backward (a compiled module inside DDP produces every gradient at once, at the end).

    dynamic=False: one static graph per input shape. The short last batch of an epoch (and of validation)
    compiles a graph of its own instead of turning every later batch into a dynamic-shape graph, which
    dynamo's automatic_dynamic_shapes would do at the first new size. Every image is still trained on."""
    return torch.compile(model, mode=mode, dynamic=False)


def check_cuda_graphs(mode: str, accelerator: Accelerator) -> None:
    """Refuse the compile modes that capture CUDA graphs where they cannot run or were never verified.
    Called before the data loads (gradient accumulation is refused earlier, in Config.validate)."""
    if mode not in CUDA_GRAPH_MODES:
        return
    if accelerator.device.type != "cuda":
        raise UsageError(f"--compile-mode {mode} captures CUDA graphs: it needs a GPU (on CPU: --compile-mode default)")
    if accelerator.num_processes > 1:
        raise UsageError(f"--compile-mode {mode} (CUDA graphs) is supported on one process only: it is not verified "
                         f"with DDP; use --compile-mode default")


def restore(cfg: Config, checkpointer: Checkpointer) -> tuple:
    """Return (TrainState, {name: weights}) from the checkpoint --resume names, or a fresh start."""
    saved, weights = checkpointer.restore(cfg.resume) if cfg.resume else (None, {})
    if saved is None:
        return TrainState(), {}
    return TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__}), weights


class RunHooks(Hooks):
    """Keeps the best weights, writes metrics and checkpoints, prints progress and passes on stop signals."""

    def __init__(self, run: Run, parts: Parts, checkpointer: Checkpointer, weights: dict, spec: ModelSpec,
                 earlier_seconds: float):
        self.run, self.cfg, self.parts, self.checkpointer, self.spec = run, run.cfg, parts, checkpointer, spec
        self.earlier_seconds = earlier_seconds  # of the attempts before this one
        self.model = plain_model(parts.accelerator, parts.model)  # clean state dict keys, whatever the wrapping
        self.best, self.ema = weights.get("best"), EMA(self.model, self.cfg.ema_decay) if self.cfg.ema_decay else None
        self.steps_taken = 0  # by this process: a resumed run takes only the steps its checkpoint lacked
        if self.ema and "ema" in weights:
            self.ema.load(weights["ema"])
        # A sweep's trial: rank 0 reports each epoch to the study, and stops where its pruner says.
        self.reporter = study.TrialReporter(self.cfg.sweep_dir, self.cfg.trial_number) \
            if self.cfg.sweep_dir and run.is_main else None
        self.pruned = False
        images_per_step = self.cfg.batch_size * self.cfg.grad_accum_steps * parts.accelerator.num_processes
        self.plain = progress.PlainLines(images_per_step) if run.is_main and not progress.terminal() else None
        preemption.listen()  # main() already did, unless the run is driven from elsewhere (tests)

    def clock(self) -> float:
        """Seconds of training in all attempts so far."""
        return self.earlier_seconds + time.time() - self.run.started

    def save(self, state, preempted: bool = False):
        state.wall_seconds = self.clock()
        self.checkpointer.save(state, {"best": self.best, "ema": self.ema.cpu_state() if self.ema else None},
                               preempted)

    def on_step(self, state):
        self.steps_taken += 1
        if self.ema:
            self.ema.update(self.model)
        failpoint("kill_after_step", state.step)
        speed = self.plain.step() if self.plain else None
        if speed:
            self.run.say(f"epoch {state.epoch + 1}/{self.cfg.epochs} step {state.step} (batch {state.batch_in_epoch}/"
                         f"{len(self.parts.train_loader)} of the epoch): {speed}")

    def on_checkpoint(self, state):
        self.save(state)

    def on_log(self, state, values):
        self.run.tracker.log(values, step=state.step)
        if self.plain:
            self.plain.logged()
            self.run.say(f"epoch {state.epoch + 1}/{self.cfg.epochs} step {state.step}: loss "
                         f"{values['train/loss']:.4f}, lr {values['train/lr']:.4g}, "
                         f"{values['train/images_per_second']:.0f} img/s")

    def on_epoch_end(self, state, record, improved):
        """After validation, on every process, in this order: (1) the epoch to W&B; (2) an improved epoch's weights
        kept as the best, on every rank (so the final test needs no shared filesystem; EMA buffers agreed first,
        a collective); (3) the main process appends metrics.jsonl and writes the best model, files a person reads
        at once; (4) every rank writes the checkpoint, which holds (2) and the history; (5) the sweep's pruner is
        told of the epoch and may stop the trial at the next epoch's start; (6) the epoch's line."""
        stall.mark(stall.CHECKPOINT, state.step)
        self.run.tracker.log(tracking.epoch_values(record), step=state.step)
        if improved:
            self._keep_best()
        if self.run.is_main:
            self._write_epoch(record, improved)
        self.save(state)
        if self.reporter:
            self.pruned = self.reporter.epoch_end(record)
        self.run.say(f"epoch {record['epoch']}/{self.cfg.epochs}: train loss {record['train_loss']:.4f} "
                     f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                     f"macro-F1 {record['val_f1_macro']:.4f} | {record['epoch_seconds']:.1f} s, "
                     f"{record['images_per_second']:.0f} img/s")

    def _keep_best(self):
        if self.ema:
            self.ema.sync_buffers(self.parts.accelerator)
        self.best = self.ema.cpu_state() if self.ema else cpu_state_dict(self.model)

    def _write_epoch(self, record, improved):
        run_dir.append_metrics(self.run.out, record)
        if not improved:
            return
        save_model(self.best, self.run.out / run_dir.MODEL, self.spec)
        if self.cfg.wandb_log_model == "best":
            stall.mark(stall.WANDB)
            metadata = {"model": self.spec.to_dict(), "epoch": record["epoch"],
                        **{k: record[k] for k in ("val_loss", "val_acc", "val_f1_macro")}}
            self.run.tracker.log_model(model_files(self.run.out), record["epoch"], metadata)

    def stop_requested(self):
        return preemption.requested()

    def prune_requested(self):
        return self.pruned

    def evaluation(self):
        return self.ema.swapped_in(self.model) if self.ema else super().evaluation()


def train(run: Run, data, spec: ModelSpec) -> tuple:
    """Train (or continue training); return (model with the best weights, state, why training stopped)."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    stall.mark(stall.SETUP)  # the model built, the checkpoint loaded
    parts = build_parts(cfg, accelerator, data)
    checkpointer = Checkpointer(accelerator, out, cfg.keep_checkpoints, spec)
    state, weights = restore(cfg, checkpointer)
    if state.step and set_peak_lr(parts.scheduler, cfg.lr):
        run.say(f"continuing with --lr {cfg.lr} (the checkpoint was trained with another)")
    if run.is_main:
        run_dir.write_metrics(out, state.history)  # a resumed run's history, without the epochs it will redo
    for record in state.history:  # W&B keeps the first copy of a step: this refills what a killed run lost
        run.tracker.log(tracking.epoch_values(record), step=record["step"])
    hooks = RunHooks(run, parts, checkpointer, weights, spec, earlier_seconds=state.wall_seconds)
    first_step = state.step
    preemption.work_to_save()  # from here a first Ctrl-C writes a checkpoint instead of stopping at once
    stop = fit(parts, LoopConfig.from_config(cfg), state, hooks)
    state.wall_seconds = hooks.clock()
    run.say(f"{hooks.steps_taken} optimizer steps in this attempt (from step {first_step} to {state.step})")
    if stop is Stop.SIGNAL:
        hooks.save(state, preempted=True)
        if run.is_main:
            (out / run_dir.MARKER).write_text(f"{preemption.signalled()} at step {state.step}; "
                                              f"{preemption.attempt()}\n")
        why = "interrupted" if preemption.signalled() == "SIGINT" else "preempted"
        run.say(f"{why}: checkpoint written at step {state.step}; continue with --resume auto --output-dir {out}")
        # No rank exits before the marker exists: under `srun --kill-on-bad-exit` the first exit
        # (status 75) ends the other nodes' tasks at once.
        stall.mark(stall.END)
        accelerator.wait_for_everyone()
        return parts.model, state, stop
    if stop is Stop.PRUNED:
        run.say(f"pruned by the sweep after epoch {state.epoch}: testing the best epoch's weights")
    if run.is_main:  # also when a resumed run's best epoch came before the resume
        save_model(hooks.best, out / run_dir.MODEL, spec)
    hooks.model.load_state_dict(hooks.best)
    return parts.model, state, stop


def eval_spec(cfg: Config) -> tuple:
    """(weights, ModelSpec) of --checkpoint, from its own record; an option that contradicts it is an error.
    Sets cfg's model and input options from the record, before the data: the input size decides the decode."""
    state_dict, spec, unrecorded = load_model(cfg.checkpoint)
    # Format-1 files (older runs) may lack the stem and input size: the command line may supply them.
    supplied = unrecorded & cfg.given & {"cifar_stem", "image_size", "decode_size"}
    spec = dataclasses.replace(spec, **{name: getattr(cfg, name) for name in supplied})
    for name in ("arch", "cifar_stem", "image_size", "decode_size"):
        if name == "decode_size" and not spec.decode_size:
            continue  # not recorded: the data decides, as for training
        if name in cfg.given and getattr(cfg, name) != getattr(spec, name):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} contradicts {cfg.checkpoint}, which "
                             f"was trained with {name} {getattr(spec, name)}: leave the option out")
        setattr(cfg, name, getattr(spec, name))  # config.yaml and the report then say what was evaluated
    return state_dict, spec


def eval_model(cfg: Config, spec: ModelSpec, state_dict: dict, class_names: list) -> torch.nn.Module:
    if list(spec.class_names) != class_names:
        raise UsageError(f"{cfg.checkpoint} was trained on classes {list(spec.class_names)}, "
                         f"the dataset has {class_names}")
    return build_trained(state_dict, spec, cfg.checkpoint)


def model_files(out: Path) -> list:
    """What a model artifact holds: the best weights and, where written yet, the run's config, summary and report."""
    return [out / run_dir.MODEL, out / run_dir.CONFIG, out / run_dir.SUMMARY, out / run_dir.REPORT]


def test_and_report(run: Run, model: torch.nn.Module, spec: ModelSpec, state: TrainState, data,
                    stop: Stop = Stop.FINISHED) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    stall.mark(stall.TEST)
    test_loader = accelerator.prepare(make_loader(data.test, cfg.eval_batch_size, num_workers=cfg.num_workers))
    transform = BatchTransform(spec.image_size, mean=spec.mean, std=spec.std)
    test = evaluate(accelerator, model, test_loader, transform, tta=cfg.tta)
    metrics = classification_metrics(test.preds, test.labels, data.class_names)
    if not run.is_main:
        return
    trained = bool(state.history)
    summary = {"best_epoch": state.best_epoch if trained else None,
               "best_val_f1_macro": state.best_val_f1_macro if trained else None,
               "test_loss": test.loss, "test_acc": metrics["acc"], "test_f1_macro": metrics["f1_macro"],
               "test_per_class_accuracy": metrics["per_class_accuracy"],
               "confusion_matrix": metrics["confusion_matrix"], "num_test_samples": metrics["num_samples"],
               "epochs_trained": state.epoch, "steps": state.step,
               "wall_seconds": state.wall_seconds or time.time() - run.started,
               "world_size": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
               "val_is_test": data.val_is_test}
    if cfg.skip_bad_images:
        summary["skipped_images"] = data.skipped
    if stop is Stop.PRUNED:
        summary["pruned_at_epoch"] = state.epoch
        run.tracker.add_tag("pruned")
    if cfg.tta:  # reported beside, never instead of, the plain numbers
        flipped = classification_metrics(test.preds_tta, test.labels, data.class_names)
        summary.update(test_acc_tta=flipped["acc"], test_f1_macro_tta=flipped["f1_macro"])
    report.flag_one_class(summary, data.class_names)
    summary["stalls"] = stall.earlier_stalls(run.out)  # earlier attempts that ended in a stall
    stall.mark(stall.REPORT)
    run_dir.write_summary(run.out, summary)
    report.write_all(run.out, report.shown_options(run, data), summary, state.history, data.class_names,
                     data.sizes())
    stall.mark(stall.WANDB)
    run.tracker.log_final(summary, data.class_names)
    if cfg.wandb_log_model == "end" and trained:
        run.tracker.log_model(model_files(run.out), state.best_epoch,
                              {"model": spec.to_dict(), "best_epoch": state.best_epoch,
                               **{k: summary[k] for k in ("test_loss", "test_acc", "test_f1_macro",
                                                          "test_per_class_accuracy")}})
    run.say(f"test accuracy {metrics['acc']:.4f}, macro-F1 {metrics['f1_macro']:.4f}"
            f"{f' (best epoch {state.best_epoch})' if state.best_epoch else ''}; run folder {run.out}")


def prepare_data(cfg: Config, accelerator: Accelerator):
    """Load and decode the dataset: first the local main process of each node (the hub download, the Arrow
    and decode caches are per node), then the node's other processes, from those caches."""
    first = accelerator.is_local_main_process
    deadline = None
    if accelerator.num_processes > 1:
        side_group(cfg)  # collective: every process is here at about the same time, so one clock starts
        deadline = time.monotonic() + cfg.dist_timeout
    delay("data_prep", here=first)
    if not first:
        wait_for_peers(cfg, accelerator, "preparing the data", deadline)
    data = load_image_data(cfg)
    if first:
        wait_for_peers(cfg, accelerator, "preparing the data", deadline)
    side = data.train.images.shape[-1]
    if accelerator.is_main_process and max(side / cfg.image_size, cfg.image_size / side) >= 4:
        print(f"warning: images are decoded at {side}x{side} and trained at {cfg.image_size}x{cfg.image_size}: "
              "check --image-size (and --decode-size)", file=sys.stderr, flush=True)
    if cfg.limit_batches:
        data.limit(cfg.limit_batches, cfg.batch_size, cfg.eval_batch_size, accelerator.num_processes)
    if cfg.gpu_resident and accelerator.device.type == "cuda" and not data.place(accelerator.device):
        if accelerator.is_main_process:
            print("warning: the decoded images do not fit in half of the GPU's free memory: they stay in pinned "
                  "host memory and are copied to the GPU per batch", file=sys.stderr,
                  flush=True)
    return data


_side_group = (None, None)  # (the default process group, the gloo group made over its processes)


def side_group(cfg: Config):
    """A gloo group of every process, made once per process group; collective: all ranks call it together.

    The data-preparation wait runs on it whatever the training backend: under NCCL torch's watchdog aborts a
    timed-out collective (SIGABRT) before Python hears of it, while gloo's monitored_barrier raises, and on
    rank 0 names the ranks that did not arrive. The group's timeout is how long the other ranks wait for
    rank 0: longer than rank 0's own deadline, so that rank 0, which knows who is missing, speaks first.
    """
    global _side_group
    world = torch.distributed.group.WORLD
    if _side_group[0] is not world:
        seconds = cfg.dist_timeout + min(cfg.dist_timeout, 60)
        try:
            _side_group = (world, torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=seconds)))
        except RuntimeError as e:  # gloo binds the address the hostname resolves to, unless told otherwise
            raise UsageError(f"the processes could not connect over gloo ({first_line(e)}): set "
                             f"GLOO_SOCKET_IFNAME to the network interface the nodes reach each other on") from None
    return _side_group[1]


def end_process_groups(accelerator: Accelerator) -> None:
    """Every rank, at the end: destroy the process groups (Accelerate's end_training, less the trackers) and
    drop the side group's last reference, so that its gloo threads end now. Left to interpreter exit, a thread
    still joinable there is std::terminate: SIGABRT, and under Slurm a failed job, for a run that finished."""
    global _side_group
    accelerator.state.destroy_process_group()
    _side_group = (None, None)


def wait_for_peers(cfg: Config, accelerator: Accelerator, doing: str, deadline: float | None) -> None:
    """Wait until every process is here: rank 0 until `deadline` (time.monotonic()), then it names the processes
    that did not arrive; the others until rank 0 answers. One process: nothing to wait for."""
    if accelerator.num_processes == 1:
        return
    rank = accelerator.process_index
    wait = max(deadline - time.monotonic(), 2.0)  # rank 0 late itself: the others may still be waiting
    entered = time.monotonic()
    try:
        torch.distributed.monitored_barrier(group=side_group(cfg), timeout=timedelta(seconds=wait),
                                            wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if rank == 0 and missing:
            who = f"process{'es' if ',' in missing.group(1) else ''} {missing.group(1)}"
            if time.monotonic() - entered < wait - 0.5:  # before the timeout: it failed or left
                raise UsageError(f"{who} failed or left while {doing}: see its message") from None
            raise PeerTimeout(f"process 0 waited more than --dist-timeout {cfg.dist_timeout} s for {who} {doing}; "
                              f"raise --dist-timeout") from None
        if rank != 0 and "timed out" in text.lower():
            # Rank 0 did not answer; had it been waiting for another process it would have said so and left first.
            raise PeerTimeout(f"process {rank} waited more than --dist-timeout {cfg.dist_timeout} s for process 0 "
                              f"{doing}; raise --dist-timeout") from None
        raise UsageError(f"another process failed or left while {doing}: see its message") from None
