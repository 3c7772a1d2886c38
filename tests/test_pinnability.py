"""Pinnability: the metadata parser (hostile input included) and the precedence rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pin.model import PinSource
from adaptive_pin.pinnability import (
    MAX_METADATA_BYTES,
    NAMESPACE,
    Hints,
    MetadataError,
    Mode,
    PinnabilityRules,
    UnsafeXmlError,
    metadata_xml,
    parse_metadata,
    parse_xml_safely,
    resolve,
)

OFF = '<pinning mode="off"/>'
AUTO_HINTS = f'<ap:pinning xmlns:ap="{NAMESPACE}" mode="auto" whole-cores="yes" class="latency-sensitive"/>'

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<pinning mode="&lol3;"/>"""
XXE = '<!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]><pinning mode="&x;"/>'
PARAM_ENTITY = '<!DOCTYPE p [<!ENTITY % x SYSTEM "http://example.invalid/x.dtd"> %x;]><pinning mode="off"/>'


def test_parses_libvirt_stripped_and_namespaced_forms() -> None:
    assert parse_metadata(OFF).hints == Hints(Mode.OFF)
    parsed = parse_metadata(AUTO_HINTS)
    assert parsed.hints == Hints(Mode.AUTO, whole_cores=True, latency_sensitive=True)
    assert parsed.warnings == ()


@pytest.mark.parametrize("hostile", [BILLION_LAUGHS, XXE, PARAM_ENTITY])
def test_dtd_and_entities_are_refused(hostile: str) -> None:
    with pytest.raises(MetadataError, match="DOCTYPE"):
        parse_metadata(hostile)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('<pinning mode="of"/>', "neither"),
        ("<pinning/>", "no mode"),
        ('<other mode="off"/>', "root element"),
        ('<pinning xmlns="urn:someone-else" mode="off"/>', "root element"),
        ("<pinning mode='off'", "not well-formed"),
        ('<pinning mode="&undefined;"/>', "not well-formed"),
        ("<a>" * 100 + "</a>" * 100, "deeper"),
        (f'<pinning mode="off" pad="{"x" * MAX_METADATA_BYTES}"/>', "limit"),
    ],
)
def test_broken_elements_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        parse_metadata(text)


def test_bad_hints_warn_but_keep_the_mode() -> None:
    parsed = parse_metadata('<pinning mode="off" whole-cores="maybe" class="fast" colour="red"/>')
    assert parsed.hints == Hints(Mode.OFF)
    assert len(parsed.warnings) == 3
    assert any("whole-cores" in w for w in parsed.warnings)
    assert any("colour" in w for w in parsed.warnings)


def test_safe_parser_keeps_namespaces() -> None:
    root = parse_xml_safely(f'<d xmlns:a="{NAMESPACE}"><a:x k="v"/></d>', max_bytes=1000, what="t")
    assert root.find(f"{{{NAMESPACE}}}x") is not None
    with pytest.raises(UnsafeXmlError, match="t: DOCTYPE"):
        parse_xml_safely(XXE, max_bytes=1000, what="t")


# --- precedence: config override > metadata > orchestrator > default --------------------

RULES = PinnabilityRules(overrides={"web": Hints(Mode.AUTO, whole_cores=True)})


@pytest.mark.parametrize(
    ("name", "metadata", "orchestrator", "managed", "source"),
    [
        ("web", OFF, "vcpupin", True, PinSource.CONFIG),
        ("db", OFF, "vcpupin", False, PinSource.METADATA),
        ("db", '<pinning mode="auto"/>', "vcpupin", True, PinSource.METADATA),
        ("db", None, "vcpupin", False, PinSource.ORCHESTRATOR),
        ("db", None, None, True, PinSource.DEFAULT),
    ],
)
def test_precedence(
    name: str, metadata: str | None, orchestrator: str | None, managed: bool, source: PinSource
) -> None:
    p = resolve(name=name, uuid=None, rules=RULES, metadata=metadata, orchestrator=orchestrator)
    assert (p.managed, p.source) == (managed, source)


def test_override_by_uuid_wins_over_name_and_hints_fall_through() -> None:
    uuid = "0985f6a8-1036-40de-931a-6c7b00a4ac43"
    rules = PinnabilityRules(overrides={uuid: Hints(Mode.OFF), "vm": Hints(Mode.AUTO)})
    p = resolve(name="vm", uuid=uuid.upper(), rules=rules, metadata=AUTO_HINTS)
    assert (p.managed, p.source) == (False, PinSource.CONFIG)
    assert p.whole_cores and p.latency_sensitive  # unset in the override: the metadata's


def test_rules_turn_defaults_around() -> None:
    rules = PinnabilityRules(default_managed=False, manage_orchestrator_pinned=True)
    assert not resolve(name="a", uuid=None, rules=rules).managed
    taken = resolve(name="a", uuid=None, rules=rules, orchestrator="vcpupin")
    assert (taken.managed, taken.source) == (True, PinSource.ORCHESTRATOR)


def test_hostile_metadata_gives_a_warning_and_the_default() -> None:
    p = resolve(name="a", uuid=None, rules=PinnabilityRules(), metadata=BILLION_LAUGHS)
    assert (p.managed, p.source) == (True, PinSource.DEFAULT)
    assert len(p.warnings) == 1 and "DOCTYPE" in p.warnings[0]


# --- fuzzing ---------------------------------------------------------------------------

hints = st.builds(Hints, st.sampled_from(Mode), st.none() | st.booleans(), st.none() | st.booleans())


@given(hints)
def test_metadata_round_trips(h: Hints) -> None:
    assert parse_metadata(metadata_xml(h)) == parse_metadata(metadata_xml(h))
    back = parse_metadata(metadata_xml(h)).hints
    assert back.mode is h.mode
    assert back.whole_cores == h.whole_cores
    assert back.latency_sensitive in (h.latency_sensitive, None if h.latency_sensitive is None else False)


@settings(max_examples=300)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_gives_a_decision_never_a_crash(text: str) -> None:
    p = resolve(name="a", uuid=None, rules=PinnabilityRules(default_managed=False), metadata=text)
    if p.source is PinSource.DEFAULT:
        assert not p.managed and p.warnings
    else:
        assert p.source is PinSource.METADATA


_attr = st.sampled_from(["mode", "whole-cores", "class", "x", "MODE"])
_xml_chars = st.characters(blacklist_categories=("Cs", "Cc"))  # what an XML attribute may hold
_val = st.sampled_from(["auto", "off", " AUTO ", "yes", "latency-sensitive", "", "Off"]) | st.text(
    _xml_chars, max_size=8
)


@settings(max_examples=300)
@given(st.dictionaries(_attr, _val, max_size=4), st.sampled_from(["pinning", "pin", "ap:pinning"]))
def test_mutated_elements_are_managed_only_when_they_say_auto(attrs: dict[str, str], tag: str) -> None:
    from xml.sax.saxutils import quoteattr

    ns = f' xmlns:ap="{NAMESPACE}"' if tag.startswith("ap:") else ""
    text = f"<{tag}{ns} " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + "/>"
    p = resolve(name="a", uuid=None, rules=PinnabilityRules(default_managed=False), metadata=text)
    says_auto = tag != "pin" and attrs.get("mode", "").strip().lower() == "auto"
    assert p.managed == says_auto
