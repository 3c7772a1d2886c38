"""``adaptive-pin run`` as a process: ticks, state file, lock, signals, reload, exit codes."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adaptive_pin.assembly import Assembly
from adaptive_pin.config import Config, controller_settings, load_config, policy_options, with_overrides
from adaptive_pin.controller import Controller
from adaptive_pin.daemon import Daemon, DaemonOptions
from adaptive_pin.drivers.sim import SimDriver
from adaptive_pin.errors import GuestGoneError
from adaptive_pin.fixtures import fixture_root
from adaptive_pin.model import (
    CpuSet,
    Guest,
    GuestEvent,
    Inventory,
    ThreadCounters,
    ThreadRef,
    TickReport,
    Topology,
)
from adaptive_pin.runtime import OnlineWatcher, build_runtime
from adaptive_pin.sim.host import SimHost
from adaptive_pin.sim.scenario import load_scenario
from collectors.base import Collector
from collectors.sim import NO_PMU, PMU_COUNTERS, SimCollector
from policies.registry import get_policy

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "scenarios" / "demo.toml")


def _cmd(tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "adaptive_pin",
        "run",
        "--driver",
        "sim",
        "--scenario",
        DEMO,
        "--interval",
        "1",
        "--no-metrics",
        "--log-format",
        "plain",
        "--state-file",
        str(tmp / "state" / "state.json"),
        "--lock-file",
        str(tmp / "run" / "lock"),
        *extra,
    ]


def _wait_for(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise AssertionError(
        f"{text!r} not in {path} after {timeout}s:\n{path.read_text() if path.exists() else ''}"
    )


def test_a_bounded_run_ticks_pins_and_writes_private_state(tmp_path: Path) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "8"), capture_output=True, text=True, check=False, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert " move " in p.stderr  # one line per decision, with its reason
    state = tmp_path / "state" / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    doc = json.loads(state.read_text())
    assert doc["original_affinity"] == {}  # restored on exit: nothing left to restore
    assert "restored" in p.stderr


def test_without_restore_the_state_remembers_how_to_restore(tmp_path: Path) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "8", "--no-restore-on-exit"),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert doc["original_affinity"], "moved vCPUs' original affinities must survive a restart"
    assert "restored" not in p.stderr


def test_sigterm_ends_the_tick_restores_and_exits_zero(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cmd(tmp_path), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, " move ")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "signal SIGTERM" in text and "restored" in text
    assert "Traceback" not in text


def test_a_second_instance_is_refused_with_one_line(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with log.open("w") as err:
        first = subprocess.Popen(_cmd(tmp_path), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, "running:")
            second = subprocess.run(
                _cmd(tmp_path, "--ticks", "1"), capture_output=True, text=True, check=False, timeout=60
            )
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=30)
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(first.pid) in lines[0], second.stderr


def test_sighup_keeps_the_old_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[guard]\ncooldown_s = 30\n")
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cmd(tmp_path, "--config", str(cfg)), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, "running:")
            cfg.write_text("[guard]\ncooldown_s = 'soon'\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(log, "new config refused")
            cfg.write_text("[guard]\ncooldown_s = 90\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(log, "config reloaded")
            assert proc.poll() is None  # still running through both
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert "guard.cooldown_s" in log.read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--interval", "soon"], "invalid float"),
        (["--reserved", "0-999"], "host.reserved"),
        (["--policy", "no-such-policy"], "no-such-policy"),
        (["--policy-option", "granularity"], "KEY=VALUE"),
        (["--ticks", "0"], "--ticks 0: expected a number of ticks >= 1"),
        (["--ticks", "-1"], "--ticks -1: expected a number of ticks >= 1"),
        (["--lock-file", "/proc/x/lock"], "/proc/x"),  # its directory cannot be made
        (["--lock-file", "/proc/self/status"], "/proc/self/status"),  # not ours to truncate
        (["--lock-file", "/dev/null"], "not a regular file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "1", *args), capture_output=True, text=True, check=False, timeout=60
    )
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr


def test_plan_advises_and_json_is_machine_readable() -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptive_pin",
            "plan",
            "--driver",
            "sim",
            "--scenario",
            DEMO,
            "--interval",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["policy"] == "cache-aware"
    for m in doc["moves"]:
        assert {"vm", "vcpu", "from", "to", "reason", "predicted_gain", "guard"} <= set(m)
    for mm in doc["memory_moves"]:  # VMs whose memory would follow them to another node
        assert {"vm", "from_nodes", "to_nodes", "reason", "predicted_gain", "guard"} <= set(mm)
        assert mm["from_nodes"] != mm["to_nodes"] and mm["vm"] in {m["vm"] for m in doc["moves"]}


# --------------------------------------------------------------------------------------
# In-process: the daemon on a simulated host in simulated time (no sleeping, no real clock).
# --------------------------------------------------------------------------------------

SMALL_HOST = """\
name = "{name}"
duration = 100000
tick = 1.0
seed = 3

[host]
reserved = "0"

[host.synthetic]
packages = 2
cores_per_llc = 4
threads_per_core = 2
"""


def scenario_file(
    tmp: Path, vms: list[dict[str, object]], *, name: str = "test", host: str = SMALL_HOST
) -> Path:
    """A scenario on a small synthetic host (16 PUs) with the given VMs (TOML tables)."""
    lines = [host.format(name=name)]
    for vm in vms:
        lines.append("[[vms]]")
        for key, val in vm.items():
            lines.append(f"{key} = {json.dumps(val)}")
        lines.append("")
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


class SteppedSimDriver(SimDriver):
    """The sim driver in simulated time: a wait for events that finds none steps the host one tick.

    The daemon's clock is the host's (``host.now``), so ``Daemon._wait`` sees time pass only
    through this, one simulated second per call, and a run of thousands of ticks takes seconds.
    """

    def __init__(self, host: SimHost) -> None:
        super().__init__(host=host, realtime=False)
        self.inventory_faults: list[BaseException | None] = []  # raised by inventory, in order
        self.pin_faults: list[BaseException | None] = []

    def events(self, timeout: float) -> list[GuestEvent]:
        found = self.host.pop_events()
        if not found:
            self.host.step()
            found = self.host.pop_events()
        return found

    def inventory(self) -> Inventory:
        if self.inventory_faults and (fault := self.inventory_faults.pop(0)) is not None:
            raise fault
        return super().inventory()

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        if self.pin_faults and (fault := self.pin_faults.pop(0)) is not None:
            raise fault
        super().pin(guest, vcpu, cpus)


@dataclass
class SimRun:
    """One in-process daemon run: what it ticked, logged and exported."""

    host: SimHost
    driver: SteppedSimDriver
    daemon: Daemon
    ticks: list[TickReport]
    times: list[float]  # host.now at the end of each tick
    rc: int = 0
    assembly: Assembly | None = None

    def metrics(self) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
        exporter = self.daemon._exporter
        assert exporter is not None
        out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        for family in text_string_to_metric_families(generate_latest(exporter.registry).decode()):
            for s in family.samples:
                out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        return out

    def error_count(self, kind: str) -> float:
        hits = [
            v
            for lab, v in self.metrics().get("adaptive_pin_errors_total", {}).items()
            if ("kind", kind) in lab
        ]
        assert len(hits) == 1, (kind, hits)
        return hits[0]


def sim_daemon(
    tmp: Path,
    scenario: Path,
    *,
    ticks: int,
    interval: float = 2.0,
    config_text: str = "",
    overrides: dict[str, object] | None = None,
    on_tick: Callable[[SimRun, TickReport], None] | None = None,
    wrap_collector: Callable[[Collector], Collector] | None = None,
    topology_source: Callable[[SimHost, Topology], Callable[[], Topology]] | None = None,
    metrics: bool = True,
    keep_reports: bool = True,  # a soak keeps none: holding every TickReport is a leak of its own
) -> SimRun:
    """Build and run the daemon (its loop, lock, state, metrics, signals) on a stepped SimHost."""
    host = SimHost(load_scenario(scenario))
    driver = SteppedSimDriver(host)
    config_path = tmp / "config.toml"
    config_path.write_text(config_text)
    given: dict[str, object] = {
        "driver.name": "sim",
        "driver.scenario": str(scenario),
        "controller.interval_s": interval,
        "daemon.state_file": str(tmp / "state" / "state.json"),
        "daemon.lock_file": str(tmp / "run" / "lock"),
        "metrics.address": "127.0.0.1:0",
        "metrics.enabled": metrics,
        **(overrides or {}),
    }
    config = with_overrides(load_config(config_path), **given)
    run: SimRun

    def build(cfg: Config) -> Assembly:
        runtime = build_runtime(driver, reserved=cfg.host.reserved)
        collectors = runtime.collectors
        if wrap_collector is not None:
            collectors = [wrap_collector(c) for c in collectors]
        source = topology_source(host, runtime.topology) if topology_source is not None else None
        ctl = Controller(
            driver=driver,
            collectors=collectors,
            policy=get_policy(cfg.policy.name, **policy_options(cfg)),
            topology=runtime.topology,
            settings=controller_settings(cfg),
            clock=runtime.clock,
            topology_source=source,
        )
        run.assembly = Assembly(ctl, runtime, "sim")
        return run.assembly

    def record(report: TickReport) -> None:
        if keep_reports:
            run.ticks.append(report)
            run.times.append(host.now)
        if on_tick is not None:
            on_tick(run, report)

    options = DaemonOptions(
        config_path=str(config_path),
        overrides=given,
        max_ticks=ticks,
        on_tick=record,
        assemble=build,
        clock=lambda: host.now,
        sleep=lambda _s: None,  # only the sub-tick event gap: nothing to step
    )
    run = SimRun(host, driver, Daemon(config, options), [], [])
    run.rc = run.daemon.run()
    return run


def _vm(
    name: str, start: float, stop: float | None = None, vcpus: int = 2, workload: str = "sort"
) -> dict[str, object]:
    vm: dict[str, object] = {"name": name, "vcpus": vcpus, "workload": workload, "start": start}
    if stop is not None:
        vm["stop"] = stop
    return vm


def test_an_event_burst_does_not_postpone_the_timer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Interval 2 s; a VM starts every second for 8 s: 8 event ticks, then the timer one
    # interval after the last of them (with next_due += interval per tick it came 8 ticks late).
    scenario = scenario_file(tmp_path, [_vm("base", 0), *(_vm(f"burst{i}", float(i)) for i in range(1, 9))])
    caplog.set_level(logging.INFO, logger="adaptive_pin")
    run = sim_daemon(tmp_path, scenario, ticks=14)
    assert run.rc == 0
    triggers = [r.trigger for r in run.ticks]
    events = [t for t, trig in zip(run.times, triggers, strict=True) if trig == "event"]
    assert len(events) >= 8, list(zip(run.times, triggers, strict=True))
    last_event = max(events)
    after = [t for t, trig in zip(run.times, triggers, strict=True) if trig == "timer" and t > last_event]
    assert after and after[0] == last_event + 2.0, list(zip(run.times, triggers, strict=True))
    # Every gap between ticks is at most the interval: the timer is never pushed back.
    assert max(b - a for a, b in itertools.pairwise(run.times)) <= 2.0
    assert "over the" not in caplog.text
    assert run.metrics()["adaptive_pin_tick_overruns_total"][frozenset({("host", socket.gethostname())})] == 0
    # The state saved on exit keeps the last placement (it used to be saved empty).
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert set(doc["placement"]) == {g.id for g in run.ticks[-1].snapshot.guests}


def test_an_overrun_is_logged_counted_and_the_next_tick_starts_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = scenario_file(tmp_path, [_vm("a", 0), _vm("b", 0)])

    def slow_third(run: SimRun, report: TickReport) -> None:
        if report.tick == 3:
            run.host.advance_to(run.host.now + 3.0)  # this tick took 3 s of a 2 s interval

    caplog.set_level(logging.INFO, logger="adaptive_pin")
    run = sim_daemon(tmp_path, scenario, ticks=6, on_tick=slow_third)
    assert run.rc == 0
    assert "tick 3 took 3s, over the 2s interval: the next one starts at once" in caplog.text
    assert caplog.text.count("over the") == 1
    # times[] is taken before the slow part: tick 4 starts the moment tick 3 ends, 3 s later.
    assert run.times[3] == run.times[2] + 3.0 and run.ticks[3].trigger == "timer"
    overruns = run.metrics()["adaptive_pin_tick_overruns_total"]
    assert list(overruns.values()) == [1.0]


def test_a_tick_that_raises_is_counted_and_the_loop_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = scenario_file(tmp_path, [_vm("a", 0), _vm("b", 0)])

    def arm(run: SimRun, report: TickReport) -> None:
        if report.tick == 2:  # ticks 3 and 5 meet a bug and the fd limit, ticks 4 and 6 are fine
            run.driver.inventory_faults[:] = [
                RuntimeError("driver bug"),
                None,
                OSError(errno.EMFILE, "Too many open files"),
            ]

    caplog.set_level(logging.DEBUG, logger="adaptive_pin")
    run = sim_daemon(tmp_path, scenario, ticks=7, on_tick=arm)
    assert run.rc == 0
    assert run.daemon.options.max_ticks == 7 and run.assembly is not None
    assert run.assembly.controller.ticks == 7  # all seven ran, two of them failed
    assert [r.tick for r in run.ticks] == [1, 2, 4, 6, 7]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "failed" in r.getMessage()]
    assert [r.getMessage() for r in errors] == [
        "tick 3 failed (tick), carrying on with the next one: RuntimeError: driver bug",
        "tick 5 failed (fd_exhaustion), carrying on with the next one: "
        "OSError: [Errno 24] Too many open files",
    ]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(debug) == 2  # the tracebacks, for -vv
    assert run.error_count("tick") == 1
    assert run.error_count("fd_exhaustion") == 1


def test_guest_gone_thread_gone_and_counters_vanishing_are_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = scenario_file(tmp_path, [_vm("a", 0), _vm("b", 0), _vm("c", 0)])
    drop: set[int] = set()

    class DroppingCollector:
        """The sim collector, but a thread in ``drop`` is gone between inventory and sampling."""

        def __init__(self, inner: Collector) -> None:
            self.inner = inner
            self.name = inner.name

        def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
            got = self.inner.sample(threads)
            return {tid: c for tid, c in got.items() if tid not in drop}

        def capabilities(self) -> Mapping[str, str | None]:
            return self.inner.capabilities()

        def close(self) -> None:
            self.inner.close()

    def faults(run: SimRun, report: TickReport) -> None:
        if report.tick == 1:
            run.driver.pin_faults[:] = [GuestGoneError("domain a is gone")]
        if report.tick == 3:
            drop.add(report.snapshot.guests[0].vcpus[0].tid or -1)
        if report.tick == 4:
            drop.clear()
        if report.tick == 5:
            inner = run.assembly.runtime.collectors[0] if run.assembly else None
            assert isinstance(inner, SimCollector)
            inner.hidden.update(dict.fromkeys(PMU_COUNTERS, NO_PMU))  # the PMU goes away

    caplog.set_level(logging.INFO, logger="adaptive_pin")
    run = sim_daemon(tmp_path, scenario, ticks=7, on_tick=faults, wrap_collector=DroppingCollector)
    assert run.rc == 0
    assert run.error_count("guest_gone") == 1
    assert "gone before pin: domain a is gone" in caplog.text
    assert run.error_count("thread_gone") == 1
    assert "thread gone between inventory and sampling (not measured this tick): a vcpu 0" in caplog.text
    assert run.error_count("counters_vanished") == len(PMU_COUNTERS)
    assert f"counter llc_misses vanished: {NO_PMU}" in caplog.text
    # Every other known kind is there at 0 from the start, for increase() to see a first one.
    for kind in ("pin", "cpu_offline", "fd_exhaustion", "tick", "state"):
        assert run.error_count(kind) == 0


def test_a_cpu_taken_offline_is_logged_counted_and_never_planned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A sysfs fixture copy read the way a real host's is (OnlineWatcher, as for --sysfs-root);
    # the simulated host runs on the same machine's topology.
    fixture = "32intel64-2p8co2t+8ve"
    root = tmp_path / "sysfs"
    shutil.copytree(fixture_root(fixture), root, symlinks=True)
    host_spec = SMALL_HOST.replace(
        "[host.synthetic]\npackages = 2\ncores_per_llc = 4\nthreads_per_core = 2\n", ""
    )
    host_spec = host_spec.replace(
        '[host]\nreserved = "0"\n', f'[host]\ntopology = "{fixture}"\nreserved = "0,16"\n'
    )
    vms = [_vm(f"vm{i}", 0, vcpus=4, workload=("sort", "stream-triad")[i % 2]) for i in range(6)]
    scenario = scenario_file(tmp_path, vms, host=host_spec)
    online = root / "sys/devices/system/cpu/online"
    offline_cpu = 5

    def take_offline(run: SimRun, report: TickReport) -> None:
        if report.tick == 3:
            online.write_text("0-4,6-31\n")
            (root / f"sys/devices/system/cpu/cpu{offline_cpu}/online").write_text("0\n")

    caplog.set_level(logging.INFO, logger="adaptive_pin")
    run = sim_daemon(
        tmp_path,
        scenario,
        ticks=12,
        on_tick=take_offline,
        topology_source=lambda _host, topo: OnlineWatcher(str(root), topo),
    )
    assert run.rc == 0
    assert f"CPU {offline_cpu} went offline: no plan names it from now on" in caplog.text
    assert run.error_count("cpu_offline") == 1
    assert any(r.plan.moves for r in run.ticks[:3])  # the policy was placing vCPUs before
    for r in run.ticks[3:]:
        assert offline_cpu not in r.snapshot.topology.online
        for m in (*r.plan.moves, *r.applied):
            assert offline_cpu not in m.to_cpus, (r.tick, m)


def test_sighup_refuses_a_config_naming_cpus_the_host_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = scenario_file(tmp_path, [_vm("a", 0), _vm("b", 0)])
    cfg = tmp_path / "config.toml"
    seen: dict[int, float] = {}

    def reload(run: SimRun, report: TickReport) -> None:
        seen[report.tick] = run.daemon.config.guard.cooldown_s
        if report.tick == 2:  # the host has 16 PUs: 20-23 do not exist
            cfg.write_text('[guard]\ncooldown_s = 77\n[host]\nreserved = "0,20-23"\n')
            os.kill(os.getpid(), signal.SIGHUP)
        if report.tick == 4:
            cfg.write_text('[guard]\ncooldown_s = 78\n[host]\nreserved = "0"\n')
            os.kill(os.getpid(), signal.SIGHUP)

    caplog.set_level(logging.INFO, logger="adaptive_pin")
    run = sim_daemon(tmp_path, scenario, ticks=6, on_tick=reload, config_text="[guard]\ncooldown_s = 30\n")
    assert run.rc == 0
    refused = [r.getMessage() for r in caplog.records if "new config refused" in r.getMessage()]
    assert len(refused) == 1 and "host.reserved" in refused[0] and "does not have" in refused[0], refused
    assert "20-23" in refused[0]
    assert seen[3] == seen[4] == 30  # the old config kept after the refusal
    assert seen[5] == 78 and "config reloaded" in caplog.text
    assert run.assembly is not None and run.assembly.controller.guard.settings.cooldown_s == 78


def test_departed_vms_are_forgotten_running_ones_remembered(tmp_path: Path) -> None:
    # "gone" stops at 10 s; "stays" runs on. Without restore-on-exit the state keeps how to
    # restore "stays" and nothing of "gone".
    scenario = scenario_file(tmp_path, [_vm("gone", 0, stop=10), _vm("stays", 0)])
    run = sim_daemon(tmp_path, scenario, ticks=12, overrides={"controller.restore_on_exit": False})
    assert run.rc == 0 and run.times[-1] > 12
    ids = {vm.spec.name: vm.id for vm in [*run.host.vms.values(), *run.host.gone.values()]}
    assert any(k[0] == ids["gone"] for r in run.ticks[:3] for k in ((m.guest_id, m.vcpu) for m in r.applied))
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert ids["stays"] in doc["original_affinity"]
    assert ids["gone"] not in doc["original_affinity"]
    assert run.assembly is not None
    assert {k[0] for k in run.assembly.controller.original_affinity} == {ids["stays"]}


def test_fault_watch_finds_the_fd_limit_in_the_rates(caplog: pytest.LogCaptureFixture) -> None:
    # The collectors report EMFILE per counter and vCPU (perf: "fd limit: perf_event_open(x) =
    # EMFILE") rather than failing: the daemon turns that into a line and a count per tick.
    from adaptive_pin.daemon import FaultWatch
    from adaptive_pin.model import VCpuRates
    from tests.metrics_helpers import demo_host, snapshot, tick_report

    topo, (web, db), snap = demo_host()
    starved = dict(snap.rates)
    why = "fd limit: perf_event_open(llc_misses) = EMFILE"
    starved[(db.id, 1)] = VCpuRates(utilization=0.5, missing={"llc_misses_per_s": why, "mpki": why})
    watch = FaultWatch()
    assert watch.inspect(tick_report(snap)) == {}
    caplog.set_level(logging.INFO, logger="adaptive_pin")
    found = watch.inspect(tick_report(snapshot(topo, [web, db], starved), tick=2))
    assert found == {"fd_exhaustion": 1}
    assert (
        "fd limit reached: counters of 1 vCPUs not read this tick (raise LimitNOFILE): db vcpu 1"
        in caplog.text
    )
    assert watch.inspect(tick_report(snap, tick=3)) == {}  # the next tick is fine again
