"""One training run per --out: a second run on a folder in use is refused with one line; a lock left by
a killed run is taken over, and --resume then continues from the killed run's last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ldmkit.cli import main
from ldmkit.train.lock import LOCK

TINY_AE = ["train-autoencoder", "--config", "tiny", "--quiet"]


def _lock(out, host, pid) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"host": host, "pid": pid}))


def test_a_live_lock_refuses_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    _lock(out, socket.gethostname(), os.getpid())  # this very process: alive
    assert main([*TINY_AE, "--out", str(out)]) == 2
    assert "in use by another ldmkit run" in capsys.readouterr().err and not (out / "latest").exists()

    _lock(out, "elsewhere.example", 12345)  # another host: cannot be checked, so refused naming the file
    assert main([*TINY_AE, "--out", str(out)]) == 2
    assert str(out / LOCK) in capsys.readouterr().err

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(out, socket.gethostname(), gone.pid)  # its process has exited: stale
    assert main([*TINY_AE, "--out", str(out)]) == 0
    assert (out / "latest").exists() and not (out / LOCK).exists()  # released at the end

    (out / LOCK).write_text('{"host": "')  # cut short by a crash mid-write: stale too
    assert main([*TINY_AE, "--out", str(out), "--resume"]) == 0 and not (out / LOCK).exists()


@pytest.mark.slow
def test_second_run_refused_then_sigkill_then_resume(tmp_path, capsys):
    """A real run holds the lock; a second run on its --out is refused; the first is killed with SIGKILL
    mid-run; a --resume run takes the stale lock over and continues from the last checkpoint written."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldmkit.cli", *TINY_AE, "--out", str(out), "--set", "optim.steps=400",
           "--set", "logging.ckpt_every=2", "--set", "logging.val_every=1000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "latest").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "latest").exists(), first.stderr.read().decode()[-2000:] if first.poll() is not None else "slow"
        assert main([*TINY_AE, "--out", str(out), "--resume"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK).exists()  # SIGKILL: nothing ran to release it
    latest = (out / "latest").read_text().strip()
    assert main([*TINY_AE, "--out", str(out), "--resume", "--set", "optim.steps=400", "--set", "logging.ckpt_every=2",
                 "--set", "logging.val_every=1000"]) == 0
    assert (out / "latest").read_text().strip() == "step_00000400" and latest != "step_00000400"
    assert not (out / LOCK).exists()
