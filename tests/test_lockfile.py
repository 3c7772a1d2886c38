"""The single-instance lock, with real second processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_pin.lockfile import AlreadyRunningError, InstanceLock, LockFileError

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


@pytest.mark.parametrize("content", ["root:x:0:0:root:/root:/bin/bash\n", "12ab\n", "-1\n", "9" * 40 + "\n"])
def test_a_file_that_is_not_a_lock_is_refused_and_left_untouched(tmp_path: Path, content: str) -> None:
    # e.g. --lock-file /etc/passwd by mistake, as root: it must not be truncated.
    path = tmp_path / "passwd"
    path.write_text(content)
    with pytest.raises(
        LockFileError, match=r"holds something other than a pid: not an adaptive-pin lock"
    ) as err:
        InstanceLock(path).acquire()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert path.read_text() == content


def test_proc_files_are_refused_without_a_traceback(tmp_path: Path) -> None:
    # Writable or not (root may open it O_RDWR), /proc/self/status is not a pid file.
    with pytest.raises(LockFileError, match=r"^/proc/self/status: ") as err:
        InstanceLock("/proc/self/status").acquire()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    with pytest.raises(LockFileError, match=r"^/proc/x/lock: cannot open the lock file: "):
        InstanceLock("/proc/x/lock").acquire()


def test_devices_fifos_and_symlinks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LockFileError, match=r"/dev/null: not a regular file"):
        InstanceLock("/dev/null").acquire()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LockFileError, match=r"not a regular file"):
        InstanceLock(fifo).acquire()
    target = tmp_path / "precious"
    target.write_text("")
    link = tmp_path / "link.lock"
    link.symlink_to(target)
    with pytest.raises(LockFileError, match=r"it is a symlink"):
        InstanceLock(link).acquire()
    assert target.read_text() == ""  # nothing written through the link


def test_empty_file_and_a_dead_holders_pid_are_taken(tmp_path: Path) -> None:
    for content in ("", "4242\n"):
        path = tmp_path / f"lock{len(content)}"
        path.write_text(content)
        with InstanceLock(path):
            assert path.read_text() == f"{os.getpid()}\n"


def test_the_lock_descriptor_is_close_on_exec(tmp_path: Path) -> None:
    import fcntl

    lock = InstanceLock(tmp_path / "l")
    with lock:
        assert lock._fd is not None
        assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
