"""A non-finite loss stops the run with one line and its own exit status, keeps the last checkpoint, writes no
non-finite number anywhere, and `--resume auto` with a lower --lr continues from that checkpoint."""

import json

import pytest

from conftest import FAST, assert_resumed, assert_same_run, check, main_in_process, run_main

pytestmark = pytest.mark.slow
EXIT_DIVERGED = 3


def strict_json_files(run) -> list:
    """Every JSON file of the run folder parsed by a strict parser (NaN, Infinity are not JSON)."""
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    parsed = []
    for path in [*run.rglob("*.json"), *run.rglob("*.jsonl")]:
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        parsed += [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]
    return parsed


def test_divergence_stops_and_a_lower_lr_resumes_from_the_last_checkpoint(dataset_dir, resume_reference, tmp_path):
    out = tmp_path / "run"
    base = ["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--resume", "auto"]
    check(main_in_process([*base, "--checkpoint-every-steps", "3", "--max-steps", "8"]))  # epoch 1, lr 0.02
    before = sorted(p.name for p in (out / "checkpoints").iterdir())

    diverged = main_in_process([*base, "--lr", "1e6"])  # epoch 2 blows up
    assert diverged.returncode == EXIT_DIVERGED, diverged.stderr[-2000:]
    assert "continuing with --lr 1000000.0" in diverged.stdout  # not the lr the checkpoint's schedule restored
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in diverged.stderr
    assert "the loss was not finite at optimizer step" in errors[0] and "(epoch 2, lr " in errors[0]
    assert "--lr" in errors[0] and "--clip-grad-norm" in errors[0] and "bf16" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing written after step 8
    records = [r for r in strict_json_files(out) if "epoch" in r and "train_loss" in r]
    assert [r["epoch"] for r in records] == [1]  # no record of the diverged epoch

    resumed = check(main_in_process([*base, "--checkpoint-every-steps", "3"]))  # back to lr 0.02
    assert assert_resumed(resumed, 24) == ("e0001-b000000-step00000008", 8)
    assert "continuing with --lr" not in resumed.stdout  # that checkpoint was trained with lr 0.02
    strict_json_files(out)
    assert_same_run(out, resume_reference)


@pytest.mark.ddp
def test_every_rank_stops_together(dataset_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), *FAST, "--lr", "1e6"], processes=2,
                    timeout=300)
    assert proc.returncode != 0 and not (out / "summary.json").exists()
    assert proc.stderr.count("error: training diverged") == 1, proc.stderr[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    strict_json_files(out)
