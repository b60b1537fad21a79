"""The Slurm scripts against a real Slurm: tests/slurm/local_cluster.sh starts one on localhost, with two
emulated nodes (node1, node2), so multinode.sbatch runs one launcher per node as on a real cluster."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml

from conftest import RESUME_ARGS, ROOT, assert_same_run, call, child_env, read_summary, study_trials, write_sweep

# One worker runs them all (pytest-xdist's loadgroup): they share the one local cluster its fixture starts.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]
CLUSTER = ROOT / "tests" / "slurm" / "local_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Environment for sbatch/scontrol: an existing cluster (SLURM_CONF set), else a local one."""
    if os.environ.get("SLURM_CONF"):
        yield dict(os.environ)
        return
    if not all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged")):
        if os.environ.get("REQUIRE_SLURM"):  # .ci/run installs Slurm: a skip there would hide a failure
            pytest.fail("REQUIRE_SLURM is set but Slurm is not installed")
        pytest.skip("Slurm is not installed (tests/slurm/local_cluster.sh install)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=60)


@pytest.fixture
def job_env(slurm, tmp_path):
    """What the jobs see: CPU training (the GPUs are fake), runs and logs in this test's folder."""
    return child_env(SLURM_CONF=slurm["SLURM_CONF"], PROJECT_DIR=str(ROOT), RUNS_DIR=str(tmp_path / "runs"),
                     ACCELERATE_USE_CPU="true", ACCELERATE_CONFIG="")


def sbatch(env, tmp_path, script, *options, args=()) -> str:
    cmd = ["sbatch", "--parsable", "--partition=debug", "--cpus-per-task=1", "--mem=2G", "--gpus-per-node=0",
           f"--output={tmp_path}/%x-%A_%a.out", *options, str(ROOT / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def jobs(env, job_id) -> dict:
    """{job id (array tasks as ID_N): scontrol's fields} for a job or a whole array."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task = fields.get("ArrayTaskId")
        key = f"{fields['ArrayJobId']}_{task}" if task and task != "N/A" and "[" not in task else fields["JobId"]
        found[key] = fields
    return found


def wait(env, job_id, timeout=600, until=lambda js: all(j["JobState"] in TERMINAL for j in js.values())):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = jobs(env, job_id)
        if found and until(found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {jobs(env, job_id)}")


def logs(tmp_path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))


def test_sweep_sh_without_a_file_runs_the_default_sweep_file(job_env, tmp_path, dataset_dir):
    job = sbatch(job_env, tmp_path, "sweep.sh", "--array=0", args=["--check", "--dataset", str(dataset_dir)])
    (state,) = wait(job_env, job).values()
    assert state["JobState"] == "COMPLETED", logs(tmp_path)
    assert "configs/sweep-arch-lr.yaml: grid over arch, lr, batch_size, 9 combinations" in logs(tmp_path)


def test_sweep_sh_with_a_bad_sweep_file_fails_every_task_with_one_line(job_env, tmp_path, dataset_dir):
    file = write_sweep(tmp_path / "bad.yaml", method="grid", parameters={"learning_rate": {"values": [0.1]}})
    job = sbatch(job_env, tmp_path, "sweep.sh", "--array=0-1", args=[str(file), "--dataset", str(dataset_dir)])
    states = wait(job_env, job)
    assert all(s["JobState"] == "FAILED" and s["ExitCode"].startswith("2:") for s in states.values()), states
    errors = [line for line in logs(tmp_path).splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("parameter 'learning_rate' is not a train/main.py option" in e
                                    for e in errors), logs(tmp_path)


def _sweep_trials(folder) -> list:
    try:
        return study_trials(folder)
    except (KeyError, FileNotFoundError):  # no journal yet, or the first worker has not created the study yet
        return []


def test_a_trials_owner_is_alive_while_slurm_knows_its_job_and_no_answer_is_no_proof(slurm, tmp_path, monkeypatch):
    """A worker claims an orphaned trial only on Slurm's word that the owner's job ended: an empty queue, or an
    id Slurm has forgotten. A controller that does not answer (squeue fails) leaves the trial to its owner."""
    from train.trial_owner import is_alive

    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    job = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--mem=100M", f"--output={tmp_path}/%j.out",
                          "--wrap", "sleep 300"], capture_output=True, text=True, check=True).stdout.strip()
    assert is_alive({"slurm": job})
    subprocess.run(["scancel", job], check=True)
    wait(slurm, job)
    assert not is_alive({"slurm": job})
    assert not is_alive({"slurm": "99999999_1"})
    conf = Path(slurm["SLURM_CONF"]).read_text()
    unreachable = tmp_path / "slurm.conf"  # the same cluster, its controller on a port nobody listens on
    unreachable.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=16899", conf))
    monkeypatch.setenv("SLURM_CONF", str(unreachable))
    assert is_alive({"slurm": job})


def test_sweep_sh_array_searches_through_a_preemption_and_resumes_the_same_trial(job_env, tmp_path, dataset_dir):
    """2 array tasks are 2 workers of one random search; task 0 gets the time limit's USR1 mid-trial, stops it
    at a checkpoint and is requeued; the requeued task resumes that trial (same number, same folder) with the
    steps it lacked; the study ends with run_cap complete trials and none RUNNING."""
    file = write_sweep(tmp_path / "search.yaml", method="random", run_cap=3,
                       parameters={"lr": {"distribution": "log_uniform_values", "min": 0.01, "max": 0.05}})
    fixed = [a for a in RESUME_ARGS if a not in ("--resume", "auto", "--lr", "0.02")]
    job = sbatch(job_env, tmp_path, "sweep.sh", "--array=0-1",
                 args=[str(file), "--dataset", str(dataset_dir), *fixed])
    folder = tmp_path / "runs" / f"sweep-{job}"
    deadline, target = time.time() + 300, None
    while target is None:
        assert time.time() < deadline, logs(tmp_path)
        for t in _sweep_trials(folder):
            run, who = Path(t.user_attrs.get("run_folder", "-")), t.user_attrs.get("owner", {})
            if (t.state.name == "RUNNING" and who.get("slurm") == f"{job}_0"  # not set yet just after ask()
                    and list(run.glob("checkpoints/e*"))):
                target = t  # task 0's trial, with its first epoch's checkpoint: mid-trial
        time.sleep(0.2)
    _usr1(job_env, f"{job}_0")
    wait(job_env, job, until=lambda js: js[f"{job}_0"]["JobState"] == "PENDING" or js[f"{job}_0"]["JobState"]
         in TERMINAL)
    _start_requeued_now(job_env, f"{job}_0")
    states = wait(job_env, job)
    text = logs(tmp_path)
    assert all(s["JobState"] == "COMPLETED" for s in states.values()), (states, text)
    assert (states[f"{job}_0"]["Restarts"], states[f"{job}_1"]["Restarts"]) == ("1", "0"), states

    ended = [t for t in study_trials(folder) if not t.user_attrs.get("not_run")]
    assert len(ended) == 3 and all(t.state.name == "COMPLETE" for t in ended), [(t.number, t.state) for t in ended]
    assert not [t for t in study_trials(folder) if t.state.name == "RUNNING"]
    task0 = (tmp_path / f"cifar-sweep-{job}_0.out").read_text()
    before, after = task0.split("(restart 1)")
    n = target.number
    assert f"trial {n}: stopped with a checkpoint" in before and "requeueing job" in before, task0
    assert f"trial {n}: this worker was preempted; resuming it from its last checkpoint" in after, task0
    resumed = re.search(r"(\d+) optimizer steps in this attempt \(from step (\d+) to (\d+)\)", after)
    total = read_summary(Path(target.user_attrs["run_folder"]))["steps"]
    assert resumed and 0 < int(resumed[1]) < total and int(resumed[3]) == total, task0  # fewer than a fresh one
    (same,) = [t for t in ended if t.number == n]
    assert same.params == target.params and same.user_attrs["run_folder"] == target.user_attrs["run_folder"]

    proc = call("train.sweep_summary", folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "sweep_summary.md").read_text().count("| complete |") == 3


def _nodes_idle(env) -> bool:
    out = subprocess.run(["scontrol", "-o", "show", "node"], env=env, capture_output=True, text=True).stdout
    return bool(out.strip()) and all("CPUAlloc=0 " in line for line in out.splitlines())


def _start_requeued_now(env, job):
    """Requeued jobs wait ~2 minutes before they may start again; let it start now, once the old instance is gone
    everywhere. Each node revoked the old credentials as it ended the job, before the controller counted its CPUs
    free; a node refuses a credential issued in the same second as a revocation ("Job credential revoked"), so the
    new start waits for the second after the one in which every node was seen idle."""
    deadline = time.time() + 120
    while not _nodes_idle(env):
        assert time.time() < deadline, f"the nodes did not free the CPUs of job {job}: {jobs(env, job)}"
        time.sleep(0.2)
    idle_second = int(time.time())
    while int(time.time()) <= idle_second:
        time.sleep(0.05)
    # Should the update not take, the job still starts when its BeginTime comes, within the callers' waits.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)


def _checkpoint_steps(run) -> list:
    """Steps of a run's complete checkpoints (e0001-b000004-step00000012), oldest first."""
    return sorted(int(p.name.rsplit("step", 1)[1]) for p in run.glob("checkpoints/e*-step*"))


def _wait_for_a_checkpoint(run, tmp_path, after_step=-1) -> int:
    """Wait for a complete checkpoint of a step after `after_step` (training under way); returns its step."""
    deadline = time.time() + 300
    while not [step for step in _checkpoint_steps(run) if step > after_step]:
        assert time.time() < deadline, logs(tmp_path)
        time.sleep(0.05)
    return _checkpoint_steps(run)[-1]


def _usr1(env, job):  # what --signal=B:USR1@N does before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)


def _scontrol_requeue(env, job):  # what an administrator or a preempting job does: SIGTERM to every step
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)


def test_usr1_then_scontrol_requeue_each_checkpoint_requeue_and_resume_to_the_same_result(job_env, tmp_path,
                                                                                         dataset_dir, resume_reference):
    """A 1-task sweep of one trial preempted twice: the time limit's USR1 once training is under way, then, once
    the requeued attempt has resumed and written a checkpoint of its own, `scontrol requeue`. Each attempt stops at
    a checkpoint and is requeued; the third finishes the trial as an uninterrupted run would have."""
    file = write_sweep(tmp_path / "one.yaml", method="grid", parameters={"lr": {"value": 0.02}})
    fixed = [a for a in RESUME_ARGS if a not in ("--resume", "auto", "--lr", "0.02")]
    job = sbatch(job_env, tmp_path, "sweep.sh", "--array=0", args=[str(file), "--dataset", str(dataset_dir), *fixed])
    task, run = f"{job}_0", tmp_path / "runs" / f"sweep-{job}" / "trial-0000"  # lr fixed: not in the name
    newest = -1
    for preempt in (_usr1, _scontrol_requeue):
        _wait_for_a_checkpoint(run, tmp_path, after_step=newest)  # this attempt's own: it is training
        preempt(job_env, task)
        wait(job_env, job, until=lambda js: js[task]["JobState"] == "PENDING" or js[task]["JobState"] in TERMINAL)
        newest = _checkpoint_steps(run)[-1]  # the stopped attempt's last
        _start_requeued_now(job_env, task)
    (state,) = wait(job_env, job, until=lambda js: js[task]["JobState"] in TERMINAL).values()
    text = logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, text)
    first, second, third = text.split("(restart 1)")[0], *text.split("(restart 1)")[1].split("(restart 2)")
    assert "got SIGUSR1, forwarding" in first and "requeueing job" in first, first
    assert "resuming from" in second and "received SIGTERM" in second and "requeueing job" in second, second
    assert "resuming from" in third, third
    assert_same_run(run, resume_reference)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 3


def _multinode_preempted(env, tmp_path, dataset_dir, *options) -> tuple:
    """Start a 2-node run, USR1 it (as --signal=B:USR1@N does) once it has a checkpoint, wait for the requeue."""
    env = {**env, "NPROC_PER_NODE": "1"}
    job = sbatch(env, tmp_path, "multinode.sbatch", "--nodes=2", *options,
                 args=["--dataset", str(dataset_dir), *[a for a in RESUME_ARGS if a not in ("--resume", "auto")]])
    run = tmp_path / "runs" / f"cifar-multinode-{job}"
    _wait_for_a_checkpoint(run, tmp_path)
    _usr1(env, job)
    (state,) = wait(env, job, until=lambda js: js[job]["JobState"] == "PENDING" or js[job]["JobState"] in TERMINAL
                    ).values()
    assert state["JobState"] == "PENDING" and state["Restarts"] == "1", (state, logs(tmp_path))
    return env, job, run


def test_multinode_usr1_with_a_slow_checkpoint_requeues_and_resumes_exactly(job_env, tmp_path, dataset_dir,
                                                                           ddp_resume_reference):
    # The checkpoint of the preemption takes 8 s to write: the launchers on both nodes must outlive it.
    # One CPU a task: one thread a process, as the reference ran (other thread counts round differently).
    env = {**job_env, "CIFAR_ACCELERATE_DELAY": "preempted_save:8"}
    env, job, run = _multinode_preempted(env, tmp_path, dataset_dir)
    text = logs(tmp_path)
    assert "batch script on node1: got SIGUSR1, signalling the job steps" in text
    assert "node1: got SIGUSR1, forwarding" in text and "node2: got SIGUSR1, forwarding" in text
    assert text.count("received SIGUSR1: stopping after this step") == 2  # one line from each worker
    # Each node's task ends when its launcher has reported the workers' exit 75 (as 1); a launcher killed by
    # USR1 shows as 138 or 255, and its step is then ended (SIGTERM, SIGKILL 5 s later) mid-checkpoint.
    assert set(re.findall(r"task \d+: Exited with exit code (\d+)", text)) == {"1"}, text
    assert "requeueing job" in text
    assert f"; slurm job {job} restart 0" in (run / "PREEMPTED").read_text()
    _start_requeued_now(env, job)
    (state,) = wait(env, job).values()
    text = logs(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, text)
    assert "resuming from" in text and "starting fresh" not in text.split("restart 1")[-1]
    assert_same_run(run, ddp_resume_reference)


def test_multinode_failure_after_preemption_is_not_requeued_again(job_env, tmp_path, dataset_dir):
    """Also what multinode.sbatch starts: one launcher per node, with the task's CPUs."""
    # The requeued attempt fails in the launcher, before train/main.py runs (a bad node, an import error):
    # the first attempt's PREEMPTED marker must not requeue it again, and again, ...
    python = tmp_path / "python-failing-after-requeue"
    python.write_text(f"""#!/bin/bash
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "launcher failure on $SLURMD_NODENAME" >&2; exit 1; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env, job, run = _multinode_preempted({**job_env, "PYTHON": str(python)}, tmp_path, dataset_dir,
                                         "--cpus-per-task=2")
    text = logs(tmp_path)  # the first attempt: one launcher per node, each process with both CPUs
    port = 15000 + int(job) % 15000  # below Linux's ephemeral ports (32768-60999)
    for rank, host in ((0, "true"), (1, "false")):  # machine rank 0 hosts the rendezvous store, explicitly
        assert (f"--machine_rank {rank} --main_process_ip node1 --main_process_port {port} --rdzv_backend c10d "
                f"--rdzv_conf is_host={host}") in text
    # srun does not inherit --cpus-per-task since Slurm 22.05: the step must still get both CPUs, and
    # its one process per node both threads.
    environment = yaml.safe_load((run / "config.yaml").read_text())["environment"]
    assert environment["cpus"] == 2 and environment["torch_threads"] == 2 and environment["world_size"] == 2, \
        environment
    _start_requeued_now(env, job)
    (state,) = wait(env, job).values()
    text = logs(tmp_path)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", (state, text)
    assert "launcher failure on node1" in text and "removing" in text and "of an earlier attempt" in text
    # Status 1 (the launcher's own), or 143 when srun terminated the other node's task first: either way no requeue.
    assert re.search(rf"not requeueing job {job}: the training exited with status (1|143) without a checkpoint", text)
    # FAILED is final: a requeue is the batch script's own `scontrol requeue`, before it exits, and would have left
    # the job PENDING with Restarts 2 instead.


@pytest.mark.parametrize("entry, gpus", [("", 1), ("-m train.main", 2)])  # the default: the script train/main.py
def test_train_sbatch_preempted_beyond_max_requeues_stops_with_status_75(job_env, tmp_path, dataset_dir, entry, gpus):
    """Signal forwarding finds the workers under both launch forms, and every process DDP runs over the GPUs the
    job was given (two fake GPUs: two processes, gloo on the CPU); the cap on requeues holds."""
    env = {**job_env, "MAX_REQUEUES": "0", "ENTRY": entry}
    job = sbatch(env, tmp_path, "train.sbatch", f"--gpus-per-node={gpus}", f"--cpus-per-task={gpus}",
                 args=["--dataset", str(dataset_dir), *[a for a in RESUME_ARGS if a not in ("--resume", "auto")]])
    run = tmp_path / "runs" / f"cifar-train-{job}"
    _wait_for_a_checkpoint(run, tmp_path)
    _usr1(env, job)
    (state,) = wait(env, job).values()
    text = logs(tmp_path)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "75:0" and state["Restarts"] == "0", (state, text)
    assert "got SIGUSR1, forwarding to the training processes" in text and (run / "PREEMPTED").is_file()
    assert text.count("received SIGUSR1: stopping after this step") == gpus  # every process got it
    assert f"not requeueing job {job}: preempted with a checkpoint" in text and "MAX_REQUEUES=0" in text
    assert (" -m train.main " if entry else "/train/main.py ") in text  # the launch command the log shows
    assert yaml.safe_load((run / "config.yaml").read_text())["environment"]["world_size"] == gpus


def test_a_stall_on_one_node_is_named_and_the_job_stops_at_its_requeue_cap_saying_why(job_env, tmp_path, dataset_dir):
    """Heartbeats cross the nodes on the rendezvous store: rank 1 (c10d's rendezvous puts it on either node),
    blocked before its gradient all-reduce, is named with its node; both nodes leave with the stall status, and the
    job would be requeued but for MAX_REQUEUES=0."""
    env = {**job_env, "NPROC_PER_NODE": "1", "MAX_REQUEUES": "0",
           "CIFAR_ACCELERATE_DELAY": f"before_backward@1#3:{tmp_path}/never-made"}
    job = sbatch(env, tmp_path, "multinode.sbatch", "--nodes=2",
                 args=["--dataset", str(dataset_dir), *[a for a in RESUME_ARGS if a not in ("--resume", "auto")],
                       "--stall-timeout", "5"])
    (state,) = wait(env, job, timeout=300).values()
    text, run = logs(tmp_path), tmp_path / "runs" / f"cifar-multinode-{job}"
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "124:0" and state["Restarts"] == "0", (state, text)
    assert re.search(r"error: no progress for \d+ s at step 2: rank 1 \(node[12], pid \d+\) has been in 'training "
                     r"step'", text), text
    assert (f"not requeueing job {job}: stalled at step 2 (1 time at this step) (see {run}/stall.json)" in text
            and "MAX_REQUEUES=0" in text), text
    assert {p.name for p in run.glob("stall*")} == {"stall.json", "stall-rank0.txt", "stall-rank1.txt"}
