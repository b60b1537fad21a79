"""What a person at a terminal sees and does: the live progress bar and Ctrl-C, through a real pseudo-terminal.

The command runs as a terminal's foreground job: a session of its own whose controlling terminal is the pty.
Ctrl-C is the byte 0x03 typed into the terminal: the kernel's line discipline then sends SIGINT to the whole
foreground process group, as it does for a person. What the person reads is what the pty shows.
"""

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from conftest import LAUNCH, MAIN, ROOT, assert_resumed, assert_same_run, check, child_env, main_in_process, run_main
from conftest import resume_args as args
from test_resume import DDP_STEPS, STEPS, checkpoints, verifies

from train import progress

pytestmark = pytest.mark.slow

CTRL_C = b"\x03"
# As a shell starts a job: a new session, the pty its controlling terminal (so its group is the foreground one).
JOB = "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], " \
      "sys.argv[1:])"


class Terminal:
    """A command running in a pseudo-terminal of 40x120 characters; `screen` is everything it has shown."""

    def __init__(self, cmd: list, env: dict):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master, self.chunks = master, []
        self.proc = subprocess.Popen([sys.executable, "-c", JOB, *cmd], cwd=ROOT, env=env, stdin=slave, stdout=slave,
                                     stderr=slave, close_fds=True)
        os.close(slave)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the terminal has gone
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    @property
    def screen(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def press_ctrl_c(self):
        os.write(self.master, CTRL_C)

    def wait_for(self, condition, what: str, timeout=300):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.screen[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{self.screen[-3000:]}"
            time.sleep(0.05)

    def end(self, timeout=120) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        os.close(self.master)
        return code


def training_under_way(out):
    return lambda: (out / "checkpoints").is_dir() and any(p.name.startswith("e") for p in
                                                          (out / "checkpoints").iterdir())


def interrupted_at(term: Terminal, out) -> int:
    """The step the one 'interrupted' line names, after checking what the person read and what is on disk."""
    screen = term.screen
    assert "received SIGINT: stopping after this step to write a checkpoint; Ctrl-C again to stop at once" in screen
    said = re.findall(r"interrupted: checkpoint written at step (\d+); continue with --resume auto --output-dir "
                      + re.escape(str(out)), screen)
    assert len(said) == 1, screen[-3000:]
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen[-5000:]
    step = int(said[0])
    assert checkpoints(out)[-1].endswith(f"step{step:08d}") and verifies(out, checkpoints(out)[-1])
    assert (out / "PREEMPTED").read_text().startswith(f"SIGINT at step {step};")
    return step


def test_accelerate_launch_shows_a_live_bar_and_ctrl_c_keeps_the_work(dataset_dir, resume_reference, tmp_path):
    """`accelerate launch` (Accelerate >= 1.16) pipes its child's stderr: the bar still reaches the person (on
    stdout). On Ctrl-C the launcher sends SIGTERM and kills its child 5 s later: the step and its checkpoint
    are done by then."""
    out = tmp_path / "run"
    term = Terminal([*LAUNCH, "--num_processes", "1", "--dynamo_backend", "no", "--mixed_precision", "no", MAIN,
                     *args(dataset_dir, out)],
                    child_env(ACCELERATE_USE_CPU="true"))
    term.wait_for(training_under_way(out), "checkpoint")
    term.press_ctrl_c()
    assert term.end() == 130  # the launcher's status after Ctrl-C; the run's own (75) is in the marker's wake
    assert re.search(r"\repoch 1/3: +\d+%\|.*\| \d+/8 \[", term.screen), term.screen[-3000:]  # tqdm's frames
    assert term.screen.splitlines()[0].startswith(f"run folder {out}: training resnet18 on cpu, 1 process, fp32")
    step = interrupted_at(term, out)
    resumed = check(main_in_process(args(dataset_dir, out)))
    assert assert_resumed(resumed, STEPS)[1] == step
    assert_same_run(out, resume_reference)


def test_a_second_ctrl_c_stops_at_once_and_the_complete_checkpoint_resumes(dataset_dir, resume_reference, tmp_path,
                                                                          monkeypatch):
    """python train/main.py: the first Ctrl-C asks for a checkpoint; the second comes while that checkpoint is
    being written (held halfway by a delay that would last 10 minutes) and ends the process then and there.
    The resume runs off a terminal: its plain lines come every PLAIN_EVERY seconds (here 0: every step)."""
    out = tmp_path / "run"
    term = Terminal([sys.executable, MAIN, *args(dataset_dir, out)],
                    child_env(CIFAR_ACCELERATE_DELAY=f"preempted_save:{tmp_path / 'never'}"))
    term.wait_for(training_under_way(out), "checkpoint")
    term.press_ctrl_c()
    term.wait_for(lambda: any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir()),
                  "checkpoint being written")
    newest = checkpoints(out)[-1]
    term.press_ctrl_c()
    assert term.end(timeout=30) == 130
    assert "Ctrl-C again to stop at once" in term.screen
    assert term.screen.rstrip().endswith("interrupted: stopping now (the newest complete checkpoint is intact: "
                                         "--resume auto continues from it)"), term.screen[-3000:]
    assert "Traceback" not in term.screen and verifies(out, newest)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    resumed = check(main_in_process(args(dataset_dir, out)))
    assert resumed.stdout.startswith(f"run folder {out}: training resnet18 on cpu, 1 process, fp32\n")
    step = assert_resumed(resumed, STEPS)[1]
    plain = re.findall(r"^epoch \d/3 step (\d+) \(batch \d/8 of the epoch\): \d+ img/s$", resumed.stdout, re.M)
    assert [int(s) for s in plain] == list(range(step + 1, STEPS + 1)), resumed.stdout
    assert_same_run(out, resume_reference)


@pytest.mark.ddp
def test_ctrl_c_stops_every_process_of_a_ddp_run_at_one_checkpoint(dataset_dir, ddp_resume_reference, tmp_path):
    """With several processes `accelerate launch` runs torchrun's agent, whose workers have sessions of their own:
    the terminal's SIGINT reaches the agent, which passes it on to them."""
    out = tmp_path / "run"
    term = Terminal([*LAUNCH, "--multi_gpu", "--num_processes", "2", "--dynamo_backend", "no", "--mixed_precision",
                     "no", MAIN, *args(dataset_dir, out)], child_env(ACCELERATE_USE_CPU="true"))
    term.wait_for(training_under_way(out), "checkpoint")
    term.press_ctrl_c()
    assert term.end() == 130
    step = interrupted_at(term, out)
    assert json.loads((out / "checkpoints" / checkpoints(out)[-1] / "trainer_state.json").read_text())["step"] == step
    resumed = check(run_main(args(dataset_dir, out), processes=2))
    assert assert_resumed(resumed, DDP_STEPS)[1] == step
    assert_same_run(out, ddp_resume_reference)
