"""A stalled run names the rank that stopped, keeps its stacks, leaves with status 124 well before --dist-timeout,
and --resume auto then finishes it exactly: real 2-process gloo runs with one rank blocked by a failpoint."""

import json
import re
import time

import pytest
from conftest import assert_resumed, assert_same_run, check, read_summary, resume_args, run_main
from test_resume import DDP_STEPS, checkpoints, verifies

from train import report, run_dir, stall
from train.errors import EXIT_STALLED
from train.sweep import Outcome, outcome

STALL = ["--stall-timeout", "5", "--dist-timeout", "300"]  # the detector, not torch's timeout, must end these runs
DELAY = "CIFAR_ACCELERATE_DELAY"


def beat(rank, phase=stall.STEP, step=6, seconds=1.0, waiting=False, state="running", first=False):
    return {"rank": rank, "host": f"node{rank}", "hostname": "h", "pid": 100 + rank, "phase": phase, "step": step,
            "seconds": seconds, "first": first, "waiting": waiting, "state": state, "beat": 3}


def test_judge_names_the_rank_that_works_past_its_limit_not_those_waiting_for_it():
    waiting = beat(0, seconds=9, waiting=True)
    assert stall.judge({0: waiting, 1: beat(1, stall.FETCH, seconds=4)}, 5) is None  # slow, within its limit
    assert stall.judge({0: waiting, 1: beat(1, stall.FETCH, seconds=6)}, 5).behind == [1]
    # a checkpoint write and a phase's first time get twice the limit; data preparation has none here
    assert stall.judge({1: beat(1, stall.CHECKPOINT, seconds=9)}, 5) is None
    assert stall.judge({1: beat(1, stall.STEP, seconds=9, first=True)}, 5) is None
    assert stall.judge({1: beat(1, stall.CHECKPOINT, seconds=11)}, 5).behind == [1]
    assert stall.judge({1: beat(1, stall.DATA, seconds=10 ** 6)}, 5) is None
    # everyone waits inside a collective: those at the earliest point of the step are behind
    verdict = stall.judge({0: beat(0, stall.EXCHANGE, seconds=7, waiting=True),
                           1: beat(1, stall.STEP, seconds=7, waiting=True)}, 5)
    assert verdict.behind == [1] and verdict.why == {1: "waiting"}
    # a rank that finished is not waited for; a gone one is named whatever the others do
    assert stall.judge({0: beat(0, seconds=60, state="done"), 1: beat(1, seconds=1)}, 5) is None
    assert stall.judge({}, 5, {1: "gone"}) == stall.Verdict([1], {1: "gone"})


def test_the_stall_line_names_who_where_and_since_when(tmp_path):
    beats = {0: beat(0, seconds=7, waiting=True), 1: beat(1, stall.CHECKPOINT, step=5, seconds=12)}
    line = stall.stall_line(stall.Verdict([1], {1: "overdue"}), beats, tmp_path)
    assert line == (f"error: no progress for 12 s at step 6: rank 1 (node1, pid 101) has been in 'checkpoint write' "
                    f"at step 5 for 12 s; stacks in {tmp_path}/stall-rank*.txt; continue with --resume auto")
    gone = stall.stall_line(stall.Verdict([1], {1: "gone"}), beats, tmp_path)
    assert gone.startswith("error: stalled at step 6: rank 1 (node1, pid 101) is gone (killed, or out of memory), "
                           "last seen in 'checkpoint write' at step 5; stacks in ")


def test_stalls_at_one_step_are_counted_and_decide_the_retry(tmp_path):
    beats = {0: beat(0, step=9), 1: beat(1, step=9)}
    assert stall.stalled(tmp_path) == 0 and stall.earlier_stalls(tmp_path) == []
    assert stall.record(tmp_path, stall.Verdict([1], {1: "overdue"}), beats, "error: a", 5) == 1
    assert (tmp_path / run_dir.STALL_MARKER).read_text().startswith("stalled at step 9 (1 time at this step); pid ")
    assert outcome(1, False, False, False, stall.stalled(tmp_path)) is Outcome.STALLED
    (tmp_path / run_dir.STALL_MARKER).unlink()  # the next attempt clears it, and stalls elsewhere, then here again
    stall.record(tmp_path, stall.Verdict([1], {1: "overdue"}), {0: beat(0, step=12)}, "error: b", 5)
    assert stall.record(tmp_path, stall.Verdict([0], {0: "overdue"}), beats, "error: c", 5) == 2
    assert outcome(1, False, False, False, stall.stalled(tmp_path)) is Outcome.STALLED_AGAIN
    assert [s["line"] for s in stall.earlier_stalls(tmp_path)] == ["error: a", "error: b", "error: c"]
    saved = json.loads((tmp_path / run_dir.STALL_REPORT).read_text())
    assert saved["behind"] == [0] and [r["rank"] for r in saved["ranks"]] == [0, 1] and saved["same_step"] == 2


def _stall_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error: no progress", "error: stalled"))]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def _stacks(out) -> dict:
    return {rank: (out / f"stall-rank{rank}.txt").read_text() for rank in (0, 1)}


@pytest.mark.slow
@pytest.mark.ddp
def test_a_rank_blocked_while_fetching_training_or_checkpointing_is_named_and_the_run_resumes_exactly(
        dataset_dir, ddp_resume_reference, tmp_path):
    """One run, blocked three times (each attempt resumes the last), then finished: the same weights and metrics as
    the uninterrupted run. 4 steps an epoch, checkpoints every 3 steps and at epoch ends."""
    out, never = tmp_path / "run", tmp_path / "never-made"
    blocks = [("fetch_batch@1#6", stall.FETCH, 4, "e0001-b000000-step00000004"),  # epoch 2's first batch
              ("before_backward@1#3", stall.STEP, 6, "e0001-b000002-step00000006"),  # step 7's backward
              ("checkpoint_write@1#2", stall.CHECKPOINT, 9, "e0002-b000000-step00000008")]  # the step-9 checkpoint
    for point, phase, step, newest in blocks:
        started = time.monotonic()
        proc = run_main(resume_args(dataset_dir, out) + STALL, processes=2, env={DELAY: f"{point}:{never}"})
        assert time.monotonic() - started < 120 and proc.returncode != 0 and not (out / "summary.json").exists()
        # both processes left with the stall status (torchrun's table of failures)
        exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", proc.stderr))
        assert exits == {"0": str(EXIT_STALLED), "1": str(EXIT_STALLED)}, proc.stderr[-3000:]
        line = _stall_line(proc)
        assert f"rank 1 (" in line and f"has been in '{phase}' at step {step}" in line and "rank 0" not in line
        saved = json.loads((out / "stall.json").read_text())
        assert saved["behind"] == [1] and saved["ranks"][1]["phase"] == phase and saved["ranks"][0]["waiting"]
        stacks = _stacks(out)
        assert "failpoints.py" in stacks[1] and "failpoints.py" not in stacks[0], stacks
        assert (out / "STALLED").read_text().startswith(f"stalled at step {step} (1 time at this step)")
        assert checkpoints(out)[-1] == newest and verifies(out, newest)
    resumed = check(run_main(resume_args(dataset_dir, out) + STALL, processes=2))
    assert assert_resumed(resumed, DDP_STEPS)[0] == blocks[-1][3]
    assert_same_run(out, ddp_resume_reference)
    assert not (out / "STALLED").exists() and len(read_summary(out)["stalls"]) == 3
    assert "**3 attempts of this run ended in a stall**" in (out / run_dir.REPORT).read_text()


@pytest.mark.slow
@pytest.mark.ddp
def test_a_rank_killed_mid_epoch_is_named_within_the_detector_s_bound(dataset_dir, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    proc = run_main(resume_args(dataset_dir, out) + STALL, processes=2,
                    env={"CIFAR_ACCELERATE_FAILPOINT": "kill_after_step@1:6"})
    assert time.monotonic() - started < 90 and proc.returncode != 0
    line = _stall_line(proc)
    assert re.search(r"rank 1 \(\S+, pid \d+\) is gone \(killed, or out of memory\), last seen in '[a-z ]+' at "
                     r"step [56]", line), line
    saved = json.loads((out / "stall.json").read_text())
    assert saved["behind"] == [1] and saved["why"] == {"1": "gone"} and (out / "stall-rank0.txt").is_file()


@pytest.mark.slow
def test_one_process_stuck_in_a_step_is_caught_the_same_way(dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_main(resume_args(dataset_dir, out) + STALL, env={DELAY: f"before_backward#5:{tmp_path}/never-made"})
    assert proc.returncode == EXIT_STALLED, proc.stderr[-3000:]
    assert "rank 0 (" in _stall_line(proc) and "has been in 'training step' at step 4" in _stall_line(proc)
    assert "failpoints.py" in (out / "stall-rank0.txt").read_text()


def test_report_md_says_which_attempts_ended_in_a_stall():
    stalls = [{"attempt": "slurm job 7 restart 0", "line": "error: no progress for 612 s at step 1234: rank 3"}]
    assert report._stalls(stalls) == ["**1 attempt of this run ended in a stall** and continued from the newest "
                                      "complete checkpoint (stall.json, stall-rank*.txt):", "",
                                      "- slurm job 7 restart 0: no progress for 612 s at step 1234: rank 3", ""]
