"""One adaptive-pin daemon per host: an flock(2) on the lock file, holding the owner's pid.

Why flock and no stale-lock cleanup: the kernel drops an flock when the last descriptor of
the open file description closes, and a process's descriptors close when it dies however it
dies (SIGKILL, OOM kill, panic in the interpreter). So a lock file left behind by a dead daemon
is just a file: the next daemon opens it and gets the lock. There is no pid to check for
liveness and no race between "is it stale?" and "take it over". The pid inside is only for the
error message of a second instance.

The file is never unlinked: with unlink-on-exit, a starting daemon could lock the old inode
just before it is removed while a third creates and locks a new one, and two would run.
The descriptor is O_CLOEXEC so children (QEMU helpers, subprocesses) never inherit the lock.

What it refuses to touch (a mistyped ``--lock-file`` must not damage anything, as root): a
symlink (O_NOFOLLOW), anything but a regular file (a device, a FIFO: checked with fstat before
a byte is written), and a regular file that holds anything but a pid (``/etc/passwd``,
``/proc/self/status``): such a file is never truncated. Every OSError becomes one
:class:`LockFileError` line (exit status 2) naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from adaptive_pin.errors import AdaptivePinError, UsageError


class AlreadyRunningError(AdaptivePinError):
    """Another process holds the lock; the message names its pid."""


class LockFileError(UsageError):
    """The lock file cannot be created, opened or written, or is not ours to overwrite."""


_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
_MAX_PID_BYTES = 32


class InstanceLock:
    """``with InstanceLock(path): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AlreadyRunningError`; never waits."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise LockFileError(f"{self.path}: cannot open the lock file: {_why(exc)}") from None
        try:
            _check_ours(fd, self.path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "a process that has not written its pid yet"
                raise AlreadyRunningError(
                    f"another adaptive-pin is running ({who} holds {self.path})"
                ) from None
            raise LockFileError(f"{self.path}: cannot lock: {_why(exc)}") from None
        except LockFileError:
            os.close(fd)
            raise
        # Ours now: replace whatever pid a previous (dead) holder left.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise LockFileError(
                f"{self.path}: cannot write the pid into the lock file: {_why(exc)}"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Unlock (by closing). The file stays: see the module docstring."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid for a reader to be misled by
        os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink (refused: the lock must be a plain file)"
    return str(exc.strerror or exc)


def _check_ours(fd: int, path: Path) -> None:
    """A regular file, empty or holding a pid: anything else is not a lock file to overwrite."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise LockFileError(f"{path}: not a regular file: refusing to use it as the lock file")
    try:
        head = os.pread(fd, _MAX_PID_BYTES + 1, 0)
    except OSError as exc:
        raise LockFileError(f"{path}: cannot read the lock file: {_why(exc)}") from None
    text = head.strip()
    if len(head) > _MAX_PID_BYTES or (text and not text.isdigit()):
        raise LockFileError(
            f"{path}: holds something other than a pid: not an adaptive-pin lock file, left untouched"
        )


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
