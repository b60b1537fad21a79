"""One training process: the Accelerator, the run folder and the W&B run set up, then the run itself
(train/runner.py). train/main.py imports this module only once the options are checked: it imports torch,
torchvision and Accelerate, which take seconds that --help and a mistyped option should not wait for.
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed

from train import run_dir, runner, stall, tracking
from train.config import Config
from train.errors import EXIT_DIVERGED, EXIT_PREEMPTED, UsageError
from train.loop import Diverged, Stop, TrainState
from train.models import ModelSpec
from train.report import PRECISION


def make_accelerator(cfg: Config, track: bool) -> Accelerator:
    # The process-group timeout also bounds how long ranks wait while a node prepares the data.
    # non_blocking: host-resident batches are pinned, so their copy to the GPU need not wait.
    stall.record_nccl()  # before the process group starts: its flight recorder goes into a stall's report
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, step_scheduler_with_optimizer=False,
                              log_with="wandb" if track else None,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))])
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU (on CPU Accelerate would silently train in fp32); "
                         "use --mixed_precision bf16")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not native_bf16() and \
            accelerator.is_main_process:
        print("warning: this CPU has neither AVX-512 BF16 nor AMX: bf16 is emulated here, many times slower than "
              "fp32 (21x for ResNet-18 on an AVX2 EPYC); --mixed_precision no trains faster", file=sys.stderr,
              flush=True)
    return accelerator


def native_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX-512 BF16 or AMX) rather than emulating it in fp32."""
    cpu = torch.cpu
    return getattr(cpu, "_is_avx512_bf16_supported", lambda: True)() or getattr(cpu, "_is_amx_tile_supported",
                                                                                 lambda: False)()


def resolve_output_dir(cfg: Config, accelerator: Accelerator) -> tuple:
    """(the run folder every rank agrees on, whether this run made it)."""
    resume_from = Path(cfg.resume) if cfg.resume not in ("", "auto") else None
    if resume_from is not None and not resume_from.is_dir():
        raise UsageError(f"--resume {cfg.resume}: no such checkpoint folder")
    home = resume_from.parent.parent if resume_from and resume_from.parent.name == run_dir.CHECKPOINTS else None
    # Every rank must agree on one folder, and the default name holds a timestamp.
    name = [cfg.output_dir or (str(home) if home else "") or
            run_dir.default_output_dir(cfg.arch + ("-eval" if cfg.eval_only else ""))]
    broadcast_object_list(name)
    cfg.output_dir = name[0]
    path = Path(cfg.output_dir)
    continuing = cfg.resume == "auto" or (home is not None and home.resolve() == path.resolve())
    if not continuing:
        run_dir.refuse_to_overwrite(path)
    made = not path.exists()
    accelerator.wait_for_everyone()  # nobody creates files before every rank has checked
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        for marker in (run_dir.MARKER, run_dir.STALL_MARKER):  # this attempt's end writes its own
            (path / marker).unlink(missing_ok=True)
    return path, made


def announce(cfg: Config, accelerator: Accelerator, out: Path) -> None:
    """The first line of a run: where its files go, and what runs where."""
    if accelerator.is_main_process:
        processes = accelerator.num_processes
        precision = PRECISION.get(accelerator.mixed_precision, accelerator.mixed_precision)
        print(f"run folder {out}: {'evaluating' if cfg.eval_only else 'training'} {cfg.arch} on "
              f"{accelerator.device.type}, {processes} process{'es' if processes > 1 else ''}, {precision}",
              flush=True)


def run(cfg: Config) -> int:
    started = time.time()
    track = tracking.wanted(cfg)
    accelerator = make_accelerator(cfg, track)
    if cfg.compile:
        runner.check_cuda_graphs(cfg.compile_mode, accelerator)  # before minutes of data loading
    out, made = resolve_output_dir(cfg, accelerator)
    announce(cfg, accelerator, out)
    watch = stall.start(out, stall_timeout(cfg, accelerator.num_processes), accelerator)
    tracker = tracking.Tracker(accelerator, cfg, out, enabled=track)
    set_seed(cfg.seed)
    data, evaluated = inputs(cfg, accelerator, out, made)
    env = {**run_dir.environment(accelerator.num_processes, accelerator.mixed_precision), "decoded": data.decoded}
    if accelerator.is_main_process:
        run_dir.write_config(out, cfg.to_dict(), env)
    tracker.start({**cfg.to_dict(), **env})
    tracker.note_stalls(stall.earlier_stalls(out))
    if watch:
        watch.on_stall = lambda: tracker.note_stalls(stall.earlier_stalls(out))
    try:
        code = train_and_test(runner.Run(cfg, accelerator, out, tracker, started), data, evaluated)
    except Diverged as e:
        if accelerator.is_main_process:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_DIVERGED
    except RuntimeError:  # a collective failed: a peer that is gone makes it a stall, named (this may not return)
        stall.peer_failed()
        raise
    finally:
        stall.mark(stall.WANDB)
        tracker.finish()
    # Every rank, W&B on or off. Not after an exception: that process reports its error and exits, its peers
    # may be inside a collective.
    stall.mark(stall.END)
    runner.end_process_groups(accelerator)
    if watch:
        watch.finish()
    return code


def inputs(cfg: Config, accelerator: Accelerator, out: Path, made: bool) -> tuple:
    """(the prepared data, and with --eval-only (the prepared model, its ModelSpec), else None). Bad data or a bad
    model is a UsageError, and leaves no empty run folder behind for each try."""
    try:
        evaluated = runner.eval_spec(cfg) if cfg.eval_only else None
        data = runner.prepare_data(cfg, accelerator)
        if evaluated:
            weights, spec = evaluated
            evaluated = accelerator.prepare(runner.eval_model(cfg, spec, weights, data.class_names)), spec
        return data, evaluated
    except UsageError:
        if made and accelerator.is_main_process and not any(out.iterdir()):
            out.rmdir()
        raise


def train_and_test(run: runner.Run, data, evaluated: tuple | None) -> int:
    """Train, or take the model --eval-only gave (`evaluated`: (model, spec)), then test and report. Returns the
    exit status: EXIT_PREEMPTED when a signal stopped the training (no test then), else 0."""
    if evaluated:
        (model, spec), state, stop = evaluated, TrainState(), Stop.FINISHED
    else:
        spec = ModelSpec.from_config(run.cfg, data.class_names, decode_size=data.train.images.shape[-1])
        model, state, stop = runner.train(run, data, spec)
        if stop is Stop.SIGNAL:
            return EXIT_PREEMPTED
    runner.test_and_report(run, model, spec, state, data, stop)
    return 0


def stall_timeout(cfg: Config, processes: int) -> float:
    """--stall-timeout; with several processes at most a third of --dist-timeout, so that the longest limit (twice
    it) ends before torch's watchdog aborts a collective."""
    return min(cfg.stall_timeout, cfg.dist_timeout / 3) if processes > 1 else cfg.stall_timeout
