"""Whether, and how, a VM may be managed: its own metadata, the operator's rules, its orchestrator.

Precedence, first that speaks wins: a config override (by VM name or UUID) > the VM's
``<metadata>`` element > an orchestrator's pinning (``<cputune><vcpupin>``) > the default.
The metadata format is documented in docs/pinnability.md. Metadata is written by whoever
may edit the domain XML, so it is parsed defensively: no DTD, no entities, bounded size and
depth; a bad element costs that VM a warning and the default, never the controller a crash.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

from adaptive_pin.model import Pinnability, PinSource

NAMESPACE = "urn:adaptive-pin:pinning:1"
ELEMENT = "pinning"
PREFIX = "adaptive-pin"  # the key libvirt's setMetadata wants; readers must not rely on it
MAX_METADATA_BYTES = 4096
MAX_DOMAIN_XML_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64


class Mode(enum.StrEnum):
    AUTO = "auto"  # adaptive-pin may move this VM's vCPUs
    OFF = "off"  # leave it alone


class LatencyClass(enum.StrEnum):
    DEFAULT = "default"
    LATENCY_SENSITIVE = "latency-sensitive"


class UnsafeXmlError(ValueError):
    """XML that is malformed, too large, too deep, or declares a DTD or entities."""


class MetadataError(ValueError):
    """A pinning element that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Hints:
    """What a VM or an override asks for. ``None`` hints are unset (the next source may set them)."""

    mode: Mode
    whole_cores: bool | None = None
    latency_sensitive: bool | None = None


@dataclass(frozen=True)
class PinnabilityRules:
    """The operator's say, populated from the config file."""

    default_managed: bool = True
    manage_orchestrator_pinned: bool = False  # take over VMs an orchestrator pinned, unless they opt out
    overrides: Mapping[str, Hints] = field(default_factory=dict)  # VM name or UUID -> what to do

    def override_for(self, name: str, uuid: str | None) -> tuple[str, Hints] | None:
        """The override naming this VM: UUID before name (names can be reused, UUIDs not)."""
        for key in (uuid, uuid.lower() if uuid else None, name):
            if key is not None and key in self.overrides:
                return key, self.overrides[key]
        return None


# --------------------------------------------------------------------------------------
# Safe XML
# --------------------------------------------------------------------------------------


def parse_xml_safely(text: str | bytes, *, max_bytes: int, what: str) -> ET.Element:
    """Parse ``text`` into an Element, refusing DTDs, entity declarations and external entities.

    Driven through expat directly so a DOCTYPE is refused the moment it starts, before any
    entity could be declared, let alone expanded. ``what`` names the input in error messages.
    """
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > max_bytes:
        raise UnsafeXmlError(f"{what}: {len(raw)} bytes, over the {max_bytes}-byte limit")

    def refuse(kind: str) -> None:
        raise UnsafeXmlError(f"{what}: {kind} declarations are not allowed")

    builder = ET.TreeBuilder()
    depth = 0

    def qname(name: str) -> str:
        uri, sep, local = name.rpartition("\x1f")
        return f"{{{uri}}}{local}" if sep else name

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise UnsafeXmlError(f"{what}: nested deeper than {MAX_DEPTH} elements")
        builder.start(qname(name), {qname(k): v for k, v in attrs.items()})

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(qname(name))

    parser = expat.ParserCreate(namespace_separator="\x1f")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = lambda *_: refuse("DOCTYPE")
    parser.EntityDeclHandler = lambda *_: refuse("ENTITY")
    parser.UnparsedEntityDeclHandler = lambda *_: refuse("ENTITY")
    parser.ExternalEntityRefHandler = lambda *_: refuse("external entity")  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(raw, True)
    except expat.ExpatError as exc:
        raise UnsafeXmlError(f"{what}: not well-formed XML ({expat.errors.messages[exc.code]})") from None
    return builder.close()


# --------------------------------------------------------------------------------------
# The metadata element
# --------------------------------------------------------------------------------------

_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class ParsedMetadata:
    hints: Hints
    warnings: tuple[str, ...] = ()  # parts that were ignored, in words


def parse_metadata(text: str) -> ParsedMetadata:
    """Read a ``<pinning mode="auto|off" whole-cores="yes|no" class="..."/>`` element.

    libvirt returns the element with its namespace stripped; an element carrying a namespace
    must carry ours. A missing or unknown ``mode`` makes the whole element unusable
    (:class:`MetadataError`): guessing would either manage a VM that opted out or the reverse.
    A bad hint is ignored with a warning and the rest of the element still counts.
    """
    try:
        root = parse_xml_safely(text, max_bytes=MAX_METADATA_BYTES, what="pinning metadata")
    except UnsafeXmlError as exc:
        raise MetadataError(str(exc)) from None
    if root.tag not in (ELEMENT, f"{{{NAMESPACE}}}{ELEMENT}"):
        raise MetadataError(f"pinning metadata: root element is <{root.tag}>, expected <{ELEMENT}>")
    attrs = {k.rpartition("}")[2]: v.strip() for k, v in root.attrib.items()}
    mode_text = attrs.pop("mode", None)
    if mode_text is None:
        raise MetadataError('pinning metadata: no mode attribute (mode="auto" or mode="off")')
    try:
        mode = Mode(mode_text.lower())
    except ValueError:
        raise MetadataError(
            f'pinning metadata: mode={mode_text[:40]!r} is neither "auto" nor "off"'
        ) from None

    warnings: list[str] = []
    whole_cores: bool | None = None
    if (wc := attrs.pop("whole-cores", None)) is not None:
        whole_cores = _YES.get(wc.lower())
        if whole_cores is None:
            warnings.append(f"pinning metadata: whole-cores={wc[:40]!r} is not yes/no; ignored")
    latency: bool | None = None
    if (cls := attrs.pop("class", None)) is not None:
        try:
            latency = LatencyClass(cls.lower()) is LatencyClass.LATENCY_SENSITIVE
        except ValueError:
            choices = " or ".join(f'"{c}"' for c in LatencyClass)
            warnings.append(f"pinning metadata: class={cls[:40]!r} is not {choices}; ignored")
    warnings.extend(f"pinning metadata: unknown attribute {k[:40]!r} ignored" for k in sorted(attrs))
    if len(root):
        warnings.append("pinning metadata: child elements ignored")
    return ParsedMetadata(Hints(mode, whole_cores, latency), tuple(warnings))


def metadata_xml(hints: Hints) -> str:
    """The element, in its namespace: for a domain's ``<metadata>`` or libvirt's setMetadata
    (key :data:`PREFIX`, uri :data:`NAMESPACE`)."""
    attrs = {"xmlns": NAMESPACE, "mode": hints.mode.value}
    if hints.whole_cores is not None:
        attrs["whole-cores"] = "yes" if hints.whole_cores else "no"
    if hints.latency_sensitive is not None:
        cls = LatencyClass.LATENCY_SENSITIVE if hints.latency_sensitive else LatencyClass.DEFAULT
        attrs["class"] = cls.value
    return f"<{ELEMENT} " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + "/>"


# --------------------------------------------------------------------------------------
# Deciding
# --------------------------------------------------------------------------------------


def resolve(
    *,
    name: str,
    uuid: str | None,
    rules: PinnabilityRules,
    metadata: str | None = None,
    orchestrator: str | None = None,
) -> Pinnability:
    """Decide a VM's pinnability.

    ``metadata`` is the VM's pinning element as text (None: it has none); ``orchestrator``
    says in words who already manages its placement (None: nobody), e.g.
    ``"<cputune><vcpupin> in the domain XML"``.
    """
    warnings: list[str] = []
    meta: Hints | None = None
    if metadata is not None:
        try:
            parsed = parse_metadata(metadata)
        except MetadataError as exc:
            warnings.append(f"{exc}; element ignored")
        else:
            meta = parsed.hints
            warnings.extend(parsed.warnings)

    # Hints a higher source leaves unset fall through to the metadata.
    def hint(over: bool | None, attr: str) -> bool:
        if over is not None:
            return over
        value = getattr(meta, attr, None) if meta is not None else None
        return bool(value)

    found = rules.override_for(name, uuid)
    if found is not None:
        key, over = found
        return Pinnability(
            managed=over.mode is Mode.AUTO,
            source=PinSource.CONFIG,
            reason=f"config override for {key!r}: mode {over.mode.value}",
            whole_cores=hint(over.whole_cores, "whole_cores"),
            latency_sensitive=hint(over.latency_sensitive, "latency_sensitive"),
            warnings=tuple(warnings),
        )
    if meta is not None:
        return Pinnability(
            managed=meta.mode is Mode.AUTO,
            source=PinSource.METADATA,
            reason=f"VM metadata: mode {meta.mode.value}",
            whole_cores=bool(meta.whole_cores),
            latency_sensitive=bool(meta.latency_sensitive),
            warnings=tuple(warnings),
        )
    if orchestrator is not None:
        managed = rules.manage_orchestrator_pinned
        verb = "taken over" if managed else "left alone"
        return Pinnability(
            managed=managed,
            source=PinSource.ORCHESTRATOR,
            reason=f"already placed by its orchestrator ({orchestrator}): {verb}",
            warnings=tuple(warnings),
        )
    return Pinnability(
        managed=rules.default_managed,
        source=PinSource.DEFAULT,
        reason="unmarked: default " + ("managed" if rules.default_managed else "unmanaged"),
        warnings=tuple(warnings),
    )
