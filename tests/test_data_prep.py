"""Data preparation under DDP: each node's local main process first, the others waiting at most --dist-timeout."""

import pytest

from conftest import FAST, check, read_summary, run_main

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
SHORT = [*FAST, "--epochs", "1", "--limit-batches", "2"]


def test_preparation_slower_than_the_timeout_is_a_clear_error(dataset_dir, tmp_path):
    proc = run_main(["--dataset", str(dataset_dir), "--output-dir", str(tmp_path / "run"), *SHORT,
                     "--dist-timeout", "3"], processes=2, env={"CIFAR_ACCELERATE_DELAY": "data_prep:10"})
    assert proc.returncode != 0
    assert ("error: process 1 waited more than --dist-timeout 3 s for the others preparing the data; "
            "raise --dist-timeout") in proc.stderr.splitlines()
    assert "Timed out waiting" not in proc.stderr  # gloo's own message stays inside the traceback we replace


def test_waiting_ranks_outlast_a_slow_preparation_within_the_timeout(dataset_dir, tmp_path):
    run = tmp_path / "run"
    check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(run), *SHORT, "--dist-timeout", "60"],
                   processes=2, env={"CIFAR_ACCELERATE_DELAY": "data_prep:5"}))
    assert read_summary(run)["world_size"] == 2
