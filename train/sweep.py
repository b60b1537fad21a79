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

Ends of a trial: finished or pruned -> told COMPLETE / PRUNED; diverged (exit 3) -> FAIL, the worker goes on;
bad input (exit 2) -> FAIL and the sweep stops (the same mistake in every trial); preempted (exit 75) -> left
RUNNING, the worker exits 75 and the requeued worker resumes that trial (same number, same folder, --resume
auto); SIGTERM, SIGUSR1 (Slurm) or Ctrl-C to a worker stop its trial that way too, the signal passed on to
the trial's training processes. A trial whose worker is gone for good (SIGKILL, a lost node: Slurm no longer
knows its job, or its process no longer exists on this host) is resumed the same way by the next worker that
starts, which claims it first with a file only one worker can create: its epochs so far are kept, and it never
runs twice (a worker's training processes watch it: if it dies alone, they stop at a checkpoint, and the worker
that claims the trial waits for them).
"""

import argparse
import contextlib
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train import preemption, run_dir, study
from train.config import build_parser, parse_config
from train.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, UsageError, report_usage_error
from train.failpoints import failpoint
from train.sweep_config import load_sweep

STOP_GRACE = 120  # seconds a dead worker's training gets to stop at a checkpoint before the next worker kills it


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

def owner() -> dict:
    """Who runs a trial: enough for another worker to tell whether that worker is still alive."""
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = f"{slurm}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if slurm else os.environ.get("SLURM_JOB_ID", "")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": task,
            "slot": os.environ.get("CIFAR_SWEEP_SLOT", "0")}


def is_alive(who: dict) -> bool:
    """Whether a trial's owner may still be running: its Slurm job is still queued or running (requeued jobs
    are), or, without Slurm, its process still exists on this host. Another host's process cannot be checked.
    Slurm's answer is an empty queue for a job that ended, "Invalid job id" once it is forgotten; anything else
    (the controller unreachable or busy) is no answer, and no answer is no proof."""
    if who.get("slurm"):
        try:
            queue = subprocess.run(["squeue", "-h", "-j", who["slurm"], "-o", "%T"], capture_output=True,
                                   text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return True
        if queue.returncode:
            return "Invalid job id" not in queue.stderr
        return bool(queue.stdout.split())
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


def is_me(who: dict) -> bool:
    """Whether a trial's owner is this worker: under Slurm, its array task and slot (a requeued attempt too);
    else this process on this host."""
    me = owner()
    if me["slurm"]:
        return mine(who)
    return (who.get("host"), who.get("pid")) == (me["host"], me["pid"])


def ran_here(trials) -> int:
    """The trials this worker ran to an end (complete, pruned or failed): what --run-cap counts."""
    done = ("COMPLETE", "PRUNED", "FAIL")
    return sum(t.state.name in done and counted(t) and is_me(t.user_attrs.get("owner") or {}) for t in trials)


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


def orphan(folder: Path, trials):
    """(trial, why, its dead worker or None) of the RUNNING trial this worker continues, or None: its own, left
    when it was preempted, or one whose worker is gone for good, resumed from its last checkpoint (same number,
    same folder) by whichever worker claims it. One at a time: a claimed trial is this worker's to run."""
    optuna = study._optuna()
    for t in trials:
        who = t.user_attrs.get("owner")
        if t.state != optuna.trial.TrialState.RUNNING or not who:
            continue
        if mine(who):
            return t, "this worker was preempted", None
        if not is_alive(who) and claim(folder, t, who):
            slurm = f", {who['slurm']}" if who["slurm"] else ""
            return t, f"its worker ({who['host']}, pid {who['pid']}{slurm}) is gone", who
    return None


def wait_for_training(who: dict, number: int) -> None:
    """A dead worker's training processes on this host stop at a checkpoint by themselves (they watch their
    worker, train/preemption.py): wait for them, and for a trial process still starting up, so that the trial
    never trains twice at once; kill what is left after STOP_GRACE seconds."""
    dirs = local_pid_dirs(who)
    if not dirs:
        return
    live, deadline = _all_pids(dirs), time.monotonic() + STOP_GRACE
    if live:
        print(f"trial {number}: waiting for its training processes (pid {', '.join(map(str, live))}) to stop at a "
              f"checkpoint", flush=True)
    while live and time.monotonic() < deadline:
        time.sleep(0.5)
        live = _all_pids(dirs)
    if live:
        print(f"trial {number}: pid {', '.join(map(str, live))} did not stop within {STOP_GRACE} s; killing them",
              flush=True)
        sessions = {pid for d in dirs for pid in _sessions(d)}
        for pid in live:
            with contextlib.suppress(OSError):
                (os.killpg if pid in sessions else os.kill)(pid, signal.SIGKILL)
        while _all_pids(dirs) and time.monotonic() < deadline + 30:
            time.sleep(0.5)  # gone, and their GPU memory with them, before the trial starts again
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def local_pid_dirs(who: dict) -> list:
    """The pid folders, on this host, of an owner's trial processes and of those its owner was still waiting
    for (a worker killed during that wait passes it on to the next); none for another host's owner."""
    if who.get("host") != socket.gethostname():
        return []
    return [d for d in map(Path, filter(None, (who.get("pids"), *who.get("waits", ())))) if d.is_dir()]


def next_trial(s, sweep, seed: int):
    """(trial, options) to run next, or None when run_cap trials are counted or the grid is exhausted."""
    optuna = study._optuna()
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
        if preempted or (code and preemption.requested()):
            # Left RUNNING: this worker's requeued job resumes it, or whichever worker finds it orphaned.
            how = "with a checkpoint" if preempted else f"before its checkpoint (exit status {code})"
            print(f"trial {trial.number}: stopped {how}; the requeued worker, or the next one, resumes it",
                  flush=True)
            return EXIT_PREEMPTED
        if code == 0:
            finished(s, trial, out, sweep)
            failures = 0
            continue
        failures += 1
        if failed(s, trial, code, last_error or f"exit status {code}", failures, args.max_failures):
            return 1


def pick_trial(s, sweep, folder: Path, seed: int):
    """(trial, options, run folder, pid folder) this worker runs next, its owner recorded, or None when there is
    none: a RUNNING trial it continues (its own, preempted, or an orphan whose training it first waits for),
    else a new one from the study."""
    optuna = study._optuna()
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


def failed(s, trial, code: int, reason: str, failures: int, max_failures: int) -> bool:
    """Tell the study a trial failed; bad input (exit 2) stops the sweep; whether this worker stops too (its
    failures in a row reached --max-failures)."""
    trial.set_user_attr("fail_reason", reason)
    _tell(s, trial, state=study._optuna().trial.TrialState.FAIL)
    if code == EXIT_USAGE:
        raise UsageError(f"trial {trial.number} stopped on bad input, which every trial would repeat: {reason}")
    kind = "diverged" if code == EXIT_DIVERGED else "failed"
    print(f"trial {trial.number}: {kind} ({reason}); the worker goes on", flush=True)
    if failures < max_failures:
        return False
    print(f"error: {failures} trials in a row failed, the last: {reason}; this worker stops", file=sys.stderr,
          flush=True)
    return True


def finished(s, trial, out: Path, sweep) -> None:
    """Tell the study how a trial that ran to its end did: pruned, or its best epoch's metric."""
    optuna = study._optuna()
    summary = run_dir.read_summary(out)
    trial.set_user_attr("test_acc", summary["test_acc"])
    trial.set_user_attr("test_f1_macro", summary["test_f1_macro"])
    if summary.get("pruned_at_epoch"):
        _tell(s, trial, state=optuna.trial.TrialState.PRUNED)
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


def run_trial(command: list, out: Path, pid_dir: Path) -> tuple:
    """Run a trial's training, its output passed through as it comes, and a stop signal this worker receives
    passed on to its training processes (they register their pids in pid_dir, as under slurm/common.sh, and
    stop at a checkpoint by themselves should this worker die); (exit status, its last error line, whether it
    stopped with a checkpoint for preemption: its PREEMPTED marker)."""
    signalled = set()
    env = {**os.environ, preemption.PID_DIR_ENV: str(pid_dir), preemption.STOP_WITH_ENV: preemption.this_process()}
    # stderr to a file, not a pipe: a training whose worker died must still be able to write while it stops.
    with open(pid_dir / "stderr", "w") as err, \
            subprocess.Popen(command, stderr=err, start_new_session=True, env=env) as proc:  # Ctrl-C: ours
        (pid_dir / f"session-{proc.pid}").touch()  # known before its processes register, for wait_for_training
        tail = _Tail(pid_dir / "stderr")
        while proc.poll() is None or _trial_pids(pid_dir):  # a launcher killed by the same SIGTERM goes first
            _forward(pid_dir, signalled)
            tail.read()
            time.sleep(0.2)
        tail.read(final=True)
    shutil.rmtree(pid_dir, ignore_errors=True)
    return proc.returncode, tail.last_error, (out / run_dir.MARKER).exists()  # train/main.py clears it at start


class _Tail:
    """A growing file's new lines, passed on to this process's stderr; the last "error: " line kept."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending, self.last_error = path, 0, b"", ""

    def read(self, final: bool = False) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            self.pending += f.read()
            self.offset = f.tell()
        *lines, self.pending = self.pending.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
        for line in (raw.decode(errors="replace") for raw in lines):
            with contextlib.suppress(OSError, ValueError):  # this worker's own stderr broken: go on forwarding
                sys.stderr.write(line + "\n")
            if line.startswith("error: "):
                self.last_error = line[len("error: "):].strip()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def _all_pids(dirs: list) -> list:
    """The live processes of the trials whose pid folders are `dirs`, their first processes included."""
    return sorted({pid for d in dirs for pid in _trial_pids(d, session=True)})


def _trial_pids(pid_dir: Path, session: bool = False) -> list:
    """The trial's live training processes: the pids registered in its folder (by train/preemption.py), each
    still the process that wrote it (created before its file; a reused pid is younger), possibly orphaned by a
    launcher that died first; with `session`, also the trial's first process (train/main.py or its launcher,
    the leader of the trial's session), which registers nothing."""
    import psutil  # Accelerate's dependency

    live = []
    for file in pid_dir.iterdir() if pid_dir.is_dir() else ():
        try:
            p = psutil.Process(int(file.name.removeprefix("session-") if session else file.name))
            if p.create_time() <= file.stat().st_mtime + 1 and p.status() != psutil.STATUS_ZOMBIE:
                live.append(p.pid)
        except (ValueError, OSError, psutil.Error):
            continue  # not a pid, gone, or its file removed as it exited
    return sorted(set(live))


def _sessions(pid_dir: Path) -> set:
    return {int(f.name.removeprefix("session-")) for f in pid_dir.glob("session-*")}


def _forward(pid_dir: Path, signalled: set) -> None:
    """Pass the signal this worker received on to each training process, once (INT as TERM: the training
    checkpoints on TERM); a process that registers later gets it then."""
    name = preemption.signalled()
    if not name:
        return
    sig = signal.SIGTERM if name == "SIGINT" else signal.Signals[name]
    for pid in _trial_pids(pid_dir):
        if pid not in signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            signalled.add(pid)


def study_line(s) -> str:
    states = {}
    for t in s.get_trials(deepcopy=False):
        if counted(t):
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"


# ---- several workers --------------------------------------------------------------------------

def start_workers(args, argv: list, folder: Path) -> int:
    """--workers N: N worker processes on this machine, one GPU per --workers-per-gpu of them, the CPUs shared.
    A stop signal (Ctrl-C too) is passed on to every worker, and each stops its trial at a checkpoint."""
    threads = max(1, len(os.sched_getaffinity(0)) // (args.workers * args.processes_per_trial))
    procs = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM if signum == signal.SIGINT else signum)
    for sig in (*preemption.SIGNALS, signal.SIGINT):
        signal.signal(sig, forward)
    for i, gpus in enumerate(worker_gpus(_gpus(), args.workers, args.workers_per_gpu, args.processes_per_trial)):
        env = {"OMP_NUM_THREADS": str(threads), **os.environ, "CIFAR_SWEEP_SLOT": str(i),
               preemption.STOP_WITH_ENV: preemption.this_process()}  # a worker stops should this process die
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus
            print(f"worker {i}: GPU {gpus}", flush=True)
        command = [sys.executable, "-m", "train.sweep", *_without_storage(argv), "--workers", "1", "--sweep-dir",
                   str(folder)]
        procs.append(subprocess.Popen(command, env=env, start_new_session=True))  # Ctrl-C: ours to pass on
    codes = [p.wait() for p in procs]
    # Bad input stops the sweep; a preempted worker's job is requeued (slurm/sweep.sh); else the first failure.
    return next((c for c in (EXIT_USAGE, EXIT_PREEMPTED) if c in codes), next((c for c in codes if c), 0))


def _without_storage(argv: list) -> list:
    """The command line less --storage URL: the workers get it in the environment, out of `ps` (a password)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--storage" and not arg.startswith("--storage="):
            kept.append(arg)
        skip = arg == "--storage"
    return kept


def worker_gpus(gpus: list, workers: int, per_gpu: int, per_trial: int) -> list:
    """Each worker's CUDA_VISIBLE_DEVICES ("" without GPUs): per_gpu workers share each group of per_trial
    GPUs, groups in order, around again when there are more workers than groups."""
    if not gpus:
        return [""] * workers
    return [",".join(gpus[((i // per_gpu) * per_trial + k) % len(gpus)] for k in range(per_trial))
            for i in range(workers)]


def default_workers(args) -> int:
    """One worker per GPU (per --processes-per-trial GPUs), times --workers-per-gpu; one GPU-less one on CPU."""
    return max(1, len(_gpus()) // args.processes_per_trial) * args.workers_per_gpu


def _gpus() -> list:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


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
        study._optuna()
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
