"""parse_config never fails any other way than UsageError, whatever the text or the TOML."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pin.config import SECTIONS, VM_OPTIONS, Config, Section, parse_config, render_toml, toml_value
from adaptive_pin.errors import UsageError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys drawn mostly from the real ones, so the fuzz reaches the per-option checks.
REAL_KEYS = sorted({o.key for s in SECTIONS for o in s.options} | {"qmp", "vm", "options", "name", "uuid"})
keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(string.ascii_letters + "_-. ", min_size=1, max_size=8))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["0-3", "auto", "off", "/run/x", "127.0.0.1:1", "qemu", "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)


def _section(sec: Section) -> st.SearchStrategy[dict[str, Any]]:
    real = st.sampled_from([o.key for o in sec.options] + list(sec.subtables))
    vm_table = st.dictionaries(
        st.one_of(st.sampled_from([o.key for o in VM_OPTIONS]), keys), scalars, max_size=4
    )
    special = {
        "vm": st.lists(vm_table, max_size=3),
        "qmp": st.dictionaries(keys, st.one_of(st.just("/run/q.sock"), scalars), max_size=2),
    }
    item = st.one_of(*[real] * 9, keys).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(special[k], values) if k in special else values)
    )
    return st.lists(item, max_size=5).map(dict)


# Mostly the real sections and keys, so the fuzz gets past "unknown key" to the checks.
documents = st.fixed_dictionaries(
    {},
    optional={s.name: st.one_of(*[_section(s)] * 9, values) for s in SECTIONS},
)


def _toml(doc: dict[str, Any]) -> str:
    return "\n".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in doc.items())


def _only_usage_error(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.toml")
    except UsageError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz.toml: ")
        assert "\n" not in msg.rstrip() or "invalid TOML" in msg
        return
    assert isinstance(config, Config)
    # Whatever was accepted renders to TOML that parses back to the same thing.
    assert parse_config(render_toml(config, comments=False), "again") == config


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    _only_usage_error(text)


@SETTINGS
@given(documents)
def test_arbitrary_toml_documents(doc: dict[str, Any]) -> None:
    _only_usage_error(_toml(doc))


@SETTINGS
@given(
    key=st.sampled_from(
        ["controller.interval_s", "guard.budget_per_tick", "metrics.port", "guard.cooldown_s"]
    ),
    digits=st.integers(min_value=19, max_value=400),
    sign=st.sampled_from(["", "-"]),
)
def test_integers_beyond_64_bits_are_a_usage_error(key: str, digits: int, sign: str) -> None:
    # tomllib reads integers of any length; float() of a 400-digit one overflows.
    section, _, name = key.partition(".")
    _only_usage_error(f"[{section}]\n{name} = {sign}{'9' * digits}\n")
