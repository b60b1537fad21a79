"""A stalled run named, its stacks kept, and the allocation given back.

Every training process says what it is doing with `mark(phase, step)`: a tuple assigned in Python, nothing read
from the device, so a step gains no host synchronisation. A background thread (`Watch`) publishes that record every
`interval` seconds as a heartbeat, and decides whether the run still moves:
- its own process: no progress for longer than its phase's limit (`limit`);
- the next running rank: heartbeats that stopped (frozen, or its node is gone), or, on the same host, a process
  that is gone (killed, out of memory);
- when one of those looks wrong, `judge` reads every rank's heartbeat and names the ranks that are behind: those not
  waiting inside a collective (a rank's main-thread stack tells), else those at the earliest point of the step.

The heartbeats travel on the rendezvous store that `accelerate launch` (torchrun) already runs at MASTER_ADDR:
MASTER_PORT, held by the launcher of machine rank 0, over a TCP connection of their own. That store answers while
every collective hangs, reaches every node, and needs no shared filesystem; the gloo side group would not do: its
collectives wait for the very rank that stalled. One process has no store: it watches itself.

On a stall the first process to see it (a counter on the store decides) writes stall.json and the STALLED marker in
the run folder and prints one line; every process that can dumps its threads' stacks (stall-rank<R>.txt) and, under
NCCL, torch's flight recorder, then exits with errors.EXIT_STALLED, long before --dist-timeout and torch's watchdog.
Checkpoints are written under a temporary name and renamed (train/checkpoint.py): the newest complete one stays, and
--resume auto continues from it exactly.
"""

import atexit
import faulthandler
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

from train import preemption, run_dir
from train.errors import EXIT_STALLED, first_line
from train.files import atomic_write, dumps

DATA, SETUP, FETCH, STEP, EXCHANGE = "data preparation", "setting up", "fetching a batch", "training step", "exchange"
VALIDATION, CHECKPOINT, WANDB, TEST, REPORT, END = ("validation", "checkpoint write", "W&B", "test", "report",
                                                    "end-of-run barrier")
# Where in a step or an epoch a phase lies: of ranks that all wait, the one at the earliest point is behind.
ORDER = {p: i for i, p in enumerate((DATA, SETUP, FETCH, STEP, EXCHANGE, VALIDATION, CHECKPOINT, WANDB, TEST,
                                     REPORT, END))}
# Phases that are long in healthy runs (a checkpoint to NFS, a W&B upload, loading a checkpoint, plots) get twice
# --stall-timeout; so does the first time a rank is in any phase (the first compiled step, cuDNN autotuning, the
# first validation's compile). Data preparation has none here: every process waits for it at most --dist-timeout,
# and process 0 then names the processes missing (runner.wait_for_peers).
LONG = {SETUP, CHECKPOINT, WANDB, REPORT}
UNLIMITED = {DATA}
SAME_STEP_LIMIT = 2  # a run that stalls this many times at one step is not retried (slurm/common.sh, train/sweep.py)
NCCL_ENV = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}  # FR: torch's flight recorder


class Now(NamedTuple):
    """What the main thread is doing: the phase, the optimizer step, when it last made progress (monotonic), how
    many units of progress (batches) it made in the phase, and whether this is the first time in this phase."""

    phase: str
    step: int
    since: float
    count: int
    first: bool


_now = Now(DATA, 0, time.monotonic(), 0, True)
_seen = {DATA}
_watch = None


def mark(phase: str, step: int | None = None) -> None:
    """The main thread enters `phase` (at optimizer step `step`, else the last one known): progress."""
    global _now
    first = phase not in _seen
    if first:
        _seen.add(phase)
    _now = Now(phase, _now.step if step is None else step, time.monotonic(), 0, first)


def tick() -> None:
    """Progress within the current phase (a validation batch, a figure written)."""
    global _now
    _now = _now._replace(since=time.monotonic(), count=_now.count + 1)


def limit(phase: str, first: bool, timeout: float) -> float | None:
    """Seconds a rank may spend in `phase` without progress before the run counts as stalled (None: no limit)."""
    if not timeout or phase in UNLIMITED:
        return None
    return timeout * (2 if phase in LONG or first else 1)


def overdue(beat: dict, timeout: float) -> bool:
    most = limit(beat["phase"], beat["first"], timeout)
    return most is not None and beat["seconds"] > most


class Verdict(NamedTuple):
    behind: list  # ranks
    why: dict  # rank -> "gone" | "silent" | "overdue" | "waiting"


def judge(beats: dict, timeout: float, lost: dict | None = None) -> Verdict | None:
    """Whether the run is stalled, from every rank's heartbeat ({rank: beat}) and the ranks known to be gone or
    silent ({rank: "gone" | "silent"}); None while it moves (a rank waiting for a peer that works within its limit)."""
    if lost:
        return Verdict(sorted(lost), dict(lost))
    running = {r: b for r, b in beats.items() if b["state"] == "running"}
    working = [r for r, b in running.items() if not b["waiting"]]
    late = [r for r in working if overdue(running[r], timeout)]
    if late:
        return Verdict(late, {r: "overdue" for r in late})
    if running and all(b["waiting"] and overdue(b, timeout) for b in running.values()):
        first = min(_position(b) for b in running.values())
        behind = [r for r, b in sorted(running.items()) if _position(b) == first]
        return Verdict(behind, {r: "waiting" for r in behind})
    return None


def _position(beat: dict) -> tuple:
    return beat["step"], ORDER.get(beat["phase"], 0)


def describe(rank: int, beat: dict, why: str) -> str:
    """One rank of the stall line: who, where, and what it did last."""
    who = f"rank {rank} ({beat['host']}, pid {beat['pid']})"
    where = f"'{beat['phase']}' at step {beat['step']}"
    if why == "gone":
        return f"{who} is gone (killed, or out of memory), last seen in {where}"
    if why == "silent":
        return (f"{who} has sent no heartbeat for {beat['seconds']:.0f} s (frozen, or its node is gone), last seen in "
                f"{where}")
    if why == "waiting":
        return f"{who} has waited for the others for {beat['seconds']:.0f} s in {where}"
    return f"{who} has been in {where} for {beat['seconds']:.0f} s"


def stall_line(verdict: Verdict, beats: dict, out: Path) -> str:
    step = max((b["step"] for b in beats.values()), default=0)
    seconds = max((beats[r]["seconds"] for r in verdict.behind if r in beats), default=0)
    ranks = "; ".join(describe(r, beats[r], verdict.why[r]) for r in verdict.behind if r in beats)
    if all(w == "waiting" for w in verdict.why.values()) and len(verdict.behind) == len(beats) > 1:
        ranks = f"every rank waits for the others (a network or collective fault?): {ranks}"
    lost = all(w in ("gone", "silent") for w in verdict.why.values())
    head = f"stalled at step {step}" if lost else f"no progress for {seconds:.0f} s at step {step}"
    return f"error: {head}: {ranks}; stacks in {out}/stall-rank*.txt; continue with --resume auto"


def record(out: Path, verdict: Verdict, beats: dict, line: str, timeout: float) -> int:
    """Write stall.json (every rank's last heartbeat, who is behind, the earlier stalls of this run) and the
    STALLED marker; return how many times the run has now stalled at this step."""
    earlier = earlier_stalls(out)
    step = max(b["step"] for b in beats.values())
    same = 1 + sum(e["step"] == step for e in earlier)
    report = {"step": step, "behind": verdict.behind, "why": {str(r): w for r, w in verdict.why.items()},
              "line": line, "attempt": preemption.attempt(), "stall_timeout": timeout, "same_step": same,
              "ranks": [beats[r] for r in sorted(beats)], "earlier": earlier}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / run_dir.STALL_REPORT, lambda tmp: tmp.write_text(dumps(report, indent=1) + "\n"))
    (out / run_dir.STALL_MARKER).write_text(f"stalled at step {step} ({same} time{'s' if same > 1 else ''} at this "
                                            f"step); {preemption.attempt()}\n")
    return same


def earlier_stalls(out: Path) -> list:
    """This run's stalls, oldest first ({step, behind, line, attempt}), from stall.json; [] if it never stalled."""
    try:
        report = json.loads((out / run_dir.STALL_REPORT).read_text())
        return report.get("earlier", []) + [{k: report[k] for k in ("step", "behind", "line", "attempt")}]
    except (OSError, ValueError, KeyError):
        return []


def stalled(out: Path) -> int:
    """How many times the run has stalled at the step where this attempt stalled (its STALLED marker, which the
    next attempt clears; slurm/common.sh reads the marker's words); 0 if this attempt did not stall."""
    if not (out / run_dir.STALL_MARKER).is_file():
        return 0
    try:
        return int(json.loads((out / run_dir.STALL_REPORT).read_text())["same_step"])
    except (OSError, ValueError, KeyError):
        return 1


def record_nccl() -> None:
    """Switch on torch's NCCL flight recorder, and its dump on a timeout (read when the process group starts)."""
    for name, value in NCCL_ENV.items():
        os.environ.setdefault(name, value)


def _waiting(frame, several: bool) -> bool:
    """Whether a main-thread stack is inside a collective, waiting for the other processes."""
    while frame is not None and several:
        code = frame.f_code
        collective = "/torch/distributed/" in code.co_filename
        loop_gather = code.co_name in ("_exchange", "_gathered") and code.co_filename.endswith(
            os.path.join("train", "loop.py"))
        backward = code.co_name == "_engine_run_backward"  # under DDP a backward waits for its gradient all-reduces
        if collective or loop_gather or backward:
            return True
        frame = frame.f_back
    return False


def _alive(pid: int) -> bool:
    import psutil  # Accelerate's dependency

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Watch(threading.Thread):
    """The heartbeat thread of one process: publishes its record, watches itself and the next rank, and on a stall
    reports it (the first to see it), dumps its stacks and leaves."""

    def __init__(self, out: Path, timeout: float, rank: int, world: int, store=None, backend: str = ""):
        super().__init__(name="stall-watch", daemon=True)
        self.out, self.timeout, self.rank, self.world = out, timeout, rank, world
        self.store, self.backend = store, backend
        self.interval = max(0.2, min(5.0, timeout / 10))
        self.silent_after = min(timeout, 60.0)  # 12 missed beats at the default: not a scheduling hiccup
        self.host, self.pid, self.beats, self.main = socket.gethostname(), os.getpid(), 0, threading.main_thread().ident
        self.prefix = f"cifar-accelerate/stall/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
                      f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.state, self.done, self.lock, self.left = "running", threading.Event(), threading.Lock(), False
        self.seen = {}  # rank -> (its beat counter, monotonic time it last changed)
        self.on_stall = None  # called as this process leaves on a stall (the W&B run notes it)
        self.store_failing_since = None

    # -- this process
    def beat(self) -> dict:
        now, frame = _now, sys._current_frames().get(self.main)
        self.beats += 1
        return {"rank": self.rank, "host": os.environ.get("SLURMD_NODENAME") or self.host, "hostname": self.host,
                "pid": self.pid, "phase": now.phase, "step": now.step,
                "seconds": round(time.monotonic() - now.since, 1),
                "first": now.first, "waiting": _waiting(frame, self.world > 1), "state": self.state, "beat": self.beats}

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.check(self.beat())
                self.store_failing_since = None
            except (RuntimeError, OSError):  # the store did not answer (torch's DistStoreError is a RuntimeError)
                self.store_failing()
            except Exception as e:  # a bug here must never be what stops a healthy run
                print(f"warning: the stall watch stopped ({first_line(e)})", file=sys.stderr, flush=True)
                return

    def check(self, mine: dict) -> None:
        if self.store is not None:
            self.publish(mine)
        verdict = judge(self.everyone(mine), self.timeout) if overdue(mine, self.timeout) else None
        if verdict is None and self.store is not None:
            verdict = self.watch_next()
        if verdict is not None:
            self.declare(verdict)

    # -- the store
    def key(self, name) -> str:
        return self.prefix + str(name)

    def publish(self, mine: dict) -> None:
        """Publish this beat, and follow a stall another process declared."""
        self.store.set(self.key(f"beat/{self.rank}"), json.dumps(mine))
        if self.store.check([self.key("stall")]):
            self.leave(None, first=False)

    def store_failing(self) -> None:
        """The store has not answered: once for longer than `silent_after`, the node that keeps it is gone."""
        self.store_failing_since = self.store_failing_since or time.monotonic()
        if time.monotonic() - self.store_failing_since > self.silent_after:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            self.leave(f"error: the rendezvous store at {where} "
                       f"(kept by machine rank 0's launcher) has not answered for {self.silent_after:.0f} s: that node "
                       f"is gone or unreachable; continue with --resume auto", first=True)

    def read(self, rank: int) -> dict | None:
        key = self.key(f"beat/{rank}")
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def everyone(self, mine: dict) -> dict:
        if self.store is None:
            return {self.rank: mine}
        beats = {r: self.read(r) for r in range(self.world) if r != self.rank}
        return {self.rank: mine, **{r: b for r, b in beats.items() if b is not None}}

    def watch_next(self) -> Verdict | None:
        """The next running rank (ring order): gone, or silent for longer than `silent_after`."""
        for step in range(1, self.world):
            rank = (self.rank + step) % self.world
            beat, now = self.read(rank), time.monotonic()
            if beat is None or beat["beat"] != self.seen.get(rank, (None,))[0]:
                self.seen[rank] = (beat and beat["beat"], now)
            changed = self.seen[rank][1]
            if beat is not None and beat["state"] != "running":
                continue  # finished or failed on its own: the next one
            if beat is not None and beat["hostname"] == self.host and not _alive(beat["pid"]):
                return judge({}, self.timeout, {rank: "gone"})
            if beat is not None and now - changed > self.silent_after:
                return judge({}, self.timeout, {rank: "silent"})
            return None
        return None

    def peer_failed(self, wait: float | None = None) -> None:
        """A collective raised (a peer closed its connection): if a rank is gone or silent, declare the stall naming
        it (this does not return); else return, and the caller raises the error."""
        if self.store is None:
            return
        deadline = time.monotonic() + (wait if wait is not None else 3 * self.interval + 1)
        while time.monotonic() < deadline:
            verdict = self.watch_next()
            if verdict is not None:
                self.declare(verdict)
            time.sleep(self.interval / 2)

    # -- a stall
    def declare(self, verdict: Verdict) -> None:
        preemption.stand_down()  # the launcher's SIGTERM, once a first process exits, is not a preemption
        with self.lock:
            if self.left:
                return
            first = self.store is None or self.store.add(self.key("claim"), 1) == 1
            if not first:
                self.leave(None, first=False)
            beats = self.everyone(self.beat())
            for rank, why in verdict.why.items():  # a gone or silent rank's last beat, aged
                if why in ("gone", "silent") and rank in beats:
                    beats[rank]["seconds"] = round(beats[rank]["seconds"] + time.monotonic() - self.seen[rank][1], 1)
            line = stall_line(verdict, beats, self.out)
            record(self.out, verdict, beats, line, self.timeout)
            self.leave(line, first=True, expected=sum(b["state"] == "running" for b in beats.values()) -
                       sum(w in ("gone", "silent") for w in verdict.why.values()))

    def leave(self, line: str | None, first: bool, expected: int | None = None) -> None:
        """Say the line (the first process), dump this process's stacks, wait (a little) until every process that
        can has dumped its own, and exit: the launcher stops all processes once one exits."""
        self.left = True
        preemption.stand_down()
        if line:
            print(line, file=sys.stderr, flush=True)
            if self.store is not None:
                self.store.set(self.key("stall"), json.dumps({"line": line, "expected": expected}))
        self.dump()
        if self.on_stall is not None:  # bounded: W&B must not keep a stalled run from leaving
            noting = threading.Thread(target=self.on_stall, daemon=True)
            noting.start()
            noting.join(10)
        if self.store is not None:
            try:
                self.store.add(self.key("left"), 1)
                deadline = time.monotonic() + 3 * self.interval + 2
                while time.monotonic() < deadline:
                    if self.store.check([self.key("stall")]):
                        expected = json.loads(self.store.get(self.key("stall")))["expected"]
                        if expected is not None and self.store.add(self.key("left"), 0) >= expected:
                            break
                    time.sleep(0.1)
            except Exception:
                pass
        os._exit(EXIT_STALLED)

    def dump(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / f"stall-rank{self.rank}.txt", "w") as f:
                f.write(f"{json.dumps(self.beat())}\nexit status {EXIT_STALLED}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            if self.backend == "nccl":
                import torch

                trace = torch._C._distributed_c10d._dump_nccl_trace()
                (self.out / f"nccl-trace-rank{self.rank}.pkl").write_bytes(trace)
        except Exception as e:
            print(f"warning: could not keep the stacks of rank {self.rank} ({first_line(e)})", file=sys.stderr,
                  flush=True)

    def finish(self, state: str = "done") -> None:
        """This process is done (or failed on its own): it leaves the watch, and the others stop watching it."""
        if self.left or self.done.is_set():
            return
        self.done.set()
        if threading.current_thread() is not self:
            self.join(10)  # its last beat, "running", must not land after this one
        self.state = state
        if self.store is not None:
            try:
                self.store.set(self.key(f"beat/{self.rank}"), json.dumps(self.beat()))
            except Exception:
                pass


def start(out: Path, timeout: float, accelerator) -> Watch | None:
    """Start this process's watch (None with --stall-timeout 0)."""
    global _watch
    if not timeout:
        return None
    store = _store() if accelerator.num_processes > 1 else None
    backend = accelerator.state.backend or "" if accelerator.num_processes > 1 else ""
    _watch = Watch(out, timeout, accelerator.process_index, accelerator.num_processes, store, backend)
    if backend == "nccl":  # where torch's own flight-recorder dump goes, should its watchdog still come first
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(out / "nccl-trace-rank"))
    atexit.register(_watch.finish, "exited")  # an error of its own, or a normal end without finish()
    _watch.start()
    return _watch


def _store():
    """A client of the launcher's rendezvous store: a connection of its own, which no collective waits behind
    (TCPStore serialises the calls of this process's threads on it)."""
    import torch.distributed as dist

    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=30), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError) as e:  # launched without torchrun's store, or it cannot be reached
        print(f"warning: the stall watch found no rendezvous store to share heartbeats on ({first_line(e)}): each "
              f"process watches only itself", file=sys.stderr, flush=True)
        return None


def peer_failed() -> None:
    """After a collective raised: name the peer that is gone, if one is (this then does not return)."""
    if _watch is not None:
        try:
            _watch.peer_failed()
        except Exception:  # the collective's own error is the one to show
            pass
