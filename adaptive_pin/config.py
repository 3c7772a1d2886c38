"""The configuration file, ``/etc/adaptive-pin/config.toml``: read once, validated completely.

Every option is declared once, in :data:`SECTIONS` (TOML path, type, default, range, meaning).
The parser, ``adaptive-pin config show-defaults``, ``deploy/config.toml`` and the option
reference in ``docs/configuration.md`` are all made from that declaration (tests keep the two
files equal to what it renders), so they cannot drift apart.

Anything wrong in the file is one :class:`~adaptive_pin.errors.UsageError` (exit status 2)
naming the file and the key, e.g. ``config.toml: guard.cooldown_s: expected a number >= 0,
got "soon"``; never a traceback, never a silently ignored key.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import tomllib
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

from adaptive_pin.controller import ControllerSettings
from adaptive_pin.errors import UsageError
from adaptive_pin.guard import GuardSettings
from adaptive_pin.model import (
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    LLC_REFERENCES,
    CpuListError,
    CpuSet,
    Topology,
)
from adaptive_pin.verify import VerifySettings

log = logging.getLogger("adaptive_pin.config")

DEFAULT_PATH = Path("/etc/adaptive-pin/config.toml")
_FALLBACK_METRICS_PORT = 19650  # used only if adaptive_pin.metrics cannot be imported

DriverName = Literal["auto", "libvirt", "qemu", "sim"]
VmMode = Literal["auto", "off"]
LogFormat = Literal["journald", "plain"]


def _default_metrics_address() -> str:
    try:
        from adaptive_pin.metrics import DEFAULT_PORT
    except ImportError:  # pragma: no cover - metrics is part of the package
        return f"127.0.0.1:{_FALLBACK_METRICS_PORT}"
    return f"127.0.0.1:{DEFAULT_PORT}"


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


# --------------------------------------------------------------------------------------
# The typed configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostConfig:
    sysfs_root: Path = Path("/")
    reserved: CpuSet = field(default_factory=CpuSet)


@dataclass(frozen=True)
class DriverConfig:
    name: DriverName = "auto"
    libvirt_uri: str = "qemu:///system"
    scenario: str = ""
    qmp: Mapping[str, Path] = field(default_factory=_empty)  # VM name or UUID -> QMP socket


@dataclass(frozen=True)
class VmRule:
    """One ``[[pinnability.vm]]`` entry. Unset hints (None) fall through to the VM's metadata."""

    name: str | None = None
    uuid: str | None = None  # canonical lower-case form
    mode: VmMode = "auto"
    whole_cores: bool | None = None
    latency_sensitive: bool | None = None

    @property
    def key(self) -> str:
        return cast(str, self.uuid or self.name)


@dataclass(frozen=True)
class PinnabilityConfig:
    default: VmMode = "auto"
    manage_orchestrator_pinned: bool = False
    vm: tuple[VmRule, ...] = ()


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = ControllerSettings.interval_s
    dry_run: bool = ControllerSettings.dry_run
    half_life_s: float = ControllerSettings.half_life_s
    restore_on_exit: bool = True


@dataclass(frozen=True)
class CollectorsConfig:
    """Which counters are read, and how (a real host; the simulator has its own)."""

    perf: bool = True
    cycles_event: str = "cycles"
    instructions_event: str = "instructions"
    llc_misses_event: str = "cache-misses"
    llc_references_event: str = "cache-references"
    exclude_kernel: bool = False
    context_switches: bool = False
    last_cpu_every: int = 0

    def perf_events(self) -> dict[str, str]:
        """Model counter -> perf event name; an empty name leaves that counter out."""
        named = {
            CYCLES: self.cycles_event,
            INSTRUCTIONS: self.instructions_event,
            LLC_MISSES: self.llc_misses_event,
            LLC_REFERENCES: self.llc_references_event,
        }
        return {counter: event for counter, event in named.items() if event}


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "cache-aware"
    options: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = field(default_factory=_default_metrics_address)


@dataclass(frozen=True)
class DaemonConfig:
    state_file: Path = Path("/var/lib/adaptive-pin/state.json")
    lock_file: Path = Path("/run/adaptive-pin/adaptive-pin.lock")
    log_format: LogFormat = "journald"


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    pinnability: PinnabilityConfig = field(default_factory=PinnabilityConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    collectors: CollectorsConfig = field(default_factory=CollectorsConfig)
    guard: GuardSettings = field(default_factory=GuardSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: str = field(default="<defaults>", compare=False)  # file the values came from


# --------------------------------------------------------------------------------------
# Value checkers: each turns a TOML value into the typed value, or says what it expected
# --------------------------------------------------------------------------------------


class _KeyPathError(Exception):
    """One thing wrong, at one dotted key path; becomes ``<source>: <path>: <message>``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def _show(value: object) -> str:
    """A value the way the operator wrote it in TOML (short)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Check:
    """A scalar type: ``expected`` words the rule, ``convert`` applies it (ValueError if broken)."""

    expected = "a value"
    type_name = "value"

    def convert(self, value: object) -> object:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, value: object, path: str) -> object:
        try:
            return self.convert(value)
        except (TypeError, ValueError):
            raise _KeyPathError(path, f"expected {self.expected}, got {_show(value)}") from None


class Boolean(Check):
    expected = "true or false"
    type_name = "boolean"

    def convert(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise TypeError
        return value


INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Number(Check):
    minimum: float | None = None
    exclusive: bool = False  # minimum itself is not allowed
    integer: bool = False

    @property
    def type_name(self) -> str:  # type: ignore[override]
        return "integer" if self.integer else "number"

    @property
    def expected(self) -> str:  # type: ignore[override]
        what = "an integer" if self.integer else "a number"
        if self.minimum is None:
            return what
        bound = int(self.minimum) if self.integer else self.minimum
        return f"{what} {'>' if self.exclusive else '>='} {bound}"

    def convert(self, value: object) -> int | float:
        ok_types = (int,) if self.integer else (int, float)
        # bool is an int subclass; TOML true is not a number.
        if isinstance(value, bool) or not isinstance(value, ok_types):
            raise TypeError
        # TOML integers are 64-bit; tomllib reads any length, and a huge one overflows float().
        if abs(value) > INT64_MAX if isinstance(value, int) else not math.isfinite(value):
            raise ValueError
        if self.minimum is not None and (value < self.minimum or (self.exclusive and value == self.minimum)):
            raise ValueError
        return value if self.integer else float(value)


@dataclass(frozen=True)
class Text(Check):
    nonempty: bool = False
    type_name = "string"

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a non-empty string" if self.nonempty else "a string"

    def convert(self, value: object) -> str:
        if not isinstance(value, str) or (self.nonempty and not value.strip()):
            raise TypeError
        return value


@dataclass(frozen=True)
class Choice(Check):
    choices: tuple[str, ...]
    type_name = "string"

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(json.dumps(c) for c in self.choices)

    def convert(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError
        return value


class AbsolutePath(Check):
    expected = "an absolute path"
    type_name = "path"

    def convert(self, value: object) -> Path:
        if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
            raise TypeError
        return Path(value)


class CpuList(Check):
    expected = 'a cpulist such as "0-1,8"'
    type_name = "cpulist"

    def convert(self, value: object) -> CpuSet:
        if not isinstance(value, str):
            raise TypeError
        try:
            return CpuSet.parse(value)
        except CpuListError as exc:
            raise ValueError(str(exc)) from None


class Address(Check):
    expected = "HOST:PORT, an IPv6 host in brackets ([::1]:PORT)"
    type_name = "address"

    def convert(self, value: object) -> str:
        if not isinstance(value, str):
            raise TypeError
        from adaptive_pin.metrics import parse_address

        try:
            parse_address(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return value


class Uuid(Check):
    expected = 'a UUID such as "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10"'
    type_name = "uuid"

    def convert(self, value: object) -> str:
        if not isinstance(value, str):
            raise TypeError
        return str(uuidlib.UUID(value))


# --------------------------------------------------------------------------------------
# The declaration of every option
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    key: str
    check: Check
    doc: str
    example: object = None  # shown commented out when the default is "unset"


@dataclass(frozen=True)
class Section:
    name: str
    doc: str
    options: tuple[Option, ...]
    build: Callable[..., object]  # kwargs (option values and sub-tables) -> the section object
    subtables: tuple[str, ...] = ()  # handled by _SUBTABLES


_G, _V = GuardSettings(), VerifySettings()
_EVENT_DOC = (
    "perf's own name (see perf list), a raw rNNNN, or a CPU-specific name libpfm4 resolves; "
    '"" leaves the counter out.'
)

SECTIONS: tuple[Section, ...] = (
    Section(
        "host",
        "The machine adaptive-pin runs on.",
        (
            Option(
                "sysfs_root",
                AbsolutePath(),
                'Where to read the topology from: "/" on a real host, a copied tree for tests.',
            ),
            Option(
                "reserved",
                CpuList(),
                "CPUs kept for the host (housekeeping, I/O threads): never used for vCPUs. "
                "Must name CPUs this host has and leave at least one usable CPU.",
            ),
        ),
        HostConfig,
    ),
    Section(
        "driver",
        "How VMs are found and pinned.",
        (
            Option(
                "name",
                Choice(("auto", "libvirt", "qemu", "sim")),
                "auto: libvirt when its socket answers, else plain QEMU processes; "
                "sim: the built-in simulated host.",
            ),
            Option("libvirt_uri", Text(nonempty=True), "libvirt connection URI (libvirt driver)."),
            Option(
                "scenario",
                Text(),
                "sim driver only: the scenario to simulate (a built-in name or a file); "
                '"" picks the default scenario.',
            ),
        ),
        DriverConfig,
        ("qmp",),
    ),
    Section(
        "pinnability",
        "Which VMs adaptive-pin may move. Per VM, first that speaks wins: a [[pinnability.vm]] "
        "entry, the VM's own <metadata> element, its orchestrator's pinning, the default.",
        (
            Option("default", Choice(("auto", "off")), "For unmarked VMs: manage them (auto) or not (off)."),
            Option(
                "manage_orchestrator_pinned",
                Boolean(),
                "Take over VMs an orchestrator already pinned (e.g. Nova <vcpupin>).",
            ),
        ),
        PinnabilityConfig,
        ("vm",),
    ),
    Section(
        "controller",
        "The control loop.",
        (
            Option("interval_s", Number(0, exclusive=True), "Seconds between ticks."),
            Option("dry_run", Boolean(), "Decide and log moves, pin nothing."),
            Option(
                "half_life_s",
                Number(0, exclusive=True),
                "Half-life (s) of the moving average the policy sees rates through.",
            ),
            Option("restore_on_exit", Boolean(), "On exit, put every moved vCPU back where it was found."),
        ),
        ControllerConfig,
    ),
    Section(
        "collectors",
        "The counters sampled per vCPU thread on a real host: perf_event_open groups and /proc.",
        (
            Option("perf", Boolean(), "Open perf events at all (false: CPU time and cohesion only)."),
            Option("cycles_event", Text(), "Event counted as cycles: " + _EVENT_DOC),
            Option("instructions_event", Text(), "Event counted as instructions: " + _EVENT_DOC),
            Option("llc_misses_event", Text(), "Event counted as LLC misses: " + _EVENT_DOC),
            Option(
                "llc_references_event",
                Text(),
                "Event counted as LLC references (cache-aware weighs a vCPU's cache sensitivity by "
                "its hits, references minus misses): " + _EVENT_DOC,
            ),
            Option("exclude_kernel", Boolean(), "Count user space only (perf's :u), as paranoid 2 requires."),
            Option(
                "context_switches",
                Boolean(),
                "Also read voluntary/involuntary context switches from /proc (about 8 us per vCPU a round).",
            ),
            Option(
                "last_cpu_every",
                Number(0, integer=True),
                "0: take each vCPU's last CPU from the inventory, whose driver reads /proc stat for "
                "it every tick; N >= 1: the procfs collector also re-reads it every N rounds "
                "(about 5 us per vCPU each time).",
            ),
        ),
        CollectorsConfig,
    ),
    Section(
        "guard",
        "What stands between a policy's plan and the actuator: hysteresis, cooldowns, budget.",
        (
            Option(
                "hold_ticks",
                Number(1, integer=True),
                "A move must be proposed this many consecutive ticks before it happens.",
            ),
            Option(
                "cooldown_s",
                Number(0),
                "A moved vCPU is not moved again for this many seconds, unless the move gathers its "
                "VM, now split over several LLC domains or NUMA nodes, into one (after a VM leaves, "
                "say); the return window still applies.",
            ),
            Option(
                "return_window_s",
                Number(0),
                "A vCPU is not sent back to CPUs it left less than this many seconds ago.",
            ),
            Option(
                "budget_per_tick",
                Number(1, integer=True),
                "At most this many migrations per tick; first placements of vCPUs the controller never "
                "moved do not count (VMs arriving together are placed in one tick). A VM's moves, and "
                "the two VMs of a swap, are never cut in two: a VM larger than the budget moves alone.",
            ),
            Option(
                "min_gain", Number(), "Moves predicted to gain less than this are dropped (policy's unit)."
            ),
            Option(
                "memory_budget_per_tick",
                Number(0, integer=True),
                "At most this many VMs have their memory migrated per tick (each copies its resident "
                "memory, at a few GB/s); 0 never migrates memory. A VM's memory is migrated only when all "
                "its vCPUs run on the target nodes, not within cooldown_s of its last migration, never back "
                "to nodes it left less than return_window_s ago, and never when the VM binds its own "
                "memory (libvirt <numatune>, a memory policy set with numactl or QEMU host-nodes=).",
            ),
        ),
        GuardSettings,
    ),
    Section(
        "verify",
        "Did a move help? MPKI over a window before and after it; worse means roll back.",
        (
            Option("window_ticks", Number(1, integer=True), "Ticks of MPKI averaged on each side of a move."),
            Option(
                "settle_ticks",
                Number(0, integer=True),
                "Ticks after a move not counted (caches refill, averages catch up).",
            ),
            Option(
                "rollback_margin",
                Number(0),
                "Roll back when after/before MPKI exceeds 1 + this (0.10: 10% worse).",
            ),
            Option(
                "min_mpki_delta",
                Number(0),
                "...and MPKI rose by at least this much (noise at tiny MPKI is no regression).",
            ),
            Option(
                "bad_placement_ttl_s",
                Number(0),
                "Seconds a rolled-back placement is not proposed again.",
            ),
        ),
        VerifySettings,
    ),
    Section(
        "policy",
        "The placement policy; [policy.options] are passed to it and checked by it at load.",
        (Option("name", Text(nonempty=True), "Policy name (see `adaptive-pin plan --list-policies`)."),),
        PolicyConfig,
        ("options",),
    ),
    Section(
        "metrics",
        "The Prometheus exporter.",
        (
            Option("enabled", Boolean(), "Serve /metrics."),
            Option("address", Address(), "Listen address HOST:PORT ([::1]:PORT for IPv6, port 0: any free)."),
        ),
        MetricsConfig,
    ),
    Section(
        "daemon",
        "Files and logging of `adaptive-pin run`.",
        (
            Option(
                "state_file",
                AbsolutePath(),
                "Saved state (original affinities, guard history, policy memory), written atomically.",
            ),
            Option("lock_file", AbsolutePath(), "Single-instance lock; holds the running daemon's pid."),
            Option(
                "log_format",
                Choice(("journald", "plain")),
                "journald: syslog priority prefixes, no timestamps (the journal adds them); "
                "plain: timestamped lines for a terminal.",
            ),
        ),
        DaemonConfig,
    ),
)

_SECTIONS = {s.name: s for s in SECTIONS}

VM_OPTIONS: tuple[Option, ...] = (
    Option("name", Text(nonempty=True), "The VM's name (libvirt domain name, QEMU -name).", "db1"),
    Option("uuid", Uuid(), "The VM's UUID; matched before names (names can be reused).", None),
    Option("mode", Choice(("auto", "off")), "auto: manage this VM; off: leave it alone.", "auto"),
    Option("whole_cores", Boolean(), "Give the VM whole cores: no other VM on its SMT siblings.", True),
    Option("latency_sensitive", Boolean(), "Ask the policy to move it as rarely as possible.", False),
)
_VM_CHECKS = {o.key: o for o in VM_OPTIONS}


# --------------------------------------------------------------------------------------
# Raw TOML dict -> Config
# --------------------------------------------------------------------------------------


def _unknown(path: str, key: str, known: list[str]) -> _KeyPathError:
    close = difflib.get_close_matches(key, known, n=1)
    what = "key" if path else "section"
    hint = f"did you mean {close[0]}?" if close else f"known {what}s: " + ", ".join(sorted(known))
    return _KeyPathError(f"{path}{key}", f"unknown {what} ({hint})")


def _table(value: object, path: str, header: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _KeyPathError(path, f"expected a table ({header}), got {_show(value)}")
    return value


def _qmp(value: object) -> Mapping[str, Path]:
    table = _table(value, "driver.qmp", "[driver.qmp]")
    out: dict[str, Path] = {}
    for vm, sock in table.items():
        out[vm] = cast(Path, AbsolutePath()(sock, f"driver.qmp.{_key(vm)}"))
    return MappingProxyType(out)


def _vm_rules(value: object) -> tuple[VmRule, ...]:
    if not isinstance(value, list):
        raise _KeyPathError("pinnability.vm", f"expected [[pinnability.vm]] tables, got {_show(value)}")
    rules: list[VmRule] = []
    seen: dict[str, str] = {}  # "name X" / "uuid Y" -> path of the entry that named it
    for i, entry in enumerate(value):
        path = f"pinnability.vm[{i}]"
        table = _table(entry, path, "[[pinnability.vm]]")
        kwargs: dict[str, Any] = {}
        for key, raw in table.items():
            if key not in _VM_CHECKS:
                raise _unknown(f"{path}.", key, list(_VM_CHECKS))
            kwargs[key] = _VM_CHECKS[key].check(raw, f"{path}.{key}")
        if ("name" in kwargs) == ("uuid" in kwargs):
            raise _KeyPathError(path, "give exactly one of name or uuid")
        which = "uuid" if "uuid" in kwargs else "name"
        ident = f"{which} {kwargs[which]}"
        if ident in seen:
            raise _KeyPathError(
                f"{path}.{which}", f"{_show(kwargs[which])} is already configured by {seen[ident]}"
            )
        seen[ident] = path
        rules.append(VmRule(**kwargs))
    return tuple(rules)


def _free(value: object, path: str) -> Any:
    """A policy option value: plain JSON-like TOML only (it is logged and may be persisted)."""
    if isinstance(value, dict):
        return MappingProxyType({k: _free(v, f"{path}.{_key(k)}") for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_free(v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise _KeyPathError(path, f"expected a finite number, got {_show(value)}")
    if isinstance(value, str | int | float | bool):
        return value
    raise _KeyPathError(path, f"dates and times are not supported here, got {_show(value)}")


def _options(value: object) -> Mapping[str, Any]:
    table = _table(value, "policy.options", "[policy.options]")
    return cast(Mapping[str, Any], _free(table, "policy.options"))


_SUBTABLES: dict[str, Callable[[object], object]] = {
    "driver.qmp": _qmp,
    "pinnability.vm": _vm_rules,
    "policy.options": _options,
}


def _build(raw: Mapping[str, object], source: str) -> Config:
    sections: dict[str, object] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise _unknown("", name, list(_SECTIONS))
        sec = _SECTIONS[name]
        table = _table(value, name, f"[{name}]")
        checks = {o.key: o.check for o in sec.options}
        kwargs: dict[str, Any] = {}
        for key, item in table.items():
            if key in checks:
                kwargs[key] = checks[key](item, f"{name}.{key}")
            elif key in sec.subtables:
                kwargs[key] = _SUBTABLES[f"{name}.{key}"](item)
            else:
                raise _unknown(f"{name}.", key, [*checks, *sec.subtables])
        sections[name] = sec.build(**kwargs)
    config = Config(**cast(dict[str, Any], sections), source=source)
    # The settings' own checks too, so a rule added there cannot be missed here.
    for name in ("guard", "verify"):
        try:
            getattr(config, name).validate()
        except ValueError as exc:
            raise _KeyPathError(name, str(exc)) from None
    _check_policy(config.policy)
    return config


def _check_policy(policy: PolicyConfig) -> None:
    """Let the policy registry judge the name, then the options (when the registry loads)."""
    try:
        from policies.registry import get_policy

        try:
            get_policy(policy.name)
        except UsageError as exc:
            raise _KeyPathError("policy.name", str(exc)) from None
        try:
            get_policy(policy.name, **_plain(policy.options))
        except UsageError as exc:
            raise _KeyPathError("policy.options", str(exc)) from None
        except Exception as exc:  # a plug-in's constructor may raise anything for bad options
            raise _KeyPathError(
                "policy.options", f"policy {policy.name}: {type(exc).__name__}: {exc}"
            ) from None
    except ImportError as exc:  # registry or a policy module missing: the run command will say so
        log.debug("policy %s not checked: %s", policy.name, exc)


def _syntax_error(exc: tomllib.TOMLDecodeError) -> str:
    text = str(exc)
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", text, re.S)
    if m:
        return f"line {m.group(2)}, column {m.group(3)}: invalid TOML: {m.group(1)}"
    m = re.fullmatch(r"(.*) \(at end of document\)", text, re.S)
    if m:
        return f"at the end of the file: invalid TOML: {m.group(1)}"
    return f"invalid TOML: {text}"


def parse_config(text: str, source_name: str = "config.toml") -> Config:
    """Parse and validate the text of a config file; ``source_name`` prefixes every error."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source_name}: {_syntax_error(exc)}") from None
    return _from_raw(raw, source_name)


def _from_raw(raw: Mapping[str, object], source: str) -> Config:
    try:
        return _build(raw, source)
    except _KeyPathError as p:
        raise UsageError(f"{source}: {p.path}: {p.message}") from None


def load_config(path: str | Path | None = None) -> Config:
    """Read a config file. ``None``: the default file, or all defaults when it does not exist
    (the daemon needs no file); a file named explicitly must exist."""
    explicit = path is not None
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{p}: no such file") from None
        return Config()
    except OSError as exc:
        raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, str(p))


# --------------------------------------------------------------------------------------
# Against the host, overrides, conversions
# --------------------------------------------------------------------------------------


def validate_against(config: Config, topology: Topology) -> Topology:
    """Check the CPU numbers in ``config`` against a host; return the topology with
    ``host.reserved`` applied. Reserving isolated or cgroup-disallowed CPUs is fine (they
    are unusable anyway); reserving CPUs the host lacks, or every usable one, is not."""
    reserved = config.host.reserved
    where = f"{config.source}: host.reserved"
    known = topology.online | topology.offline
    absent = reserved - known
    if absent:
        raise UsageError(
            f"{where}: names CPUs this host does not have: {absent.to_list()} (it has {known.to_list()})"
        )
    applied = topology.with_reserved(reserved)
    if not applied.usable:
        before = topology.with_reserved(CpuSet()).usable
        raise UsageError(
            f"{where}: {_show(reserved.to_list())} leaves no CPU for vCPUs "
            f"(usable without it: {before.to_list() or 'none'})"
        )
    return applied


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def with_overrides(config: Config, source: str = "command line", /, **dotted_keys: object) -> Config:
    """``config`` with options replaced, e.g. ``with_overrides(c, **{"controller.dry_run": True})``.

    Flags override the file: each value is validated exactly as in the file (errors name
    ``source`` and the key). ``None`` means "flag not given" and changes nothing, so argparse
    results can be passed straight through. CpuSet and Path values are accepted as such.
    """
    raw = to_dict(config)
    for dotted, given in dotted_keys.items():
        if given is None:
            continue
        value = _plain(given)
        parts = dotted.split(".")
        node: dict[str, Any] = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"{source}: {dotted}: {part} is not a table")
            node = child
        node[parts[-1]] = value
    merged = _from_raw(raw, source)
    return replace(merged, source=config.source if merged == config else f"{config.source} + {source}")


def controller_settings(config: Config) -> ControllerSettings:
    c = config.controller
    return ControllerSettings(
        interval_s=c.interval_s,
        dry_run=c.dry_run,
        half_life_s=c.half_life_s,
        guard=config.guard,
        verify=config.verify,
    )


def guard_settings(config: Config) -> GuardSettings:
    return config.guard


def verify_settings(config: Config) -> VerifySettings:
    return config.verify


def pinnability_rules(config: Config) -> Any:
    """The :class:`adaptive_pin.pinnability.PinnabilityRules` this config describes."""
    from adaptive_pin.pinnability import Hints, Mode, PinnabilityRules

    p = config.pinnability
    return PinnabilityRules(
        default_managed=p.default == "auto",
        manage_orchestrator_pinned=p.manage_orchestrator_pinned,
        overrides={r.key: Hints(Mode(r.mode), r.whole_cores, r.latency_sensitive) for r in p.vm},
    )


def policy_options(config: Config) -> dict[str, Any]:
    """``[policy.options]`` as plain dicts and lists, ready for ``get_policy(name, **options)``."""
    options: dict[str, Any] = _plain(config.policy.options)
    return options


def metrics_listen(config: Config) -> tuple[str, int]:
    """``metrics.address`` as (host, port) for the exporter."""
    from adaptive_pin.metrics import parse_address

    return parse_address(config.metrics.address, "metrics.address")


# --------------------------------------------------------------------------------------
# Config -> plain data, TOML, Markdown
# --------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Typed values -> TOML/JSON values (Paths and CpuSets as strings, no None)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, CpuSet):
        return value.to_list()
    if isinstance(value, Path):
        return str(value)
    return value


def to_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data (what ``config check --json`` prints)."""
    out: dict[str, Any] = {}
    for sec in SECTIONS:
        obj = getattr(config, sec.name)
        known = {o.key for o in sec.options} | set(sec.subtables)
        table = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name in known}
        if sec.name == "pinnability":
            table["vm"] = [asdict(r) for r in config.pinnability.vm]
        out[sec.name] = _plain(table)
    return out


def _toml_str(s: str) -> str:
    def esc(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\u{ord(ch):04x}")
        return ch

    return '"' + "".join(esc(c) for c in s) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML spelling for {value!r}")


def _comment(text: str, width: int = 96) -> Iterator[str]:
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            yield line
            line = "#"
        line += " " + word
    yield line


def _typed_doc(opt: Option) -> str:
    rule = opt.check.expected
    return f"{opt.doc} ({rule})"


DEFAULTS_HEADER = """\
# adaptive-pin configuration: /etc/adaptive-pin/config.toml
#
# Every option, set to its default. Delete what you do not change: a missing key means its
# default, an unknown key is an error. Check a file with `adaptive-pin config check FILE`.
# Generated by `adaptive-pin config show-defaults`; docs/configuration.md explains more."""


def render_toml(config: Config | None = None, *, comments: bool = True) -> str:
    """``config`` (defaults when None) as TOML; with ``comments``, every option documented."""
    cfg = config or Config()
    data = to_dict(cfg)
    out: list[str] = [DEFAULTS_HEADER, ""] if comments else []
    for sec in SECTIONS:
        table = data[sec.name]
        if comments:
            out.extend(_comment(f"[{sec.name}] {sec.doc}"))
        out.append(f"[{sec.name}]")
        for opt in sec.options:
            if comments:
                out.extend(_comment(_typed_doc(opt)))
            out.append(f"{opt.key} = {toml_value(table[opt.key])}")
        out.append("")
        for sub in sec.subtables:
            out.extend(_render_subtable(sec.name, sub, table[sub], comments))
    return "\n".join(out).rstrip("\n") + "\n"


def _render_subtable(section: str, sub: str, value: Any, comments: bool) -> list[str]:
    path = f"{section}.{sub}"
    out: list[str] = []
    if path == "pinnability.vm":
        if comments:
            out.extend(
                _comment(
                    "Per-VM overrides: one [[pinnability.vm]] table each, naming the VM by name or "
                    "by uuid (exactly one; a VM named twice is an error). Hints left out fall "
                    "through to the VM's metadata. Keys:"
                )
            )
            for opt in VM_OPTIONS:
                out.extend(_comment(f"  {opt.key}: {_typed_doc(opt)}"))
            if not value:
                out.extend(["# [[pinnability.vm]]", '# name = "db1"', '# mode = "off"', ""])
        for rule in value:
            out.append("[[pinnability.vm]]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in rule.items())
            out.append("")
        return out
    if comments:
        doc = {
            "driver.qmp": "qemu driver: QMP sockets of QEMU processes, VM name (or UUID) = socket path; "
            "without one, vCPU threads are found by their names (needs debug-threads=on).",
            "policy.options": "Options for the policy named above (each policy documents its own).",
        }[path]
        out.extend(_comment(doc))
    out.append(f"[{path}]")
    if comments and not value and path == "driver.qmp":
        out.append('# web1 = "/run/qemu/web1.qmp"')
    out.extend(f"{_key(k)} = {toml_value(v)}" for k, v in value.items())
    out.append("")
    return out


def render_markdown() -> str:
    """The option reference of docs/configuration.md (between its GENERATED markers)."""
    defaults = to_dict(Config())
    out: list[str] = []

    def md(text: str) -> str:  # <metadata> would be read as an HTML tag
        return re.sub(r"(<[^<>\s]+>)", r"`\1`", text)

    def row(key: str, opt: Option, default: str) -> str:
        return (
            f"| `{key}` | {opt.check.type_name} | {default} | {md(opt.doc)} Must be {opt.check.expected}. |"
        )

    for sec in SECTIONS:
        out += [
            f"### `[{sec.name}]`",
            "",
            md(sec.doc),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for opt in sec.options:
            out.append(row(opt.key, opt, f"`{toml_value(defaults[sec.name][opt.key])}`"))
        for sub in sec.subtables:
            path = f"{sec.name}.{sub}"
            if path == "pinnability.vm":
                for opt in VM_OPTIONS:
                    out.append(row(f"vm[].{opt.key}", opt, "unset"))
            elif path == "driver.qmp":
                out.append(
                    "| `qmp.<VM>` | path | none | QMP socket of a plain-QEMU VM (driver name `qemu`). |"
                )
            else:
                out.append(
                    "| `options.<key>` | any | none | Passed to the policy, which checks them at load. |"
                )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
