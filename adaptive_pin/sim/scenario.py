"""Scenario files: TOML describing a host, a workload mix and VMs over time (scenarios/README.md).

Every problem is one :class:`UsageError` line naming the file and the key path, e.g.
``demo.toml: vms[2].vcpus: expected a positive integer, got "x"``.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuListError, CpuSet
from adaptive_pin.sim import constants
from adaptive_pin.sim.workloads import (
    CLASS_BASE_CPI,
    Workload,
    load_curves,
    make_workload,
    parse_size,
)

# Shipped scenarios live in scenarios/ at the top of the source tree, reached through the package
# data link adaptive_pin/data/scenarios (so an installed wheel has them too): `simulate demo`
# finds scenarios/demo.toml.
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "data" / "scenarios"
PIN_MODES = ("auto", "off")
MAX_TICKS = 100_000  # a run's length in ticks, from the file or from --duration


@dataclass(frozen=True)
class SyntheticHost:
    """A regular host built without sysfs (tests, teaching): packages x LLCs x cores x threads."""

    packages: int = 1
    llc_per_package: int = 1
    cores_per_llc: int = 4
    threads_per_core: int = 1
    llc_mib: float = 16.0
    remote_distance: int = 21  # SLIT distance between packages (each package one NUMA node)


@dataclass(frozen=True)
class HostSpec:
    topology: str | None  # fixture name or sysfs tree path; None with ``synthetic``
    reserved: CpuSet = field(default_factory=CpuSet)
    llc_mib: float | None = None  # override every LLC domain's size
    ghz: float | None = None  # override the clock read from proc/cpuinfo
    synthetic: SyntheticHost | None = None
    # A relative ``topology`` path is relative to the scenario file's directory (as ``curves``
    # are); ``origin`` names that file in host errors. None/"": the current directory, no name.
    base_dir: Path | None = None
    origin: str = ""


@dataclass(frozen=True)
class Phase:
    at: float
    workload: str
    load: float | None = None


@dataclass(frozen=True)
class VmSpec:
    name: str
    vcpus: int
    workload: str
    start: float = 0.0
    stop: float | None = None
    load: float = 1.0  # CPU demand of each vCPU, 0..1
    pinning: str = "auto"
    pinned_cpus: CpuSet | None = None  # orchestrator-pinned (e.g. Nova <vcpupin>)
    memory_nodes: CpuSet | None = None  # None: first touch (node of the first vCPU's CPU)
    memory_mib: int = constants.DEFAULT_MEMORY_MIB  # guest RAM: what a memory migration copies
    whole_cores: bool = False
    latency_sensitive: bool = False
    phases: tuple[Phase, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    origin: str  # file it came from, for messages
    description: str
    duration: float
    tick: float
    seed: int
    host: HostSpec
    workloads: Mapping[str, Workload]
    vms: tuple[VmSpec, ...]
    controller: Mapping[str, Any] = field(default_factory=dict)  # ControllerSettings keywords (raw)

    @property
    def vcpu_count(self) -> int:
        return sum(v.vcpus for v in self.vms)


# --- small typed readers, each naming the key path ---------------------------------------


def _show(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):  # pragma: no cover - json handles every TOML type
        return repr(value)


def _finite(value: Any) -> bool:
    """A TOML/Python number that is a finite float (ints beyond float range are not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits
        return False


class _Reader:
    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, path: str, what: str, value: Any = ...) -> UsageError:
        got = "" if value is ... else f", got {_show(value)}"
        return UsageError(f"{self.origin}: {path}: {what}{got}")

    def table(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "expected a table", value)
        return value

    def keys(self, t: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for k in t:
            if k not in allowed:
                where = f"{path}.{k}" if path else k
                raise self.fail(where, f"unknown key (known: {', '.join(sorted(allowed))})")

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, "expected a non-empty string", value)
        return value

    def number(self, value: Any, path: str, *, positive: bool = False, at_most: float | None = None) -> float:
        ok = _finite(value)
        if ok and positive:
            ok = value > 0
        elif ok:
            ok = value >= 0
        if ok and at_most is not None:
            ok = value <= at_most
        if not ok:
            kind = "a positive number" if positive else "a non-negative number"
            if at_most is not None:
                kind += f" at most {at_most:g}"
            raise self.fail(path, f"expected {kind}", value)
        return float(value)

    def integer(self, value: Any, path: str, *, positive: bool = True) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if positive else 0):
            kind = "a positive integer" if positive else "a non-negative integer"
            raise self.fail(path, f"expected {kind}", value)
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "expected true or false", value)
        return value

    def cpulist(self, value: Any, path: str) -> CpuSet:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return CpuSet.of(value)
        if not isinstance(value, str):
            raise self.fail(path, 'expected a cpulist string such as "0-3,8"', value)
        try:
            return CpuSet.parse(value)
        except CpuListError as exc:
            raise self.fail(path, str(exc)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file (a path, or the name of a shipped scenario)."""
    p = resolve_scenario_path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
    # Messages name the file as the operator gave it; a shipped scenario by its file name.
    origin = str(path) if p == Path(path) else p.name
    return loads_scenario(raw, origin=origin, base_dir=p.parent, default_name=p.stem)


def resolve_scenario_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists() or p.suffix or "/" in str(path):
        return p
    shipped = SCENARIO_DIR / f"{p.name}.toml"
    if shipped.exists():
        return shipped
    known = ", ".join(shipped_scenarios()) or "none found"
    raise UsageError(f"{path}: no such scenario file or shipped scenario (shipped: {known})")


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")) if SCENARIO_DIR.is_dir() else []


def loads_scenario(
    raw: bytes | str,
    origin: str = "scenario.toml",
    base_dir: Path | None = None,
    default_name: str = "scenario",
) -> Scenario:
    """Parse scenario text; any problem -> UsageError naming ``origin`` and the key."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{origin}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin}: not valid TOML: {exc}") from None
    return parse_scenario(data, origin, base_dir or Path.cwd(), default_name)


_TOP = {"name", "description", "duration", "tick", "seed", "host", "controller", "curves", "workloads", "vms"}
_HOST = {"topology", "reserved", "llc_mib", "ghz", "synthetic"}
_SYNTH = {"packages", "llc_per_package", "cores_per_llc", "threads_per_core", "llc_mib", "remote_distance"}
_WORKLOAD = {"from", "mpki", "llc_accesses_pki", "class", "base_cpi", "mlp", "shared_fraction"}
_VM = {
    "name", "count", "vcpus", "workload", "start", "stop", "load", "pinning", "pinned_cpus",
    "memory_nodes", "memory_mib", "whole_cores", "latency_sensitive", "phases",
}  # fmt: skip
_PHASE = {"at", "workload", "load"}


def parse_scenario(data: Mapping[str, Any], origin: str, base_dir: Path, default_name: str) -> Scenario:
    r = _Reader(origin)
    r.keys(data, "", _TOP)
    name = r.string(data["name"], "name") if "name" in data else default_name
    description = data.get("description", "")
    if not isinstance(description, str):
        raise r.fail("description", "expected a string", description)
    duration = r.number(data.get("duration", 60.0), "duration", positive=True)
    tick = r.number(data.get("tick", 1.0), "tick", positive=True)
    if tick > duration:
        raise r.fail("tick", f"must not exceed duration ({duration:g} s)", tick)
    check_duration(duration, tick, f"{origin}: duration")
    seed = check_seed(data.get("seed", 0), f"{origin}: seed")

    host = _host(r, data.get("host"), base_dir)
    controller = check_controller(data.get("controller", {}), f"{origin}: controller")
    workloads = _workloads(r, data, base_dir)
    vms = _vms(r, data.get("vms"), workloads)
    used = {v.workload for v in vms} | {p.workload for v in vms for p in v.phases}
    return Scenario(
        name=name,
        origin=origin,
        description=description,
        duration=duration,
        tick=tick,
        seed=seed,
        host=host,
        workloads={k: w for k, w in workloads.items() if k in used},
        vms=vms,
        controller=controller,
    )


# --- rules shared by the file and by the overrides of a run (--seed, --duration, controller=) ---


def _shown(value: Any) -> str:
    if isinstance(value, float) and (not math.isfinite(value) or value.is_integer()):
        return f"{value:g}"  # inf, nan, -1, 1e+09: as TOML and the command line write them
    return _show(value)


def check_duration(value: Any, tick: float, where: str) -> float:
    """A run's length in seconds: finite, at least one ``tick`` and at most MAX_TICKS ticks.

    The one rule for the file's ``duration`` and for ``--duration``/``run_scenario(duration=)``;
    ``where`` prefixes the message (``demo.toml: duration``, ``--duration``).
    """
    if not _finite(value) or not value > 0:
        raise UsageError(f"{where}: expected a positive number, got {_shown(value)}")
    if value < tick:
        raise UsageError(f"{where}: shorter than one tick ({tick:g} s), got {_shown(value)}")
    if value / tick > MAX_TICKS:
        raise UsageError(f"{where}: more than {MAX_TICKS} ticks of {tick:g} s, got {_shown(value)}")
    return float(value)


def check_seed(value: Any, where: str) -> int:
    """The RNG seed: a non-negative integer (numpy's default_rng refuses negative ones)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"{where}: expected a non-negative integer, got {_shown(value)}")
    return value


def with_run_overrides(
    sc: Scenario,
    *,
    seed: Any = None,
    duration: Any = None,
    seed_key: str = "seed",
    duration_key: str = "duration",
) -> Scenario:
    """``sc`` with its seed and/or duration replaced (None: keep), checked as in the file.

    Errors are prefixed by ``seed_key``/``duration_key`` (the CLI passes its flag names).
    """
    if seed is None and duration is None:
        return sc
    return replace(
        sc,
        seed=sc.seed if seed is None else check_seed(seed, seed_key),
        duration=sc.duration if duration is None else check_duration(duration, sc.tick, duration_key),
    )


def check_controller(value: Any, where: str) -> dict[str, Any]:
    """Validate a scenario's ``[controller]`` table: ControllerSettings keywords, typed and in range.

    Each key is checked by the rule the configuration file applies to the same setting
    (``adaptive_pin.config.SECTIONS``: ``[controller]``, ``[guard]``, ``[verify]``), then the
    guard's and verifier's own ``validate()``. Returns the converted table (same shape).
    ``where`` names the table (``demo.toml: controller``).
    """
    import dataclasses

    from adaptive_pin.config import SECTIONS
    from adaptive_pin.controller import ControllerSettings

    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a table, got {_shown(value)}")
    rules = {sec.name: {o.key: o.check for o in sec.options} for sec in SECTIONS}
    defaults = ControllerSettings()
    known = [f.name for f in dataclasses.fields(ControllerSettings)]

    def checked(rule: Any, item: Any, path: str) -> Any:
        try:
            return rule.convert(item)
        except (TypeError, ValueError, OverflowError):  # Overflow: an int too big for a float
            raise UsageError(f"{path}: expected {rule.expected}, got {_shown(item)}") from None

    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{where}.{key}"
        if key not in known:
            raise UsageError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        default = getattr(defaults, key)
        if not dataclasses.is_dataclass(default) or isinstance(default, type):
            out[key] = checked(rules["controller"][key], item, path)
            continue
        if not isinstance(item, dict):
            raise UsageError(f"{path}: expected a table, got {_shown(item)}")
        sub = rules[key]  # [controller.guard] -> the config's [guard] rules, likewise verify
        table: dict[str, Any] = {}
        for k, v in item.items():
            if k not in sub:
                raise UsageError(f"{path}.{k}: unknown key (known: {', '.join(sorted(sub))})")
            table[k] = checked(sub[k], v, f"{path}.{k}")
        tuned: Any = dataclasses.replace(default, **table)
        try:
            if hasattr(tuned, "validate"):
                tuned.validate()  # the settings' own cross-field rules, as the config file runs them
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        out[key] = table
    return out


def _host(r: _Reader, value: Any, base_dir: Path) -> HostSpec:
    if value is None:
        raise r.fail("host", "missing: a [host] table with topology = <fixture name or sysfs path>")
    t = r.table(value, "host")
    r.keys(t, "host", _HOST)
    synthetic = None
    if "synthetic" in t:
        s = r.table(t["synthetic"], "host.synthetic")
        r.keys(s, "host.synthetic", _SYNTH)
        ints = {k: r.integer(s[k], f"host.synthetic.{k}") for k in _SYNTH - {"llc_mib"} if k in s}
        if ints.get("remote_distance", 21) < 10:
            raise r.fail(
                "host.synthetic.remote_distance", "expected a SLIT distance >= 10", ints["remote_distance"]
            )
        llc = r.number(s.get("llc_mib", 16.0), "host.synthetic.llc_mib", positive=True)
        synthetic = SyntheticHost(llc_mib=llc, **ints)
        n = (
            synthetic.packages
            * synthetic.llc_per_package
            * synthetic.cores_per_llc
            * synthetic.threads_per_core
        )
        if n > 4096:
            raise r.fail("host.synthetic", f"{n} PUs: at most 4096")
    if "topology" in t:
        topology: str | None = r.string(t["topology"], "host.topology")
    elif synthetic is None:
        raise r.fail(
            "host.topology", "missing: a fixture name (e.g. 32intel64-2p8co2t+8ve) or a sysfs tree path"
        )
    else:
        topology = None
    return HostSpec(
        topology=topology,
        reserved=r.cpulist(t.get("reserved", ""), "host.reserved"),
        llc_mib=r.number(t["llc_mib"], "host.llc_mib", positive=True) if "llc_mib" in t else None,
        ghz=r.number(t["ghz"], "host.ghz", positive=True, at_most=10.0) if "ghz" in t else None,
        synthetic=synthetic,
        base_dir=base_dir,
        origin=r.origin,
    )


def _points(r: _Reader, value: Any, path: str) -> list[tuple[float, float]]:
    t = r.table(value, path)
    if not t:
        raise r.fail(path, 'expected at least one size = MPKI pair, e.g. { "8MiB" = 1.5 }')
    pts = []
    for k, v in t.items():
        try:
            size = parse_size(k)
        except ValueError as exc:
            raise r.fail(f"{path}.{k}", str(exc)) from None
        if size < 1:
            raise r.fail(f"{path}.{k}", "expected a size of at least 1 byte")
        pts.append((size, r.number(v, f"{path}.{k}")))
    return pts


def _workloads(r: _Reader, data: Mapping[str, Any], base_dir: Path) -> dict[str, Workload]:
    known = load_curves()
    curves = data.get("curves", [])
    if isinstance(curves, str):
        curves = [curves]
    if not isinstance(curves, list):
        raise r.fail("curves", "expected a list of curve file paths", curves)
    for i, c in enumerate(curves):
        curve_file = base_dir / r.string(c, f"curves[{i}]")
        try:
            known.update(load_curves(curve_file))
        except UsageError as exc:
            raise r.fail(f"curves[{i}]", str(exc)) from None
    table = r.table(data.get("workloads", {}), "workloads")
    for name, value in table.items():
        path = f"workloads.{name}"
        t = r.table(value, path)
        r.keys(t, path, _WORKLOAD)
        overrides: dict[str, float] = {}
        for key in ("base_cpi", "mlp"):
            if key in t:
                overrides[key] = r.number(t[key], f"{path}.{key}", positive=True)
        if "shared_fraction" in t:
            overrides["shared_fraction"] = r.number(
                t["shared_fraction"], f"{path}.shared_fraction", at_most=1.0
            )
        if "mpki" in t:
            klass = r.string(t["class"], f"{path}.class") if "class" in t else "b-sensitive"
            if klass not in CLASS_BASE_CPI:
                raise r.fail(f"{path}.class", f"expected one of {', '.join(CLASS_BASE_CPI)}", klass)
            acc = t.get("llc_accesses_pki")
            known[name] = make_workload(
                name,
                _points(r, t["mpki"], f"{path}.mpki"),
                llc_accesses_pki=None if acc is None else r.number(acc, f"{path}.llc_accesses_pki"),
                klass=klass,
                source=f"{r.origin} (inline)",
                **overrides,
            )
            continue
        for key in ("class", "llc_accesses_pki"):
            if key in t:
                raise r.fail(f"{path}.{key}", "only with an inline curve (mpki = {...})")
        base = r.string(t["from"], f"{path}.from") if "from" in t else name
        if base not in known:
            raise r.fail(
                path, f"no curve named {base!r} (known: {', '.join(sorted(known))}); give mpki = {{...}}"
            )
        w = known[base]
        known[name] = replace(
            w,
            name=name,
            base_cpi=overrides.get("base_cpi", w.base_cpi),
            mlp=overrides.get("mlp", w.mlp),
            shared_fraction=overrides.get("shared_fraction", w.shared_fraction),
        )
    return known


def _vms(r: _Reader, value: Any, workloads: Mapping[str, Workload]) -> tuple[VmSpec, ...]:
    if not isinstance(value, list) or not value:
        raise r.fail("vms", "expected at least one [[vms]] table", value)
    out: list[VmSpec] = []
    names: set[str] = set()

    def workload(v: Any, path: str) -> str:
        w = r.string(v, path)
        if w not in workloads:
            raise r.fail(path, f"unknown workload (known: {', '.join(sorted(workloads))})", w)
        return w

    for i, item in enumerate(value):
        path = f"vms[{i}]"
        t = r.table(item, path)
        r.keys(t, path, _VM)
        if "name" not in t:
            raise r.fail(f"{path}.name", "missing")
        if "vcpus" not in t:
            raise r.fail(f"{path}.vcpus", "missing")
        if "workload" not in t:
            raise r.fail(f"{path}.workload", "missing")
        base = r.string(t["name"], f"{path}.name")
        count = r.integer(t.get("count", 1), f"{path}.count")
        vcpus = r.integer(t["vcpus"], f"{path}.vcpus")
        if vcpus > 999:
            raise r.fail(f"{path}.vcpus", "expected at most 999", vcpus)
        start = r.number(t.get("start", 0.0), f"{path}.start")
        stop = r.number(t["stop"], f"{path}.stop", positive=True) if "stop" in t else None
        if stop is not None and stop <= start:
            raise r.fail(f"{path}.stop", f"must be after start ({start:g})", stop)
        pinning = t.get("pinning", "auto")
        if pinning not in PIN_MODES:
            raise r.fail(f"{path}.pinning", f"expected one of {', '.join(PIN_MODES)}", pinning)
        pinned = r.cpulist(t["pinned_cpus"], f"{path}.pinned_cpus") if "pinned_cpus" in t else None
        if pinned is not None and not pinned:
            raise r.fail(f"{path}.pinned_cpus", "expected a non-empty cpulist", t["pinned_cpus"])
        mem = r.cpulist(t["memory_nodes"], f"{path}.memory_nodes") if "memory_nodes" in t else None
        if mem is not None and not mem:
            raise r.fail(f"{path}.memory_nodes", "expected a non-empty node list", t["memory_nodes"])
        memory_mib = r.integer(t.get("memory_mib", constants.DEFAULT_MEMORY_MIB), f"{path}.memory_mib")
        if memory_mib > 1 << 30:
            raise r.fail(f"{path}.memory_mib", "expected at most 1073741824 (1 PiB)", memory_mib)
        phases_raw = t.get("phases", [])
        if not isinstance(phases_raw, list):
            raise r.fail(f"{path}.phases", "expected a list of { at = s, workload = name }", phases_raw)
        phases = []
        for j, ph in enumerate(phases_raw):
            pp = f"{path}.phases[{j}]"
            pt = r.table(ph, pp)
            r.keys(pt, pp, _PHASE)
            if "at" not in pt or "workload" not in pt:
                raise r.fail(pp, "needs at = <seconds> and workload = <name>")
            phases.append(
                Phase(
                    at=r.number(pt["at"], f"{pp}.at"),
                    workload=workload(pt["workload"], f"{pp}.workload"),
                    load=r.number(pt["load"], f"{pp}.load", positive=True, at_most=1.0)
                    if "load" in pt
                    else None,
                )
            )
        template = VmSpec(
            name=base,
            vcpus=vcpus,
            workload=workload(t["workload"], f"{path}.workload"),
            start=start,
            stop=stop,
            load=r.number(t.get("load", 1.0), f"{path}.load", positive=True, at_most=1.0),
            pinning=pinning,
            pinned_cpus=pinned,
            memory_nodes=mem,
            memory_mib=memory_mib,
            whole_cores=r.boolean(t.get("whole_cores", False), f"{path}.whole_cores"),
            latency_sensitive=r.boolean(t.get("latency_sensitive", False), f"{path}.latency_sensitive"),
            phases=tuple(sorted(phases, key=lambda p: p.at)),
        )
        for k in range(count):
            vm_name = base if count == 1 else f"{base}-{k + 1}"
            if vm_name in names:
                raise r.fail(f"{path}.name", "duplicate VM name", vm_name)
            names.add(vm_name)
            out.append(replace(template, name=vm_name))
    return tuple(out)
