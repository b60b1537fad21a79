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

from train import run_dir, runner, tracking
from train.config import Config
from train.errors import EXIT_DIVERGED, EXIT_PREEMPTED, UsageError
from train.loop import Diverged, Stop, TrainState
from train.models import ModelSpec
from train.report import PRECISION


def make_accelerator(cfg: Config, track: bool) -> Accelerator:
    # The process-group timeout also bounds how long ranks wait while a node prepares the data.
    # non_blocking: host-resident batches are pinned, so their copy to the GPU need not wait.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum_steps, step_scheduler_with_optimizer=False,
                              log_with="wandb" if track else None,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))])
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU (on CPU Accelerate would silently train in fp32); "
                         "use --mixed_precision bf16")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator


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
        (path / run_dir.MARKER).unlink(missing_ok=True)
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
    tracker = tracking.Tracker(accelerator, cfg, out, enabled=track)
    set_seed(cfg.seed)
    try:
        if cfg.eval_only:
            weights, spec = runner.eval_spec(cfg)
        data = runner.prepare_data(cfg, accelerator)
    except UsageError:  # bad data or model: leave no empty run folder behind for each try
        if made and accelerator.is_main_process and not any(out.iterdir()):
            out.rmdir()
        raise
    if cfg.eval_only:
        model, state = accelerator.prepare(runner.eval_model(cfg, spec, weights, data.class_names)), TrainState()
    env = {**run_dir.environment(accelerator.num_processes, accelerator.mixed_precision), "decoded": data.decoded}
    if accelerator.is_main_process:
        run_dir.write_config(out, cfg.to_dict(), env)
    tracker.start({**cfg.to_dict(), **env})
    run = runner.Run(cfg, accelerator, out, tracker, started)
    code, stop = 0, Stop.FINISHED
    try:
        if not cfg.eval_only:
            spec = ModelSpec.from_config(cfg, data.class_names, decode_size=data.train.images.shape[-1])
            model, state, stop = runner.train(run, data, spec)
            if stop is Stop.SIGNAL:
                code = EXIT_PREEMPTED
        if code == 0:
            runner.test_and_report(run, model, spec, state, data, stop)
    except Diverged as e:
        if accelerator.is_main_process:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_DIVERGED
    finally:
        tracker.finish()
    # Every rank, W&B on or off. Not after an exception: that process reports its error and exits, its peers
    # may be inside a collective.
    runner.end_process_groups(accelerator)
    return code
