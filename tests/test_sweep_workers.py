"""How train.sweep spreads its workers over the GPUs, and how its processes watch each other (quick: no training)."""

import argparse
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from train import preemption
from train.supervise import _without_storage, default_workers, worker_gpus


def test_workers_per_gpu_share_each_gpu_in_order():
    assert worker_gpus(["0", "1"], 4, 2, 1) == ["0", "0", "1", "1"]
    assert worker_gpus(["0", "1", "2", "3"], 2, 1, 2) == ["0,1", "2,3"]  # DDP trials over 2 GPUs each
    assert worker_gpus(["4", "7"], 3, 1, 1) == ["4", "7", "4"]  # Slurm's ids, around again
    assert worker_gpus([], 2, 1, 1) == ["", ""]


@pytest.mark.parametrize("visible,per_gpu,per_trial,expected", [
    ("0", 1, 1, 1), ("0", 3, 1, 3), ("0,1,2,3", 1, 1, 4), ("0,1,2,3", 2, 2, 4), ("", 2, 1, 2)])
def test_default_workers_are_one_per_gpu_times_workers_per_gpu(monkeypatch, visible, per_gpu, per_trial, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)  # what Slurm sets for an array task's GPUs
    args = argparse.Namespace(workers=None, workers_per_gpu=per_gpu, processes_per_trial=per_trial)
    assert default_workers(args) == expected


def test_workers_get_the_database_url_in_their_environment_not_their_command_line():
    argv = ["f.yaml", "--storage", "postgresql://u:pw@h/db", "--epochs", "3", "--storage=sqlite:///x.db", "--lr", "1"]
    assert _without_storage(argv) == ["f.yaml", "--epochs", "3", "--lr", "1"]


LISTENER = """
import time
from train import preemption
preemption.listen()
print("listening", flush=True)
deadline = time.time() + 60
while not preemption.requested() and time.time() < deadline:
    time.sleep(0.1)
print(preemption.signalled())
"""


@pytest.mark.parametrize("how", ["killed", "pid reused"])
def test_a_process_stops_as_on_sigterm_once_the_process_it_stops_with_is_gone(how):
    """What a trial's training processes do when their worker dies, and a worker when its --workers N parent
    does: real processes, the watched one SIGKILLed (or a live pid with another start time: a reused pid)."""
    import psutil

    watched = subprocess.Popen(["sleep", "60"])
    start = psutil.Process(watched.pid).create_time() + (5 if how == "pid reused" else 0)  # reused: started later
    env = {**os.environ, preemption.STOP_WITH_ENV: f"{watched.pid}:{start}"}
    listener = subprocess.Popen([sys.executable, "-c", LISTENER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline() == "listening\n"
        if how == "killed":
            # While its worker lives it keeps going: watched for a watch period and a half (it looks every second).
            # A window for a claim that nothing happens, not a wait for something to happen: load cannot fail it.
            deadline = time.time() + 1.5
            while time.time() < deadline:
                assert listener.poll() is None
                time.sleep(0.1)
            watched.kill()
            watched.wait()
        out, err = listener.communicate(timeout=30)
    finally:
        watched.kill()
    assert out.strip() == "SIGTERM", err
    assert f"the sweep process that started this one (pid {watched.pid}) is gone" in err


@pytest.mark.parametrize("code, preempted, stopping, pruned, end", [
    (0, False, False, False, "COMPLETE"),
    (0, False, False, True, "PRUNED"),
    (0, False, True, False, "COMPLETE"),  # finished before the signal came: nothing to resume
    (75, True, True, False, "PREEMPTED"),  # stopped at a checkpoint (its PREEMPTED marker)
    (1, True, False, False, "PREEMPTED"),  # `accelerate launch` reports the 75 as 1; the marker tells
    (-9, False, True, False, "PREEMPTED"),  # killed while this worker stops: resumed, not failed
    (2, False, False, False, "BAD_INPUT"),
    (3, False, False, False, "DIVERGED"),
    (1, False, False, False, "FAILED"),
    (-9, False, False, False, "FAILED"),  # killed (the OOM killer) while nobody asked it to stop
])
def test_a_trials_end_is_decided_from_its_exit_status_marker_and_the_workers_signal(code, preempted, stopping,
                                                                                   pruned, end):
    from train.sweep import Outcome, outcome

    assert outcome(code, preempted, stopping, pruned) is Outcome[end]
