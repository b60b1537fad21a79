"""Hyperparameter search from a W&B-format sweep file, run by Optuna from a journal file in the sweep folder.

    python -m train.sweep configs/sweep-seed-lr-batch.yaml --epochs 30              # one worker
    python -m train.sweep FILE --workers 4 --epochs 30                            # 4 workers (one per GPU)
    python -m train.sweep FILE --check                                            # check the file, train nothing

Options after FILE that are not the sweep's own go to every trial's train/main.py. A worker asks the study for
a trial, trains it as a run of its own (`train/main.py` in a fresh process, through `accelerate launch` when a
trial has several processes), tells the study how it ended, and asks again until run_cap trials are done or
the grid is exhausted. The trial's rank 0 reports the metric each epoch and stops where the pruner says
(train/study.py); this process only asks and tells.

Ends of a trial: finished or pruned -> told COMPLETE / PRUNED; diverged (exit 3) -> FAIL, the worker goes on;
bad input (exit 2) -> FAIL and the sweep stops (the same mistake in every trial); preempted (exit 75) -> left
RUNNING, the worker exits 75 and the requeued worker resumes that trial (same number, same folder, --resume
auto). A trial whose worker is gone for good (SIGKILL, a lost node: Slurm no longer knows its job, or its
process no longer exists on this host) is resumed the same way by the next worker that starts, which claims
it first with a file only one worker can create: its epochs so far are kept, and it never runs twice.
"""

import argparse
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from train import run_dir, study
from train.config import build_parser, parse_config
from train.errors import EXIT_DIVERGED, EXIT_USAGE, UsageError, report_usage_error
from train.preemption import EXIT_PREEMPTED
from train.sweep_config import load_sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see python -m train.sweep --help)")


def parse_args(argv=None) -> tuple:
    parser = _Parser(description=__doc__.splitlines()[0], allow_abbrev=False, usage="python -m train.sweep FILE "
                                     "[--workers N] [--sweep-dir DIR] [...] [train/main.py options]")
    parser.add_argument("file", help="sweep file (W&B's format; see configs/sweep-*.yaml)")
    parser.add_argument("--sweep-dir", default="", help="folder of the study and its runs (default: runs/sweep-"
                        "<Slurm array job id>, else runs/sweep-<file name>-<time>); several workers share one")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="workers sharing one GPU (small models)")
    parser.add_argument("--processes-per-trial", type=int, default=1,
                        help="processes (GPUs) per trial: DDP through accelerate launch when more than 1")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the sampler (same seed, same trials)")
    parser.add_argument("--max-failures", type=int, default=3, help="failed trials in a row that stop a worker")
    parser.add_argument("--check", action="store_true", help="check the sweep file and options, train nothing")
    args, train_args = parser.parse_known_args(argv)
    for name in ("workers", "workers_per_gpu", "processes_per_trial", "max_failures"):
        if getattr(args, name) < 1:
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

def owner() -> dict:
    """Who runs a trial: enough for another worker to tell whether that worker is still alive."""
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = f"{slurm}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if slurm else os.environ.get("SLURM_JOB_ID", "")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": task,
            "slot": os.environ.get("CIFAR_SWEEP_SLOT", "0")}


def is_alive(who: dict) -> bool:
    """Whether a trial's owner may still be running: its Slurm job is still known to Slurm (requeued jobs are),
    or, without Slurm, its process still exists on this host. Another host's process cannot be checked."""
    if who.get("slurm"):
        try:
            states = subprocess.run(["squeue", "-h", "-j", who["slurm"], "-o", "%T"], capture_output=True,
                                    text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return True  # no answer is no proof
        return bool(states)
    if who.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mine(who: dict) -> bool:
    """A trial this worker left RUNNING when it was preempted: the same Slurm array task (a requeued job keeps
    its ids) and slot, in a new process."""
    me = owner()
    return bool(me["slurm"]) and who.get("slurm") == me["slurm"] and who.get("slot") == me["slot"]


def counted(trial) -> bool:
    """Whether a trial counts towards run_cap and the grid: not one asked past them."""
    return not trial.user_attrs.get("not_run")


def claim(folder: Path, trial, who: dict) -> bool:
    """Take over a trial whose worker is gone, atomically: of several workers that see it at once, the one that
    creates the claim file (O_EXCL, atomic on NFSv3 and later) resumes it."""
    gone = who.get("slurm") or f"{who.get('host')}-{who.get('pid')}"
    try:
        os.close(os.open(folder / f".claim-{trial.number:04d}-{gone}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def orphans(folder: Path, trials) -> list:
    """The RUNNING trials this worker continues: its own, left when it was preempted, and those whose worker is
    gone for good, resumed from their last checkpoint (same number, same folder) by whichever worker claims them."""
    optuna = study._optuna()
    found = []
    for t in trials:
        who = t.user_attrs.get("owner")
        if t.state != optuna.trial.TrialState.RUNNING or not who:
            continue
        if mine(who):
            found.append((t, "this worker was preempted"))
        elif not is_alive(who) and claim(folder, t, who):
            found.append((t, f"its worker ({who['host']}, pid {who['pid']}{', ' + who['slurm'] if who['slurm'] else ''})"
                             f" is gone"))
    return found


def next_trial(s, sweep, seed: int):
    """(trial, options) to run next, or None when run_cap trials are counted or the grid is exhausted."""
    optuna = study._optuna()
    limit = min(sweep.run_cap or math.inf, sweep.grid_size() if sweep.method == "grid" else math.inf)
    if sum(counted(t) for t in s.get_trials(deepcopy=False)) >= limit:
        return None
    trial = s.ask()
    before = sum(counted(t) for t in s.get_trials(deepcopy=False) if t.number < trial.number)
    if before >= limit or (sweep.method == "grid" and trial.number >= sweep.grid_size()):
        trial.set_user_attr("not_run", "asked past run_cap or the end of the grid")
        _tell(s, trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial, study.suggest(s, trial, sweep, seed)


def run_folder(folder: Path, number: int, options: dict) -> Path:
    short = "-".join(f"{k}{_short(v)}" for k, v in options.items())
    return folder / f"trial-{number:04d}-{short}"[:120]


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def train_command(args, folder: Path, number: int, options: dict, train_args: list) -> list:
    """train/main.py for one trial: its options after the fixed ones, its own folder, always resumable."""
    trial_args = [*train_args]
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        trial_args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    trial_args += ["--output-dir", str(run_folder(folder, number, options)), "--resume", "auto",
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
    values = [json.loads(line)[sweep.record_key] for line in (out / run_dir.METRICS).read_text().splitlines()
              if line.strip()]
    return max(values) if sweep.goal == "maximize" else min(values)


def work(args, train_args: list, folder: Path) -> int:
    """Ask, train, tell, until the study has no more trials for this worker; the worker's exit status."""
    optuna = study._optuna()
    sweep = load_sweep(str(folder / study.SWEEP_FILE))
    s = study.open_study(sweep, folder, args.sweep_seed)
    failures = 0
    while True:
        left = orphans(folder, s.get_trials(deepcopy=False))
        if left:
            (frozen, why), *_ = left
            trial, options = optuna.trial.Trial(s, frozen._trial_id), frozen.user_attrs["options"]
            print(f"trial {trial.number}: {why}; resuming it from its last checkpoint", flush=True)
        else:
            asked = next_trial(s, sweep, args.sweep_seed)
            if asked is None:
                print(f"worker {owner()['slot']}: no trials left ({study_line(s)})", flush=True)
                return 0
            trial, options = asked
            trial.set_user_attr("options", options)
        trial.set_user_attr("owner", owner())
        out = run_folder(folder, trial.number, options)
        trial.set_user_attr("run_folder", str(out))
        print(f"trial {trial.number}: {' '.join(f'{k}={_short(v)}' for k, v in options.items())} -> {out}",
              flush=True)
        code, last_error = run_trial(train_command(args, folder, trial.number, options, train_args))
        if code == EXIT_PREEMPTED:
            print(f"trial {trial.number}: preempted; the requeued worker resumes it", flush=True)
            return EXIT_PREEMPTED
        if code == 0:
            summary = json.loads((out / run_dir.SUMMARY).read_text())
            pruned = summary.get("pruned_at_epoch")
            trial.set_user_attr("test_acc", summary["test_acc"])
            trial.set_user_attr("test_f1_macro", summary["test_f1_macro"])
            if pruned:
                _tell(s, trial, state=optuna.trial.TrialState.PRUNED)
            else:
                _tell(s, trial, objective(out, sweep))
            failures = 0
            continue
        reason = last_error or f"exit status {code}"
        trial.set_user_attr("fail_reason", reason)
        _tell(s, trial, state=optuna.trial.TrialState.FAIL)
        if code == EXIT_USAGE:
            raise UsageError(f"trial {trial.number} stopped on bad input, which every trial would repeat: {reason}")
        failures += 1
        kind = "diverged" if code == EXIT_DIVERGED else "failed"
        print(f"trial {trial.number}: {kind} ({reason}); the worker goes on", flush=True)
        if failures >= args.max_failures:
            print(f"error: {failures} trials in a row failed, the last: {reason}; this worker stops",
                  file=sys.stderr, flush=True)
            return 1


def _tell(s, trial, value=None, state=None) -> None:
    """study.tell; the trial is stored even when GridSampler then raises: after the last grid point it stops
    the study, which only study.optimize expects."""
    try:
        s.tell(trial, value, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def run_trial(command: list) -> tuple:
    """Run a trial's training, its output passed through as it comes; (exit status, its last error line)."""
    last = ""
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("error: "):
                last = line[len("error: "):].strip()
    return proc.returncode, last


def study_line(s) -> str:
    states = {}
    for t in s.get_trials(deepcopy=False):
        if counted(t):
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"


# ---- several workers --------------------------------------------------------------------------

def start_workers(args, argv: list, folder: Path) -> int:
    """--workers N: N worker processes on this machine, one GPU per --workers-per-gpu of them."""
    gpus = _gpus()
    procs = []
    for i in range(args.workers):
        env = {**os.environ, "CIFAR_SWEEP_SLOT": str(i)}
        if gpus:
            first = (i // args.workers_per_gpu) * args.processes_per_trial
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[(first + k) % len(gpus)]
                                                   for k in range(args.processes_per_trial))
        command = [sys.executable, "-m", "train.sweep", *argv, "--workers", "1", "--sweep-dir", str(folder)]
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def _gpus() -> list:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, train_args = parse_args(argv)
        sweep = load_sweep(args.file)
        check_train_options(sweep, train_args)
        if args.check:
            print(f"{args.file}: {sweep.method} over {', '.join(p.name for p in sweep.parameters)}"
                  f"{f', {sweep.grid_size()} combinations' if sweep.method == 'grid' else ''}, "
                  f"run_cap {sweep.run_cap or 'none'}; metric {sweep.metric} ({sweep.goal})")
            return 0
        study._optuna()
        folder = sweep_folder(args)
        prepare_folder(folder, args.file)
        if args.workers > 1:
            return start_workers(args, argv, folder)
        return work(args, train_args, folder)
    except UsageError as e:
        return report_usage_error(e)


if __name__ == "__main__":
    sys.exit(main())
