"""Hyperparameter search from a W&B-format sweep file, run by Optuna from a journal file in the sweep folder.

    python -m train.sweep configs/sweep-seed-lr-batch.yaml --epochs 30              # one worker
    python -m train.sweep FILE --workers 4 --epochs 30                            # 4 workers (one per GPU)
    python -m train.sweep FILE --check                                            # check the file, train nothing
    python -m train.sweep FILE --run-cap 5 --epochs 30                            # this worker: 5 trials, then stop

Options after FILE that are not the sweep's own go to every trial's train/main.py. A worker asks the study for
a trial, trains it as a run of its own (`train/main.py` in a fresh process, through `accelerate launch` when a
trial has several processes), tells the study how it ended, and asks again until run_cap trials are done, the
grid is exhausted or this worker has run its --run-cap trials (W&B's `wandb agent --count`); a random or bayes
sweep without either runs until it is stopped, as W&B's does. The trial's rank 0 reports the metric each epoch
and stops where the pruner says (train/study.py); this process only asks and tells.

How a trial ended decides what the worker does (`outcome`, table in `Outcome`): finished or pruned -> told
COMPLETE / PRUNED; diverged (exit 3) -> FAIL, the worker goes on; bad input (exit 2) -> FAIL and the sweep stops
(the same mistake in every trial); preempted (exit 75) -> left RUNNING, the worker exits 75 and the requeued
worker resumes that trial (same number, same folder, --resume auto); SIGTERM, SIGUSR1 (Slurm) or Ctrl-C to a
worker stop its trial that way too, the signal passed on to the trial's training processes (train/supervise.py,
which also starts --workers N). A trial whose worker is gone for good is resumed the same way by the next worker
that starts (train/trial_owner.py).
"""

import argparse
import enum
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from train import preemption, run_dir, stall, study
from train.config import build_parser, parse_config
from train.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, UsageError, report_usage_error
from train.failpoints import failpoint
from train.supervise import default_workers, run_trial, start_workers
from train.sweep_config import load_sweep
from train.trial_owner import counted, local_pid_dirs, orphan, owner, ran_here, wait_for_training


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see python -m train.sweep --help)")


def parse_args(argv=None) -> tuple:
    parser = _Parser(description=__doc__.splitlines()[0], allow_abbrev=False, usage="python -m train.sweep FILE "
                                     "[--workers N] [--sweep-dir DIR] [...] [train/main.py options]")
    parser.add_argument("file", help="sweep file (W&B's format; see configs/sweep-*.yaml)")
    parser.add_argument("--sweep-dir", default="", help="folder of the study and its runs (default: runs/sweep-"
                        "<Slurm array job id>, else runs/sweep-<file name>-<time>); several workers share one")
    parser.add_argument("--workers", type=int, default=None, help="worker processes on this machine (default: one "
                        "per GPU, or per --processes-per-trial GPUs, times --workers-per-gpu; 1 without GPUs)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="workers sharing one GPU (small models)")
    parser.add_argument("--processes-per-trial", type=int, default=1,
                        help="processes (GPUs) per trial: DDP through accelerate launch when more than 1")
    parser.add_argument("--storage", default="", help="a database URL for the study (Optuna's RDBStorage, e.g. "
                        "postgresql://user@host/db) instead of the journal file: for hundreds of workers; or "
                        f"{study.STORAGE_ENV} in the environment, out of `ps` for a URL with a password")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the sampler (same seed, same trials)")
    parser.add_argument("--max-failures", type=int, default=3, help="failed trials in a row that stop a worker")
    parser.add_argument("--run-cap", "--count", type=int, default=None, metavar="N",
                        help="this worker stops after running N trials, like `wandb agent --count N` (each worker "
                        "of --workers, each Slurm array task: its requeued attempts count together); the sweep "
                        "file's run_cap caps the whole study. Without either, a random or bayes sweep runs until "
                        "it is stopped (Ctrl-C, SIGTERM, scancel), as W&B's does")
    parser.add_argument("--check", action="store_true", help="check the sweep file and options, train nothing")
    args, train_args = parser.parse_known_args(argv)
    for name in ("workers", "workers_per_gpu", "processes_per_trial", "max_failures", "run_cap"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return args, train_args


def check_train_options(sweep, train_args: list) -> None:
    """The fixed options parse as train/main.py's, and none is also a swept parameter."""
    parse_config(train_args)
    given = set(vars(build_parser(only_given=True).parse_args(train_args))) - {"config"}
    both = sorted(given & {p.name for p in sweep.parameters})
    if both:
        raise UsageError(f"--{both[0].replace('_', '-')} is both a fixed option and a parameter of {sweep.path}")
    for name in ("output_dir", "resume", "sweep_dir", "trial_number", "eval_only"):
        if name in given:
            raise UsageError(f"--{name.replace('_', '-')} is set by the sweep for each trial: leave it out")


def sweep_folder(args) -> Path:
    if args.sweep_dir:
        return Path(args.sweep_dir)
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return Path("runs") / f"sweep-{os.environ['SLURM_ARRAY_JOB_ID']}"
    return Path("runs") / f"sweep-{Path(args.file).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_folder(folder: Path, file: str) -> None:
    """Keep the sweep file in the folder; a folder started from another file is refused, not mixed."""
    folder.mkdir(parents=True, exist_ok=True)
    kept, text = folder / study.SWEEP_FILE, Path(file).read_text()
    if not kept.exists():
        tmp = folder / f".{study.SWEEP_FILE}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, kept) if not kept.exists() else tmp.unlink()
    if kept.read_text() != text:
        raise UsageError(f"{folder} holds a sweep started from another file ({kept}): use another --sweep-dir")


# ---- one worker -------------------------------------------------------------------------------


def next_trial(s, sweep, seed: int):
    """(trial, options) to run next, or None when run_cap trials are counted or the grid is exhausted."""
    optuna = study.load_optuna()
    limit = min(sweep.run_cap or math.inf, sweep.grid_size() if sweep.method == "grid" else math.inf)
    if sum(counted(t) for t in s.get_trials(deepcopy=False)) >= limit:
        return None
    trial = s.ask()
    trial.set_user_attr("owner", owner())  # at once: a trial without an owner could never be told orphaned
    failpoint("kill_after_ask", trial.number)
    before = sum(counted(t) for t in s.get_trials(deepcopy=False) if t.number < trial.number)
    if before >= limit or (sweep.method == "grid" and trial.number >= sweep.grid_size()):
        trial.set_user_attr("not_run", "asked past run_cap or the end of the grid")
        _tell(s, trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial, study.suggest(s, trial, sweep, seed)


def run_folder(folder: Path, number: int, options: dict, searched) -> Path:
    """A trial's run folder: its number and the values of the searched parameters (the fixed ones are the same
    in every trial, and in its config.yaml)."""
    short = "".join(f"-{k}{_short(v)}" for k, v in options.items() if k in searched)
    return folder / f"trial-{number:04d}{short}"[:120]


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def train_command(args, folder: Path, number: int, options: dict, train_args: list, out: Path) -> list:
    """train/main.py for one trial: its options after the fixed ones, its own folder, always resumable."""
    trial_args = [*train_args]
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        trial_args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    trial_args += ["--output-dir", str(out), "--resume", "auto",
                   "--sweep-dir", str(folder), "--trial-number", str(number),
                   "--wandb-group", folder.name, "--run-name", f"{folder.name}-trial-{number}"]
    if args.processes_per_trial == 1 and not os.environ.get("CIFAR_SWEEP_LAUNCH"):
        return [sys.executable, "-m", "train.main", *trial_args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1",
              "--num_processes", str(args.processes_per_trial),
              *(["--multi_gpu"] if args.processes_per_trial > 1 else []),
              *shlex.split(os.environ.get("CIFAR_SWEEP_LAUNCH", ""))]
    return [*launch, "-m", "train.main", *trial_args]


def objective(out: Path, sweep) -> float:
    """The trial's value: the best epoch's metric (max or min by the goal), from its metrics.jsonl."""
    return sweep.best([r[sweep.record_key] for r in run_dir.read_metrics(out)])


def work(args, train_args: list, folder: Path) -> int:
    """Ask, train, tell, until the study has no more trials for this worker; the worker's exit status."""
    sweep = load_sweep(str(folder / study.SWEEP_FILE))
    s = study.open_study(sweep, folder, args.sweep_seed)
    slot = owner()["slot"]
    if sweep.method != "grid" and not sweep.run_cap and not args.run_cap:
        print(f"worker {slot}: a {sweep.method} sweep without run_cap runs until it is stopped (Ctrl-C, SIGTERM, "
              f"scancel), as W&B's does; --run-cap N stops a worker after N trials", flush=True)
    failures = 0
    while True:
        if preemption.requested():
            print(f"worker {slot}: stopping on {preemption.signalled()}, before its next trial", flush=True)
            return EXIT_PREEMPTED
        ran = ran_here(s.get_trials(deepcopy=False))
        if args.run_cap and ran >= args.run_cap:
            print(f"worker {slot}: stopping at its --run-cap {args.run_cap} ({study_line(s)})", flush=True)
            return 0
        picked = pick_trial(s, sweep, folder, args.sweep_seed)
        if picked is None:
            print(f"worker {slot}: no trials left ({study_line(s)})", flush=True)
            return 0
        trial, options, out, pid_dir = picked
        command = train_command(args, folder, trial.number, options, train_args, out)
        code, last_error, preempted = run_trial(command, out, pid_dir)
        summary = run_dir.read_summary(out) if code == 0 else None
        end = outcome(code, preempted, preemption.requested(), bool(summary and summary.get("pruned_at_epoch")),
                      stall.stalled(out))
        if end in (Outcome.PREEMPTED, Outcome.STALLED):
            # Left RUNNING: this worker's requeued job resumes it, or whichever worker finds it orphaned.
            how = "with a checkpoint" if preempted else f"before its checkpoint (exit status {code})"
            how = f"on a stall ({out / run_dir.STALL_REPORT})" if end is Outcome.STALLED else how
            print(f"trial {trial.number}: stopped {how}; the requeued worker, or the next one, resumes it",
                  flush=True)
            return EXIT_PREEMPTED
        if end in (Outcome.COMPLETE, Outcome.PRUNED):
            finished(s, trial, out, sweep, summary, end)
            failures = 0
            continue
        failures += 1
        if failed(s, trial, end, last_error or f"exit status {code}", failures, args.max_failures):
            return 1


class Outcome(enum.Enum):
    """How a trial's training ended, and what the worker does about it."""

    COMPLETE = "complete"  # ran to its end: told COMPLETE with its best epoch's metric
    PRUNED = "pruned"  # the pruner stopped it after an epoch (it was tested all the same): told PRUNED
    PREEMPTED = "preempted"  # stopped by a signal: left RUNNING, the worker exits 75, a worker resumes it
    STALLED = "stalled"  # stopped on a stall (exit 124, train/stall.py): left RUNNING, resumed as a preempted one is
    STALLED_AGAIN = "stalled again at the same step"  # told FAIL with the stall's line, the worker goes on
    BAD_INPUT = "bad input"  # exit 2: told FAIL, and the sweep stops (every trial would repeat the mistake)
    DIVERGED = "diverged"  # exit 3: told FAIL, the worker goes on
    FAILED = "failed"  # any other exit: told FAIL, the worker goes on (until --max-failures in a row)


def outcome(code: int, preempted: bool, stopping: bool, pruned: bool, stalled: int = 0) -> Outcome:
    """A trial's end from its exit status, whether it left a PREEMPTED marker, whether this worker is stopping
    on a signal (a trial it stopped before its checkpoint is resumed, not failed), whether it was pruned, and how
    many times it has stalled at the step where this attempt stalled (0: it did not)."""
    if stalled:
        return Outcome.STALLED if stalled < stall.SAME_STEP_LIMIT else Outcome.STALLED_AGAIN
    if preempted or (code and stopping):
        return Outcome.PREEMPTED
    if code == 0:
        return Outcome.PRUNED if pruned else Outcome.COMPLETE
    return {EXIT_USAGE: Outcome.BAD_INPUT, EXIT_DIVERGED: Outcome.DIVERGED}.get(code, Outcome.FAILED)


def pick_trial(s, sweep, folder: Path, seed: int):
    """(trial, options, run folder, pid folder) this worker runs next, its owner recorded, or None when there is
    none: a RUNNING trial it continues (its own, preempted, or an orphan whose training it first waits for),
    else a new one from the study."""
    optuna = study.load_optuna()
    left, gone = orphan(folder, s.get_trials(deepcopy=False)), None
    if left:
        frozen, why, gone = left
        trial = optuna.trial.Trial(s, frozen._trial_id)
        options = frozen.user_attrs.get("options") or study.suggest(s, trial, sweep, seed)
        print(f"trial {trial.number}: {why}; resuming it from its last checkpoint", flush=True)
    else:
        asked = next_trial(s, sweep, seed)
        if asked is None:
            return None
        trial, options = asked
    trial.set_user_attr("options", options)  # drawn now if its worker died first; stored ones stay
    pid_dir = Path(tempfile.mkdtemp(prefix=f"cifar-sweep-trial-{trial.number:04d}-"))
    # The owner before any wait: should this worker die during it, the next one waits for the same processes.
    waits = [str(d) for d in local_pid_dirs(gone)] if gone else []
    trial.set_user_attr("owner", {**owner(), "pids": str(pid_dir), "waits": waits})
    if gone:
        wait_for_training(gone, trial.number)
    stored = left and left[0].user_attrs.get("run_folder")  # a resumed trial keeps its folder
    out = folder / Path(stored).name if stored else run_folder(folder, trial.number, options, sweep.searched)
    trial.set_user_attr("run_folder", str(out))
    print(f"trial {trial.number}: {' '.join(f'{k}={_short(v)}' for k, v in options.items())} -> {out}", flush=True)
    return trial, options, out, pid_dir


def failed(s, trial, end: Outcome, reason: str, failures: int, max_failures: int) -> bool:
    """Tell the study a trial failed; bad input stops the sweep; whether this worker stops too (its failures in
    a row reached --max-failures)."""
    trial.set_user_attr("fail_reason", reason)
    _tell(s, trial, state=study.load_optuna().trial.TrialState.FAIL)
    if end is Outcome.BAD_INPUT:
        raise UsageError(f"trial {trial.number} stopped on bad input, which every trial would repeat: {reason}")
    print(f"trial {trial.number}: {end.value} ({reason}); the worker goes on", flush=True)
    if failures < max_failures:
        return False
    print(f"error: {failures} trials in a row failed, the last: {reason}; this worker stops", file=sys.stderr,
          flush=True)
    return True


def finished(s, trial, out: Path, sweep, summary: dict, end: Outcome) -> None:
    """Tell the study how a trial that ran to its end did: pruned, or its best epoch's metric."""
    trial.set_user_attr("test_acc", summary["test_acc"])
    trial.set_user_attr("test_f1_macro", summary["test_f1_macro"])
    if end is Outcome.PRUNED:
        _tell(s, trial, state=study.load_optuna().trial.TrialState.PRUNED)
    else:
        _tell(s, trial, objective(out, sweep))


def _tell(s, trial, value=None, state=None) -> None:
    """study.tell; the trial is stored even when GridSampler then raises: after the last grid point it stops
    the study, which only study.optimize expects."""
    try:
        s.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def study_line(s) -> str:
    states = {}
    for t in s.get_trials(deepcopy=False):
        if counted(t):
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"


def cap_text(sweep) -> str:
    if sweep.run_cap:
        return f"run_cap {sweep.run_cap}"
    if sweep.method == "grid":
        return "no run_cap (the grid's end)"
    return "no run_cap: runs until stopped (Ctrl-C, SIGTERM, scancel) or each worker's --run-cap N"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, train_args = parse_args(argv)
        sweep = load_sweep(args.file)
        check_train_options(sweep, train_args)
        if args.check:
            print(f"{args.file}: {sweep.method} over {', '.join(p.name for p in sweep.parameters)}"
                  f"{f', {sweep.grid_size()} combinations' if sweep.method == 'grid' else ''}, "
                  f"{cap_text(sweep)}; metric {sweep.metric} ({sweep.goal})")
            return 0
        study.load_optuna()
        folder = sweep_folder(args)
        args.storage = args.storage or os.environ.get(study.STORAGE_ENV, "")  # given so: out of `ps` too
        if args.storage:
            os.environ[study.STORAGE_ENV] = args.storage  # for this worker, the others and every trial
            study.storage_for(folder)  # a bad database URL is one line before the folder is made
        prepare_folder(folder, args.file)
        args.workers = args.workers or default_workers(args)
        if args.workers > 1:
            return start_workers(args, argv, folder)
        preemption.listen("passing it on to the running trial, which stops at its next checkpoint; then this "
                          "worker stops")
        preemption.work_to_save()  # a Ctrl-C is passed on too: the trial's checkpoint is the work to save
        return work(args, train_args, folder)
    except UsageError as e:
        return report_usage_error(e)


if __name__ == "__main__":
    sys.exit(main())
