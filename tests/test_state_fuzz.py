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
# Mostly well-formed headers and section shapes, so the fuzz gets deep into the decoders
# (and sometimes all the way through), with arbitrary JSON mixed in at every level.
cpulists = st.one_of(st.sampled_from(["0-3", "1", "", "3-1", "0-15:2/4", "x"]), st.text(max_size=4))
vcpu_names = st.one_of(
    st.sampled_from(["a/0", "uuid-b/12", "pid:7/1", "a/x", "/0", "a0"]), st.text(max_size=5)
)
times = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(), json_values)
affinities = st.dictionaries(
    st.text(max_size=6),
    st.dictionaries(st.one_of(st.sampled_from(["0", "1", "17"]), st.text(max_size=3)), cpulists),
)
histories = st.one_of(
    st.fixed_dictionaries(
        {"last_moved": st.one_of(st.none(), times), "left": st.dictionaries(cpulists, times)}
    ),
    json_values,
)
guard = st.dictionaries(vcpu_names, histories)
guest_ids = st.one_of(st.sampled_from(["uuid-b", "pid:7", "a/0", ""]), st.text(max_size=5))
guard_memory = st.dictionaries(guest_ids, histories)
bad = st.dictionaries(st.builds(lambda v, c: f"{v}|{c}", vcpu_names, cpulists), times)
documents = st.fixed_dictionaries(
    {
        "format": st.one_of(*[st.just(FORMAT)] * 5, json_values),
        "version": st.one_of(*[st.just(VERSION)] * 5, json_values),
        "host_id": st.one_of(*[st.just(HOST)] * 5, json_values),
    },
    optional={
        "boot_id": st.one_of(st.text(max_size=8), json_values),
        "saved_at": times,
        "original_affinity": st.one_of(affinities, json_values),
        "placement": st.one_of(affinities, json_values),
        "guard": st.one_of(guard, json_values),
        "guard_memory": st.one_of(guard_memory, json_values),
        "bad_placements": st.one_of(bad, json_values),
        "policy": st.one_of(
            st.fixed_dictionaries(
                {"name": st.one_of(st.text(max_size=5), json_values), "state": json_values}
            ),
            json_values,
        ),
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
        g = Guard(GuardSettings())
        g.import_state(dict(result.guard))
        g.import_memory_state(dict(result.guard_memory))
        MoveJournal(VerifySettings()).import_state(dict(result.bad_placements))


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(content: bytes) -> None:
    _check(content)


@SETTINGS
@given(documents)
def test_arbitrary_json(doc: dict[str, Any]) -> None:
    _check(json.dumps(doc).encode())
