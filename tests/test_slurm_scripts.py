"""The Slurm scripts' shell functions that need no cluster (tests/test_slurm.py runs the scripts on one)."""

import subprocess

from conftest import ROOT
from train import run_dir

COMMON = ROOT / "slurm" / "common.sh"


def run_shell(script: str, path: str = "/usr/bin:/bin", **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {COMMON}; {script}"], capture_output=True, text=True,
                          env={"PATH": path, **env})


def shell(script: str, **env) -> str:
    proc = run_shell(script, **env)
    proc.check_returncode()
    return proc.stdout


def test_rendezvous_ports_stay_below_the_ephemeral_range():
    ports = [int(p) for p in shell("for j in 0 1 14999 15000 32767 99999 123456789; do main_port $j; done").split()]
    assert all(1024 <= p < 32768 for p in ports), ports  # Linux's ephemeral ports: 32768-60999


def test_the_scripts_use_the_run_folder_s_marker_name():
    for name in (run_dir.MARKER, run_dir.STALL_MARKER):
        assert f'"$run_dir/{name}"' in COMMON.read_text()


def test_threads_per_process_share_the_cpus_per_task():
    assert shell("threads_per_process", SLURM_CPUS_PER_TASK="16", NPROC_PER_NODE="4").strip() == "4"
    assert shell("threads_per_process", SLURM_CPUS_PER_TASK="2", NPROC_PER_NODE="4").strip() == "1"
    assert shell("echo $SRUN_CPUS_PER_TASK", SLURM_CPUS_PER_TASK="8").strip() == "8"  # srun steps keep them


def test_a_stall_is_requeued_once_at_a_step_and_not_when_it_repeats_there(tmp_path):
    attempt = {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"}
    marker = tmp_path / run_dir.STALL_MARKER
    marker.write_text("stalled at step 9 (1 time at this step); slurm job 5 restart 1\n")
    first = run_shell(f"requeue_if_preempted {tmp_path} 1", path="/bin", **attempt)  # no scontrol on /bin
    assert first.returncode == 0 and "stalled at step 9 (1 time at this step) (see " in first.stderr, first.stderr
    assert "requeueing job 5 (requeue 2 of at most 5)" in first.stderr
    marker.write_text("stalled at step 9 (2 times at this step); slurm job 5 restart 1\n")
    again = run_shell(f"requeue_if_preempted {tmp_path} 1", path="/bin", **attempt)
    assert again.returncode == 1 and ("not requeueing job 5: stalled at step 9 (2 times at this step): a hang that "
                                      "repeats at one step is not a one-off") in again.stderr, again.stderr
