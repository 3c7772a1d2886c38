"""The state file: round trip, atomicity under a crash, distrust of anything odd, and the
controller <-> state conversion (monotonic times <-> unix times, boot and policy checks)."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adaptive_pin.guard import Guard, GuardSettings
from adaptive_pin.model import CpuSet, MemoryMove, Move
from adaptive_pin.state import (
    FORMAT,
    VERSION,
    State,
    StateError,
    boot_id,
    capture,
    load_state,
    restore,
    save_state,
)
from adaptive_pin.verify import MoveJournal, VerifySettings

HOST = "3d1219c7c4c5404aaa1f6d2a48adfda4"
REPO = Path(__file__).resolve().parent.parent


def sample_state(**changes: Any) -> State:
    base = State(
        host_id=HOST,
        boot_id="b-1",
        saved_at=1_764_000_000.5,
        original_affinity={("uuid-a", 0): CpuSet.parse("0-7"), ("uuid-a", 1): CpuSet.parse("0-7")},
        placement={
            ("uuid-a", 0): CpuSet.of(2),
            ("uuid-a", 1): CpuSet.of(3),
            ("pid:77", 0): CpuSet.parse("4-5"),
        },
        guard={"uuid-a/0": {"last_moved": 1_763_999_990.0, "left": {"0-7": 1_763_999_990.0}}},
        guard_memory={
            "uuid-a": {"last_moved": 1_763_999_980.0, "left": {"0": 1_763_999_980.0}},
            "pid:77": {"last_moved": 1_763_999_900.0, "left": {"0-2": 1_763_999_700.0, "2": 1_763_999_900.0}},
        },
        bad_placements={"uuid-a/1|6": 1_764_000_900.0},
        policy_name="cache-aware",
        policy_state={"version": 1, "streaks": {"uuid-a/0": 3}},
    )
    return State(**{**base.__dict__, **changes})


def corrupt_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "adaptive-pin" / "state.json"
    save_state(path, sample_state())
    assert load_state(path, HOST) == sample_state()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["host_id"]) == (FORMAT, VERSION, HOST)
    assert doc["original_affinity"] == {"uuid-a": {"0": "0-7", "1": "0-7"}}
    assert doc["guard_memory"]["pid:77"]["left"] == {"0-2": 1_763_999_700.0, "2": 1_763_999_900.0}


def test_no_file_is_no_state_and_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_state(tmp_path / "state.json", HOST) is None
    assert caplog.records == []


def test_unwritable_location_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=r"blocker|file/state\.json: cannot write the state file"):
        save_state(blocker / "state.json", sample_state())


def test_non_json_policy_state_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not plain JSON"):
        save_state(tmp_path / "s.json", sample_state(policy_state={"x": float("nan")}))
    assert not (tmp_path / "s.json").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


_CRASHING_WRITER = """
import os, signal, sys
from adaptive_pin import state
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written and fsynced: crash before rename
os.replace = die
state.save_state(sys.argv[1], state.State(host_id=sys.argv[2], policy_name="new"))
"""


def test_crash_between_write_and_rename_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save_state(path, sample_state())
    before = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(path), HOST], cwd=REPO, capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    strays = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(strays) == 1 and b'"new"' in strays[0].read_bytes()  # the crash really was mid-save
    assert path.read_bytes() == before
    assert load_state(path, HOST) == sample_state()
    # The next save clears the dead writer's temp file.
    save_state(path, sample_state(policy_name="later"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _doc(**changes: Any) -> bytes:
    return json.dumps({**_valid_doc(), **changes}).encode()


def _valid_doc() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "host_id": HOST,
        "original_affinity": {"uuid-a": {"0": "0-3"}},
    }


UNTRUSTED = [
    pytest.param(b"", "not JSON", id="empty"),
    pytest.param(b"\x00\xff garbage", "not JSON", id="binary"),
    pytest.param(b"[1, 2]", "file: not an object", id="not-object"),
    pytest.param(_doc(format="other-tool"), "format is 'other-tool'", id="foreign"),
    pytest.param(_doc(host_id="elsewhere"), "written by host 'elsewhere'", id="other-host"),
    pytest.param(_doc(version=VERSION + 1), "newer than this adaptive-pin reads", id="newer"),
    pytest.param(_doc(version="1"), "not a version number", id="version-type"),
    pytest.param(
        _doc(original_affinity={"uuid-a": {"0": "3-1"}}), "original_affinity.uuid-a.0", id="bad-cpulist"
    ),
    pytest.param(_doc(original_affinity={"uuid-a": {"x": "1"}}), "vCPU index 'x'", id="bad-vcpu"),
    pytest.param(_doc(guard={"nokey": {}}), "is not <guest>/<vcpu>", id="bad-guard-key"),
    pytest.param(_doc(guard={"a/0": {"last_moved": "soon"}}), "not a time", id="bad-guard-time"),
    pytest.param(_doc(bad_placements={"a/0": 5}), "is not <guest>/<vcpu>|<cpulist>", id="bad-placement"),
    pytest.param(_doc(guard_memory=["uuid-a"]), "guard_memory: not an object", id="memory-not-object"),
    pytest.param(_doc(guard_memory={"": {}}), "guard_memory: an empty guest id", id="memory-empty-guest"),
    pytest.param(_doc(guard_memory={"a": 5}), "guard_memory.a: not an object", id="memory-entry-type"),
    pytest.param(
        _doc(guard_memory={"a": {"left": {"1-0": 1.0}}}), "guard_memory.a.left: ", id="memory-bad-nodes"
    ),
    pytest.param(
        _doc(guard_memory={"a": {"left": {"node0": 1.0}}}), "guard_memory.a.left: ", id="memory-nodes-text"
    ),
    pytest.param(
        _doc(guard_memory={"a": {"left": ["0"]}}), "guard_memory.a.left: not an object", id="memory-left-type"
    ),
    pytest.param(
        _doc(guard_memory={"a": {"last_moved": "soon"}}), "guard_memory.a: not a time", id="memory-time-text"
    ),
    pytest.param(
        _doc(guard_memory={"a": {"last_moved": True}}), "guard_memory.a: not a time", id="memory-time-bool"
    ),
    pytest.param(
        _doc(guard_memory={"a": {"left": {"0": [1.0]}}}),
        "guard_memory.a.left: not a time",
        id="memory-left-time",
    ),
    pytest.param(_doc(guard_memory={"a": {"last_moved": float("nan")}}), "NaN is not JSON", id="memory-nan"),
    pytest.param(
        _doc(guard_memory={"a": {"left": {"0": float("-inf")}}}), "-Infinity is not JSON", id="memory-inf"
    ),
    pytest.param(  # too large for a float: json reads inf, not a constant
        _doc(guard_memory={"a": {"last_moved": 1.5}}).replace(b"1.5", b"1e999"),
        "guard_memory.a: not a time",
        id="memory-overflow",
    ),
    pytest.param(_doc(saved_at=float("nan")), "NaN is not JSON", id="nan"),
    pytest.param(b"[" * 100_000, "nested too deeply", id="deep"),
]


@pytest.mark.parametrize(("content", "why"), UNTRUSTED)
def test_untrusted_files_are_moved_aside(
    content: bytes, why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="adaptive_pin.state"):
        assert load_state(path, HOST) is None
    assert not path.exists()
    [aside] = corrupt_copies(path)
    assert aside.read_bytes() == content  # kept for a post-mortem, byte for byte
    assert len(caplog.records) == 1
    assert why in caplog.records[0].getMessage()
    assert aside.name in caplog.records[0].getMessage()


def test_truncated_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save_state(path, sample_state())
    full = path.read_bytes()
    for cut in (1, len(full) // 2, len(full) - 3):
        path.write_bytes(full[:cut])
        assert load_state(path, HOST) is None
    assert len(corrupt_copies(path)) == 3  # same second: distinct names, none overwritten


def test_oversized_file_is_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptive_pin.state as state_mod

    monkeypatch.setattr(state_mod, "MAX_BYTES", 100)
    path = tmp_path / "state.json"
    save_state(path, sample_state())
    assert load_state(path, HOST) is None
    assert len(corrupt_copies(path)) == 1


# --------------------------------------------------------------------------------------
# Controller <-> State
# --------------------------------------------------------------------------------------


def fake_controller(now: float, policy: str = "cache-aware") -> SimpleNamespace:
    return SimpleNamespace(
        clock=lambda: now,
        guard=Guard(GuardSettings()),
        journal=MoveJournal(VerifySettings()),
        policy=SimpleNamespace(name=policy),
        policy_state={"initial": True},
        original_affinity={},
    )


def move(to: str) -> Move:
    return Move("uuid-a", "a", 0, CpuSet.parse("0-7"), CpuSet.parse(to), "test", 1.0)


def test_capture_and_restore_translate_monotonic_times(tmp_path: Path) -> None:
    old = fake_controller(now=1000.0)
    old.guard.record_move(move("2"), 990.0)  # 10 s ago on the old clock
    old.journal._bad[(("uuid-a", 1), CpuSet.of(6))] = 1600.0  # expires in 600 s
    old.original_affinity[("uuid-a", 0)] = CpuSet.parse("0-7")
    old.policy_state = {"version": 1}
    wall = time.time()
    state = capture(old, {("uuid-a", 0): CpuSet.of(2)}, host=HOST)
    assert state.guard["uuid-a/0"]["last_moved"] == pytest.approx(wall - 10, abs=1)
    save_state(tmp_path / "s.json", state)
    loaded = load_state(tmp_path / "s.json", HOST)
    assert loaded is not None

    new = fake_controller(now=50.0)  # after a restart: another clock origin
    assert restore(new, loaded) == []
    restored = new.guard.export_state()["uuid-a/0"]
    assert restored["last_moved"] == pytest.approx(40.0, abs=1)
    [(name, expiry)] = new.journal.export_state().items()
    assert name == "uuid-a/1|6" and expiry == pytest.approx(650.0, abs=1)
    assert new.original_affinity == {("uuid-a", 0): CpuSet.parse("0-7")}
    assert new.policy_state == {"version": 1}
    # The guard acts on it: the vCPU is still cooling down on the new clock.
    assert new.guard._history[("uuid-a", 0)].last_moved == pytest.approx(40.0, abs=1)


def test_restore_drops_what_does_not_apply() -> None:
    state = sample_state(boot_id="another-boot", policy_name="numa")
    ctl = fake_controller(now=0.0, policy="cache-aware")
    notes = restore(ctl, state)
    assert ctl.original_affinity == {}
    assert ctl.policy_state == {"initial": True}
    assert notes == [
        "saved original affinities are from another boot: the threads they name are gone",
        "saved policy state is numa's, not cache-aware's: not used",
    ]
    same_boot = sample_state(boot_id=boot_id())
    ctl = fake_controller(now=0.0)
    assert restore(ctl, same_boot) == []
    assert ctl.original_affinity == dict(same_boot.original_affinity)


THERE = MemoryMove("uuid-a", "vm-a", CpuSet.of(0), CpuSet.of(1), "", 1.0)
BACK = MemoryMove("uuid-a", "vm-a", CpuSet.of(1), CpuSet.of(0), "", 1.0)


def _restarted(old: SimpleNamespace, path: Path, now: float) -> SimpleNamespace:
    """``old``'s state through the file into a fresh controller whose clock reads ``now``."""
    save_state(path, capture(old, {}, host=HOST))
    loaded = load_state(path, HOST)
    assert loaded is not None
    new = fake_controller(now=now)
    assert restore(new, loaded) == []
    return new


def test_memory_history_survives_a_restart(tmp_path: Path) -> None:
    old = fake_controller(now=1000.0)
    assert old.guard.memory_refusal(THERE, 990.0, used=0) is None
    old.guard.record_memory_move(THERE, 990.0)  # node 0 -> 1, 10 s ago on the old clock
    new = _restarted(old, tmp_path / "s.json", now=50.0)  # another clock origin: moved at ~40
    guard = new.guard  # defaults: cooldown 60 s, return window 300 s
    assert "cooldown" in (guard.memory_refusal(THERE, 50.0, used=0) or "")
    assert "cooldown" in (guard.memory_refusal(BACK, 50.0, used=0) or "")
    # Past the cooldown: the same way is allowed again, back to node 0 is not until the window ends.
    assert guard.memory_refusal(THERE, 140.0, used=0) is None
    assert "back to node(s) 0 " in (guard.memory_refusal(BACK, 140.0, used=0) or "")
    assert guard.memory_refusal(BACK, 400.0, used=0) is None
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["guard_memory"]["uuid-a"]["last_moved"] == pytest.approx(time.time() - 10, abs=5)
    assert list(doc["guard_memory"]["uuid-a"]["left"]) == ["0"]


def test_a_file_of_the_previous_version_loads_with_no_memory_history(tmp_path: Path) -> None:
    # As the previous adaptive-pin wrote it: the same version, no "guard_memory".
    previous = {
        "format": FORMAT,
        "version": 1,
        "host_id": HOST,
        "boot_id": "b-1",
        "saved_at": 1_764_000_000.5,
        "original_affinity": {"uuid-a": {"0": "0-7"}},
        "placement": {"uuid-a": {"0": "2"}},
        "guard": {"uuid-a/0": {"last_moved": 1_763_999_990.0, "left": {"0-7": 1_763_999_990.0}}},
        "bad_placements": {},
        "policy": {"name": "cache-aware", "state": None},
    }
    path = tmp_path / "state.json"
    path.write_text(json.dumps(previous))
    loaded = load_state(path, HOST)
    assert loaded is not None and path.exists()  # trusted, not moved aside
    assert loaded.guard_memory == {}
    assert loaded.guard == previous["guard"]
    ctl = fake_controller(now=0.0)
    restore(ctl, loaded)
    assert ctl.guard.export_memory_state() == {}
    assert ctl.guard.memory_refusal(THERE, 0.0, used=0) is None
    assert ctl.guard.export_state().keys() == {"uuid-a/0"}


def test_a_departed_vms_memory_history_is_forgotten_and_not_written(tmp_path: Path) -> None:
    old = fake_controller(now=1000.0)
    gone = MemoryMove("pid:77", "vm-b", CpuSet.of(1), CpuSet.of(0), "", 1.0)
    old.guard.record_memory_move(THERE, 990.0)
    old.guard.record_memory_move(gone, 990.0)
    old.guard.forget({("uuid-a", 0)})  # pid:77 is no longer running
    new = _restarted(old, tmp_path / "s.json", now=1000.0)
    assert json.loads((tmp_path / "s.json").read_text())["guard_memory"].keys() == {"uuid-a"}
    assert new.guard.export_memory_state().keys() == {"uuid-a"}
    assert "cooldown" in (new.guard.memory_refusal(THERE, 1000.0, used=0) or "")
    back_again = MemoryMove("pid:77", "vm-b", CpuSet.of(0), CpuSet.of(1), "", 1.0)
    assert new.guard.memory_refusal(back_again, 1000.0, used=0) is None


def test_move_aside_failure_still_distrusts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    path = tmp_path / "state.json"
    path.write_bytes(b"junk")
    assert load_state(path, HOST) is None
    assert path.exists()
    assert "not moved aside: Permission denied" in caplog.text
