"""A minimal QMP client (QEMU Machine Protocol over a UNIX socket), stdlib only.

Enough to ask a running QEMU which host thread runs each vCPU: read the greeting, leave
capabilities negotiation mode, execute commands. Asynchronous events that arrive while waiting
for a reply are skipped. Every read and write shares one deadline, so a monitor held by another
client (QMP serves one at a time: it accepts the connection but never greets) fails in bounded time.
"""

from __future__ import annotations

import json
import socket
import time
from types import TracebackType
from typing import Any

MAX_LINE = 1 << 20  # one QMP message per line; query-cpus-fast for 1000 vCPUs is ~200 KiB


class QmpError(Exception):
    """The socket is unreachable, the peer is not QMP, timed out, or the command failed."""


class QmpClient:
    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self.path = path
        self._deadline = time.monotonic() + timeout
        self._buf = b""
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QmpError(f"QMP socket {path}: peer did not greet with QMP: {str(greeting)[:80]}")
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError(f"QMP socket {path}: {exc.strerror or exc}") from None
        except QmpError:
            self.close()
            raise

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value; QmpError carries QEMU's ``desc``."""
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = self._read_message()
                if reply.get("id") != self._next_id:
                    continue  # an event, or a reply to someone else's command
                if "error" in reply:
                    err = reply["error"]
                    raise QmpError(f"QMP socket {self.path}: {command}: {err.get('desc', err)}")
                return reply.get("return")
        except OSError as exc:
            raise QmpError(f"QMP socket {self.path}: {command}: {exc.strerror or exc}") from None

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"QMP socket {self.path}: no reply in time (another client on the monitor?)")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError(
                    f"QMP socket {self.path}: no reply in time (another client on the monitor?)"
                ) from None
            if not chunk:
                raise QmpError(f"QMP socket {self.path}: QEMU closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise QmpError(f"QMP socket {self.path}: message over {MAX_LINE} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP socket {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"QMP socket {self.path}: not a QMP message: {line[:80]!r}")
        return msg

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def vcpu_thread_ids(path: str, timeout: float = 2.0) -> dict[int, int]:
    """vCPU index -> host thread id, from ``query-cpus-fast``."""
    with QmpClient(path, timeout) as qmp:
        cpus = qmp.execute("query-cpus-fast")
    try:
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
    except (TypeError, KeyError, ValueError):
        raise QmpError(f"QMP socket {path}: unexpected query-cpus-fast reply: {str(cpus)[:120]}") from None
