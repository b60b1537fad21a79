"""A full, read-only or forbidden disk: one line naming the path, the previous checkpoint intact, and once
there is space again `--resume auto` continues exactly. The disk is the subject, not the process: the runs are
main() calls in this process."""

import os
import subprocess
import uuid

import pytest

from conftest import assert_resumed, assert_same_run, check, main_in_process, resume_args

pytestmark = pytest.mark.slow
EXIT_IO = 74


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_write_that_fails_for_lack_of_space(dataset_dir, resume_reference, tmp_path):
    out = tmp_path / "run"
    failed = main_in_process(resume_args(dataset_dir, out), env={"CIFAR_ACCELERATE_FAILPOINT": "enospc_during_save:3"})
    assert failed.returncode == EXIT_IO
    line = one_error_line(failed)
    assert line.startswith(f"error: could not write {out}/checkpoints/.tmp-e0001-b000000-step00000008/")
    assert "No space left on device" in line and "--resume auto" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["e0000-b000003-step00000003",
                                                                       "e0000-b000006-step00000006"]
    resumed = check(main_in_process(resume_args(dataset_dir, out)))
    assert assert_resumed(resumed, 24)[0] == "e0000-b000006-step00000006"
    assert_same_run(out, resume_reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB tmpfs: room for one ResNet-18 checkpoint (weights and momentum, ~90 MB), not for two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_a_really_full_disk_then_more_space(dataset_dir, resume_reference, small_disk):
    out = small_disk / "run"
    failed = main_in_process(resume_args(dataset_dir, out))
    assert failed.returncode == EXIT_IO
    line = one_error_line(failed)
    assert line.startswith(f"error: could not write {out}/") and "No space left" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["e0000-b000003-step00000003"]  # no half one left

    subprocess.run(["mount", "-o", "remount,size=1g", str(small_disk)], check=True)  # space freed
    resumed = check(main_in_process(resume_args(dataset_dir, out)))
    assert assert_resumed(resumed, 24)[0] == "e0000-b000003-step00000003"
    assert_same_run(out, resume_reference)
