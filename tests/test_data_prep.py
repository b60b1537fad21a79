"""Data preparation under DDP: each node's local main process first, the others waiting at most --dist-timeout;
and the end of a DDP run: every process destroys its process group."""

import subprocess

import pytest

from conftest import FAST, LAUNCH, ROOT, check, child_env, read_summary, run_main, wandb_records

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
SHORT = [*FAST, "--epochs", "1", "--limit-batches", "2"]


def test_preparation_slower_than_the_timeout_is_a_clear_error(dataset_dir, tmp_path):
    # Rank 0, the local main process, prepares the data for 10 s; rank 1 waits for it on the gloo side group.
    proc = run_main(["--dataset", str(dataset_dir), "--output-dir", str(tmp_path / "run"), *SHORT,
                     "--dist-timeout", "3"], processes=2, env={"CIFAR_ACCELERATE_DELAY": "data_prep:10"})
    assert proc.returncode != 0
    assert ("error: process 1 waited more than --dist-timeout 3 s for process 0 preparing the data; "
            "raise --dist-timeout") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "Timed out waiting" not in proc.stderr  # gloo's own message stays inside the traceback we replace
    assert "train/runner.py" not in proc.stderr  # no traceback of ours (the elastic agent still prints its own)


def test_rank_0_names_the_process_that_did_not_arrive(dataset_dir, tmp_path):
    # Rank 1 (not a local main process: it only waits, then reads the caches) is held up for 10 s before its
    # wait; rank 0 prepares the data, waits --dist-timeout on the side group's monitored barrier and names it.
    proc = run_main(["--dataset", str(dataset_dir), "--output-dir", str(tmp_path / "run"), *SHORT,
                     "--dist-timeout", "3"], processes=2, env={"CIFAR_ACCELERATE_DELAY": "data_prep@1:10"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: process 0 waited more than --dist-timeout 3 s for process 1 preparing the data; "
                    "raise --dist-timeout"], proc.stderr[-3000:]
    assert "train/runner.py" not in proc.stderr


# train.main.main() as `accelerate launch train/main.py` runs it, then what is left of the process group.
# Then the threads main() left that end once train.runner's side group is let go: gloo's, which would otherwise
# be joined (or not: std::terminate) only at interpreter exit.
# Threads end asynchronously (gloo's after their group goes, W&B's and tqdm's after the run), so each count waits
# until the number has not changed for a second: a thread that ends late is neither missed nor miscounted.
AFTER_MAIN = ("import gc, os, sys, time\nimport torch.distributed as dist\n"
              "import train.runner\nfrom train.main import main\n"
              "def settled_threads():\n"
              "    counts, deadline = [], time.monotonic() + 20\n"
              "    while time.monotonic() < deadline and (len(counts) < 10 or len(set(counts[-10:])) > 1):\n"
              "        counts.append(len(os.listdir('/proc/self/task')))\n        time.sleep(0.1)\n"
              "    return counts[-1]\n"
              "code = main(sys.argv[1:])\n"
              "print('process group after the run:', 'up' if dist.is_initialized() else 'destroyed', flush=True)\n"
              "threads = settled_threads()\n"
              "train.runner._side_group = (None, None)\ngc.collect()\n"
              "print('threads main() left to exit:', threads - settled_threads(), flush=True)\n"
              "sys.exit(code)\n")


@pytest.mark.parametrize("tracking", [["--no-wandb"], ["--wandb-mode", "offline"]], ids=["no-wandb", "wandb"])
def test_every_process_destroys_its_process_group_at_the_end(dataset_dir, tmp_path, tracking):
    """Without W&B, rank 0 also prepares the data for 5 s, within --dist-timeout: the waiting rank outlasts it."""
    driver = tmp_path / "after_main.py"
    driver.write_text(AFTER_MAIN)
    slow = ["--dist-timeout", "60"] if "--no-wandb" in tracking else []
    cmd = [*LAUNCH, "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", str(driver),
           "--dataset", str(dataset_dir), "--output-dir", str(tmp_path / "run"), *SHORT, *tracking, *slow]
    env = child_env(ACCELERATE_USE_CPU="true", WANDB_DIR=str(tmp_path / "wb"), WANDB_MODE="",
                    **({"CIFAR_ACCELERATE_DELAY": "data_prep:5"} if slow else {}))
    proc = check(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))
    assert proc.stdout.count("process group after the run: destroyed") == 2, proc.stdout[-2000:]
    assert proc.stdout.count("threads main() left to exit: 0") == 2, proc.stdout[-2000:]
    assert read_summary(tmp_path / "run")["world_size"] == 2
    if "--no-wandb" not in tracking:  # W&B's one run still ends cleanly, closed by the main process
        (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
        records = wandb_records(run)
        assert [r["exit"]["exit_code"] for r in records if r.get("type") == "exit"] == [0]
