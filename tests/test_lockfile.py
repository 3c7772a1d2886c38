"""The single-instance lock, with real second processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_pin.lockfile import AlreadyRunningError, InstanceLock

REPO = Path(__file__).resolve().parent.parent

# A second instance: tries the lock, prints the one-line error the CLI would print.
_SECOND = """
import sys
from adaptive_pin.lockfile import InstanceLock
from adaptive_pin.errors import AdaptivePinError
try:
    InstanceLock(sys.argv[1]).acquire()
except AdaptivePinError as exc:
    print(f"adaptive-pin: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
print("locked")
"""

# A holder: takes the lock, says so, then waits to be killed.
_HOLDER = """
import sys, time
from adaptive_pin.lockfile import InstanceLock
lock = InstanceLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def second_instance(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SECOND, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "run" / "adaptive-pin.lock"
    with InstanceLock(path) as lock:
        assert path.read_text() == f"{os.getpid()}\n"
        proc = second_instance(path)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert (
            proc.stderr == f"adaptive-pin: another adaptive-pin is running (pid {os.getpid()} holds {path})\n"
        )
    assert not lock.held
    assert path.exists()  # never unlinked: see the module docstring
    proc = second_instance(path)
    assert (proc.returncode, proc.stdout) == (0, "locked\n")


def test_lock_of_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    path = tmp_path / "adaptive-pin.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(AlreadyRunningError, match=rf"\(pid {holder.pid} holds "):
            InstanceLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert path.read_text() == f"{holder.pid}\n"  # the dead holder's pid is still in the file...
    lock = InstanceLock(path)
    lock.acquire()  # ...and means nothing: no stale-lock cleanup was needed
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_same_process_second_lock_object_is_refused(tmp_path: Path) -> None:
    # flock locks belong to open file descriptions: a second open() in the same process
    # conflicts too, so a daemon cannot accidentally run two controllers.
    path = tmp_path / "l"
    with InstanceLock(path), pytest.raises(AlreadyRunningError):
        InstanceLock(path).acquire()


def test_unopenable_lock_file_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match=r"cannot open the lock file") as err:
        InstanceLock(blocker / "x.lock").acquire()
    assert "\n" not in str(err.value)
