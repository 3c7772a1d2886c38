"""Whatever bytes or JSON the state file holds, load_state returns a State or None (file moved
aside), never raises, and what it returns can be fed to the guard and the journal."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pin.guard import Guard, GuardSettings
from adaptive_pin.state import FORMAT, VERSION, State, load_state
from adaptive_pin.verify import MoveJournal, VerifySettings

HOST = "fuzz-host"
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["0-3", "3-1", "a/0", "a/0|1", "x", "/", "|"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
# Mostly well-formed headers, so the fuzz reaches the section decoders.
documents = st.fixed_dictionaries(
    {
        "format": st.one_of(st.just(FORMAT), json_values),
        "version": st.one_of(st.just(VERSION), json_values),
        "host_id": st.one_of(st.just(HOST), json_values),
    },
    optional={
        k: json_values
        for k in (
            "boot_id",
            "saved_at",
            "original_affinity",
            "placement",
            "guard",
            "bad_placements",
            "policy",
        )
    },
)


def _check(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state.json"
        path.write_bytes(content)
        result = load_state(path, HOST)
        if result is None:
            assert not path.exists() and len(list(Path(d).glob("state.json.corrupt-*"))) == 1
            return
        assert isinstance(result, State)
        # Trusted means usable: the importers must not choke on it.
        Guard(GuardSettings()).import_state(dict(result.guard))
        MoveJournal(VerifySettings()).import_state(dict(result.bad_placements))


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(content: bytes) -> None:
    _check(content)


@SETTINGS
@given(documents)
def test_arbitrary_json(doc: dict[str, Any]) -> None:
    _check(json.dumps(doc).encode())
