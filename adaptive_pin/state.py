"""The daemon's state file: what it must remember across a restart, and nothing it may trust blindly.

JSON, versioned, one host's::

    {"format": "adaptive-pin-state", "version": 1, "host_id": "<machine-id>",
     "boot_id": "<kernel boot id>", "saved_at": <unix time>,
     "original_affinity": {"<guest id>": {"<vCPU>": "<cpulist>"}},
     "placement": {"<guest id>": {"<vCPU>": "<cpulist>"}},
     "guard": {...Guard.export_state(), times as unix time...},
     "guard_memory": {"<guest id>": {"last_moved": <t>, "left": {"<node list>": <t>}}},
     "bad_placements": {...MoveJournal.export_state(), times as unix time...},
     "policy": {"name": "<policy>", "state": <its JSON state>}}

Written atomically (temp file in the same directory, fsync, rename, fsync the directory), so
a crash leaves the old file or the new one, never half of either. A file that is corrupt,
truncated, too large, of another format, of another host, or of a newer version is renamed
``<name>.corrupt-<UTC time>`` with a warning and the daemon starts afresh: state is an
optimisation (and the way to restore original affinities after a crash), never an input to
believe over what the hypervisor says now.

Times: the guard and the journal keep ``controller.clock()`` (monotonic) seconds, which mean
nothing after a reboot. The file holds unix time; :func:`capture` and :func:`restore` convert.
Original affinities and placements name threads, so they are dropped when the boot id differs.

Every section after the header is optional (read as empty when absent) and a section a reader
does not know is ignored, so adding one keeps the version: ``guard_memory`` came later, and a
file from before it loads with no memory history, while the release before reads a newer file
minus that section instead of moving it all aside as "newer". The version goes up only when
an existing section changes meaning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_pin.errors import AdaptivePinError
from adaptive_pin.model import CpuListError, CpuSet, Guest, VCpuKey

log = logging.getLogger("adaptive_pin.state")

FORMAT = "adaptive-pin-state"
VERSION = 1
MAX_BYTES = 64 * 1024 * 1024  # far above any real host (1000 VMs x 64 vCPUs is ~10 MB)
_TMP_SUFFIX = ".tmp"

Affinities = Mapping[VCpuKey, CpuSet]


class StateError(AdaptivePinError):
    """The state file could not be written (the message names the file and the errno)."""


class _InvalidError(ValueError):
    """The file's content cannot be trusted; the message says why."""


@dataclass(frozen=True)
class State:
    host_id: str
    boot_id: str = ""
    saved_at: float = 0.0  # unix time
    original_affinity: Affinities = field(default_factory=dict)
    placement: Affinities = field(default_factory=dict)
    guard: Mapping[str, Any] = field(default_factory=dict)  # Guard.export_state(), unix times
    guard_memory: Mapping[str, Any] = field(default_factory=dict)  # Guard.export_memory_state(), same
    bad_placements: Mapping[str, float] = field(default_factory=dict)  # journal's, unix times
    policy_name: str | None = None
    policy_state: Any = None  # JSON value (policies.base state rule)


# --------------------------------------------------------------------------------------
# Identity of this host and boot
# --------------------------------------------------------------------------------------


def host_id(root: str | Path = "/") -> str:
    """/etc/machine-id (systemd's stable host id), else the hostname."""
    try:
        mid = (Path(root) / "etc/machine-id").read_text().strip()
    except OSError:
        mid = ""
    return mid or f"hostname:{socket.gethostname()}"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def _encode_affinities(aff: Affinities) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for (gid, idx), cpus in sorted(aff.items()):
        out.setdefault(gid, {})[str(idx)] = cpus.to_list()
    return out


def _to_json(state: State) -> bytes:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "host_id": state.host_id,
        "boot_id": state.boot_id,
        "saved_at": state.saved_at,
        "original_affinity": _encode_affinities(state.original_affinity),
        "placement": _encode_affinities(state.placement),
        "guard": state.guard,
        "guard_memory": state.guard_memory,
        "bad_placements": state.bad_placements,
        "policy": {"name": state.policy_name, "state": state.policy_state},
    }
    try:
        return json.dumps(doc, sort_keys=True, allow_nan=False, indent=1).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateError(f"state is not plain JSON: {exc}") from None


def _reject_constant(name: str) -> float:
    raise _InvalidError(f"{name} is not JSON")


def _time(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _InvalidError(f"{where}: not a time")
    return float(value)


def _dict(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _InvalidError(f"{where}: not an object")
    return value


def _cpus(value: object, where: str) -> CpuSet:
    if not isinstance(value, str):
        raise _InvalidError(f"{where}: not a cpulist")
    try:
        return CpuSet.parse(value)
    except CpuListError as exc:
        raise _InvalidError(f"{where}: {exc}") from None


def _vcpu_index(text: str, where: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _InvalidError(f"{where}: vCPU index {text[:20]!r} is not a number")
    return int(text)


def _decode_affinities(value: object, where: str) -> dict[VCpuKey, CpuSet]:
    out: dict[VCpuKey, CpuSet] = {}
    for gid, vcpus in _dict(value, where).items():
        for idx, cpus in _dict(vcpus, f"{where}.{gid}").items():
            out[(gid, _vcpu_index(idx, f"{where}.{gid}"))] = _cpus(cpus, f"{where}.{gid}.{idx}")
    return out


def _check_vcpu_name(name: str, where: str) -> None:
    """``<guest id>/<vCPU>`` as the guard and the journal spell a vCPU."""
    gid, sep, idx = name.rpartition("/")
    if not sep or not gid:
        raise _InvalidError(f"{where}: {name[:40]!r} is not <guest>/<vcpu>")
    _vcpu_index(idx, where)


def _decode_history(entry: object, where: str) -> dict[str, Any]:
    """One guard history: when it last moved, and the CPU sets (or nodes) it left, when."""
    e = _dict(entry, where)
    last = e.get("last_moved")
    left = {
        _cpus(cpus, f"{where}.left").to_list(): _time(t, f"{where}.left")
        for cpus, t in _dict(e.get("left", {}), f"{where}.left").items()
    }
    return {"last_moved": None if last is None else _time(last, where), "left": left}


def _decode_guard(value: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, entry in _dict(value, "guard").items():
        _check_vcpu_name(name, "guard")
        out[name] = _decode_history(entry, f"guard.{name}")
    return out


def _decode_guard_memory(value: object) -> dict[str, Any]:
    """By guest id: any non-empty string (a UUID, ``pid:<pid>``), no vCPU index."""
    out: dict[str, Any] = {}
    for gid, entry in _dict(value, "guard_memory").items():
        if not gid:
            raise _InvalidError("guard_memory: an empty guest id")
        out[gid] = _decode_history(entry, f"guard_memory.{gid}")
    return out


def _decode_bad(value: object) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, expiry in _dict(value, "bad_placements").items():
        vcpu, sep, cpus = name.partition("|")
        if not sep:
            raise _InvalidError(f"bad_placements: {name[:40]!r} is not <guest>/<vcpu>|<cpulist>")
        _check_vcpu_name(vcpu, "bad_placements")
        _cpus(cpus, "bad_placements")
        out[name] = _time(expiry, f"bad_placements.{name}")
    return out


def _from_json(data: bytes, expected_host: str) -> State:
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _InvalidError(f"not JSON: {exc}") from None
    except RecursionError:
        raise _InvalidError("not JSON: nested too deeply") from None
    doc = _dict(doc, "file")
    if doc.get("format") != FORMAT:
        raise _InvalidError(f"format is {str(doc.get('format'))[:40]!r}, not {FORMAT!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _InvalidError(f"version {str(version)[:20]!r} is not a version number")
    if version > VERSION:
        raise _InvalidError(f"version {version} is newer than this adaptive-pin reads ({VERSION})")
    if doc.get("host_id") != expected_host:
        raise _InvalidError(f"written by host {str(doc.get('host_id'))[:40]!r}, this is {expected_host!r}")
    boot = doc.get("boot_id", "")
    if not isinstance(boot, str):
        raise _InvalidError("boot_id: not a string")
    policy = _dict(doc.get("policy", {}), "policy")
    name = policy.get("name")
    if name is not None and not isinstance(name, str):
        raise _InvalidError("policy.name: not a string")
    return State(
        host_id=expected_host,
        boot_id=boot,
        saved_at=_time(doc.get("saved_at", 0.0), "saved_at"),
        original_affinity=_decode_affinities(doc.get("original_affinity", {}), "original_affinity"),
        placement=_decode_affinities(doc.get("placement", {}), "placement"),
        guard=_decode_guard(doc.get("guard", {})),
        guard_memory=_decode_guard_memory(doc.get("guard_memory", {})),
        bad_placements=_decode_bad(doc.get("bad_placements", {})),
        policy_name=name,
        policy_state=policy.get("state"),
    )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | Path, state: State) -> None:
    """Write ``state`` to ``path`` atomically, mode 0600; :class:`StateError` if it cannot."""
    p = Path(path)
    data = _to_json(state)
    tmp: str | None = None
    try:
        # 0700: the file names every VM on the host and where it runs.
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stray_temps(p)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=_TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:  # mkstemp: mode 0600, O_EXCL, O_CLOEXEC
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        tmp = None
        _fsync_dir(p.parent)  # the rename itself must survive a power cut
    except OSError as exc:
        raise StateError(f"{p}: cannot write the state file: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _remove_stray_temps(p: Path) -> None:
    """Temp files of a writer that died before its rename (one daemon per host: see lockfile)."""
    for stray in p.parent.glob(f".{p.name}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stray.unlink()


def _move_aside(p: Path, why: str) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(100):
        target = p.with_name(f"{p.name}.corrupt-{stamp}" + (f".{n}" if n else ""))
        if target.exists():
            continue
        try:
            os.rename(p, target)
        except OSError as exc:
            log.warning("state file %s not trusted (%s) and not moved aside: %s", p, why, exc.strerror)
            return None
        log.warning("state file %s not trusted (%s): moved to %s, starting afresh", p, why, target.name)
        return target
    return None


def load_state(path: str | Path, expected_host: str) -> State | None:
    """The saved state, or None: no file yet, or a file not to be trusted (moved aside, warned).

    Never raises for what the file holds or whether it can be read.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("state file %s unreadable (%s): starting afresh", p, exc.strerror or exc)
        return None
    try:
        if len(data) > MAX_BYTES:
            raise _InvalidError(f"larger than {MAX_BYTES} bytes")
        return _from_json(data, expected_host)
    except _InvalidError as exc:
        _move_aside(p, str(exc))
        return None


# --------------------------------------------------------------------------------------
# Controller <-> State
# --------------------------------------------------------------------------------------


def placement_of(guests: tuple[Guest, ...]) -> dict[VCpuKey, CpuSet]:
    """Where each vCPU is allowed to run now, as the last inventory saw it."""
    return {(g.id, v.index): v.affinity for g in guests for v in g.vcpus}


def _shift_guard(data: Mapping[str, Any], offset: float) -> dict[str, Any]:
    return {
        name: {
            "last_moved": None if e.get("last_moved") is None else e["last_moved"] + offset,
            "left": {cpus: t + offset for cpus, t in e.get("left", {}).items()},
        }
        for name, e in data.items()
    }


def capture(controller: Any, placement: Affinities, *, host: str | None = None) -> State:
    """The state of a running :class:`adaptive_pin.controller.Controller`, times as unix time."""
    offset = time.time() - controller.clock()
    return State(
        host_id=host or host_id(),
        boot_id=boot_id(),
        saved_at=time.time(),
        original_affinity=dict(controller.original_affinity),
        placement=dict(placement),
        guard=_shift_guard(controller.guard.export_state(), offset),
        guard_memory=_shift_guard(controller.guard.export_memory_state(), offset),
        bad_placements={k: t + offset for k, t in controller.journal.export_state().items()},
        policy_name=controller.policy.name,
        policy_state=controller.policy_state,
    )


def restore(controller: Any, state: State) -> list[str]:
    """Load ``state`` into a fresh controller; returns what was left out, in words."""
    notes: list[str] = []
    offset = controller.clock() - time.time()
    controller.guard.import_state(_shift_guard(state.guard, offset))
    controller.guard.import_memory_state(_shift_guard(state.guard_memory, offset))
    controller.journal.import_state({k: t + offset for k, t in state.bad_placements.items()})
    if state.boot_id and state.boot_id == boot_id():
        controller.original_affinity.update(state.original_affinity)
    elif state.original_affinity:
        notes.append("saved original affinities are from another boot: the threads they name are gone")
    if state.policy_name == controller.policy.name:
        controller.policy_state = state.policy_state
    elif state.policy_name is not None:
        notes.append(f"saved policy state is {state.policy_name}'s, not {controller.policy.name}'s: not used")
    return notes
