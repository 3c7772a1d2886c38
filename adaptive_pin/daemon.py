"""``adaptive-pin run``: the periodic loop, with event-triggered ticks, signals and state.

- a tick every ``controller.interval_s``, and one at once when the driver reports a VM
  started, stopped or changed (at most one per ``EVENT_GAP_S``, so a burst is one tick); the
  next tick is always due one interval after the start of the last one, whatever started it,
  so a burst of events never postpones the timer. A tick that takes longer than the interval
  is an overrun (log line, ``adaptive_pin_tick_overruns_total``) and the next one starts at once;
- a fault the controller does not catch (a bug, a driver raising something unexpected) ends
  that tick alone: one error line (the traceback at debug level), ``errors_total{kind="tick"}``
  (``fd_exhaustion`` for EMFILE/ENFILE), and the loop carries on;
- faults the controller survives and reports only as data (a vCPU thread gone between
  inventory and sampling, counters that vanished, a CPU taken offline, the fd limit reached)
  are found by :class:`FaultWatch`: one log line each, counted in ``errors_total{kind}``;
- SIGTERM/SIGINT: the current tick finishes, then the loop ends cleanly (restoring the
  original affinities when ``controller.restore_on_exit`` is set); SIGHUP: reload the config
  file, and keep the old one (with a log line) when the new one is bad, including one naming
  CPUs the running host does not have;
- the state file (original affinities, cooldowns, rolled-back placements, policy state) is
  written atomically after every tick that changed something, so a restart neither thrashes
  nor forgets how to restore;
- a single-instance lock, taken before anything is touched.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from adaptive_pin import state as statefile
from adaptive_pin.assembly import Assembly, assemble
from adaptive_pin.config import (
    Config,
    controller_settings,
    load_config,
    policy_options,
    validate_against,
    with_overrides,
)
from adaptive_pin.errors import AdaptivePinError, UsageError
from adaptive_pin.lockfile import InstanceLock
from adaptive_pin.model import CpuSet, TickReport
from adaptive_pin.runtime import freeze_startup_heap
from policies.registry import get_policy

log = logging.getLogger("adaptive_pin.daemon")

EVENT_GAP_S = 0.2  # coalesce a burst of VM events into one tick
EVENT_POLL_S = 0.5  # how often the loop looks at its signal flags while waiting
STATE_EVERY_TICKS = 12  # also save periodically, so cooldown timestamps stay fresh
_FD_LIMIT = (errno.EMFILE, errno.ENFILE)
_FD_WORDS = ("EMFILE", "ENFILE", "fd limit")


@dataclass
class DaemonOptions:
    config_path: str | None = None
    overrides: Mapping[str, object] = field(default_factory=dict)
    max_ticks: int | None = None
    hide_pmu: bool = False
    metrics: bool = True
    on_tick: Callable[[TickReport], None] | None = None  # e.g. the live table
    # Tests and soak runs: build the controller some other way (a simulated host stepped in
    # simulated time), and read time / wait through something other than the real clock.
    assemble: Callable[[Config], Assembly] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


class FaultWatch:
    """Faults a tick survived that the controller reports only as data, found by comparing
    each report with the one before: each gets a log line and a count (``errors_total{kind}``)."""

    def __init__(self) -> None:
        self._online: CpuSet | None = None
        self._caps: dict[str, str | None] = {}

    def inspect(self, report: TickReport) -> Counter[str]:
        found: Counter[str] = Counter()
        snap = report.snapshot
        online = snap.topology.online
        if self._online is not None:
            gone, back = self._online - online, online - self._online
            if gone:
                found["cpu_offline"] += len(gone)
                log.warning("CPU %s went offline: no plan names it from now on", gone.to_list())
            if back:
                log.info("CPU %s came online", back.to_list())
        self._online = online
        caps = dict(snap.capabilities)
        if caps:  # empty when the inventory failed: nothing to compare
            for counter, why in sorted(caps.items()):
                if why is not None and counter in self._caps and self._caps[counter] is None:
                    found["counters_vanished"] += 1
                    log.warning("counter %s vanished: %s", counter, why)
            self._caps = caps
        names = {g.id: g.name for g in snap.guests}
        thread_gone: list[str] = []
        fd_limit: list[str] = []
        for (gid, idx), rates in sorted(snap.rates.items()):
            whys = set(rates.missing.values())
            where = f"{names.get(gid, gid)} vcpu {idx}"
            if any("thread gone" in w for w in whys):
                thread_gone.append(where)
            if any(word in w for w in whys for word in _FD_WORDS):
                fd_limit.append(where)
        if thread_gone:
            found["thread_gone"] += len(thread_gone)
            log.warning(
                "thread gone between inventory and sampling (not measured this tick): %s",
                ", ".join(thread_gone),
            )
        if fd_limit:
            found["fd_exhaustion"] += len(fd_limit)
            log.error(
                "fd limit reached: counters of %d vCPUs not read this tick (raise LimitNOFILE): %s",
                len(fd_limit),
                ", ".join(fd_limit[:10]) + (" ..." if len(fd_limit) > 10 else ""),
            )
        return found


class Daemon:
    def __init__(self, config: Config, options: DaemonOptions) -> None:
        self.config = config
        self.options = options
        self._stop = False
        self._reload = False
        self._clock = options.clock
        self._sleep = options.sleep
        self._exporter: Any = None
        self._server: Any = None  # the exporter's MetricsServer, once serving
        self._last_report: TickReport | None = None

    # --- signals ------------------------------------------------------------------------
    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: ending after the current tick", signal.Signals(signum).name)
        self._stop = True

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload = True

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        for sig, handler in (
            (signal.SIGTERM, self._on_stop),
            (signal.SIGINT, self._on_stop),
            (signal.SIGHUP, self._on_hup),
        ):
            old[sig] = signal.signal(sig, handler)
        return old

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        lock = InstanceLock(cfg.daemon.lock_file)
        lock.acquire()
        old_handlers = self._install_signals()
        asm: Assembly | None = None
        server = None
        try:
            if self.options.assemble is not None:
                asm = self.options.assemble(cfg)
            else:
                asm = assemble(cfg, hide_pmu=self.options.hide_pmu)
            ctl = asm.controller
            self._load_state(asm)
            exporter = None
            if self.options.metrics and cfg.metrics.enabled:
                from adaptive_pin.metrics import MetricsExporter

                exporter = MetricsExporter(host_label=socket.gethostname())
                # Every known label set at 0 before the first scrape, so increase() sees the
                # first move, error or rollback (a series born at 1 has no jump to see).
                exporter.prepare(ctl.policy.name)
                self._exporter = exporter
                server = self._server = exporter.serve(cfg.metrics.address, flag="metrics.address")
                bound_host, bound_port = server.address
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                log.info("metrics on http://%s:%d/metrics", shown, bound_port)
            log.info(
                "running: driver %s, policy %s, every %.3gs%s",
                asm.driver_name,
                ctl.policy.name,
                ctl.settings.interval_s,
                " (dry run: nothing is pinned)" if ctl.settings.dry_run else "",
            )
            freeze_startup_heap()  # what is alive now lives as long as the loop
            self._loop(asm, exporter)
        finally:
            if asm is not None:
                self._shutdown(asm)
            if server is not None:
                server.shutdown()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            lock.release()
        return 0

    def _loop(self, asm: Assembly, exporter: Any) -> None:
        ctl = asm.controller
        trigger = "timer"
        watch = FaultWatch()
        while not self._stop:
            if self._reload:
                self._reload = False
                self._reload_config(asm)
            started = self._clock()
            self._tick(asm, exporter, watch, trigger)
            # The schedule follows the start of the last tick, timer- or event-triggered: an
            # event burst moves the next timer tick earlier, never later.
            interval = ctl.settings.interval_s
            next_due = started + interval
            took = self._clock() - started
            if took > interval:
                log.warning(
                    "tick %d took %.3gs, over the %.3gs interval: the next one starts at once",
                    ctl.ticks,
                    took,
                    interval,
                )
                if exporter is not None:
                    exporter.count_overrun()
            if self.options.max_ticks is not None and ctl.ticks >= self.options.max_ticks:
                break
            trigger = self._wait(asm, next_due, started + took)

    def _tick(self, asm: Assembly, exporter: Any, watch: FaultWatch, trigger: str) -> None:
        """One tick, its metrics, state and display; nothing it raises ends the loop."""
        ctl = asm.controller
        try:
            report = ctl.tick(trigger=trigger)
            faults = watch.inspect(report)
            if faults:
                merged = Counter(report.errors)
                merged.update(faults)
                report = replace(report, errors=dict(merged))
            self._last_report = report
            if exporter is not None:
                exporter.observe(report)
            due = bool(report.applied or report.outcomes) or ctl.ticks % STATE_EVERY_TICKS == 0
            if due and not self._save_state(asm, report) and exporter is not None:
                exporter.count_error("state")
            if self.options.on_tick is not None:
                self.options.on_tick(report)
        except Exception as exc:  # one tick's bug or fault must not end the daemon
            kind = "fd_exhaustion" if isinstance(exc, OSError) and exc.errno in _FD_LIMIT else "tick"
            log.debug("tick %d failed", ctl.ticks, exc_info=True)
            log.error(
                "tick %d failed (%s), carrying on with the next one: %s: %s",
                ctl.ticks,
                kind,
                type(exc).__name__,
                exc,
            )
            if exporter is not None:
                exporter.count_error(kind)

    def _wait(self, asm: Assembly, deadline: float, last_tick: float) -> str:
        """Until the next tick is due, an event arrives, or a signal asks for attention."""
        while not self._stop and not self._reload:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return "timer"
            try:
                events = asm.runtime.driver.events(timeout=min(remaining, EVENT_POLL_S))
            except Exception as exc:  # a driver's event source failing is that wait's problem
                log.warning("driver events: %s", exc)
                self._sleep(min(max(remaining, 0.0), EVENT_POLL_S))
                continue
            if events:
                for ev in events:
                    log.info("event: %s %s (%s)", ev.name, ev.kind, ev.guest_id)
                gap = last_tick + EVENT_GAP_S - self._clock()
                if gap > 0:
                    self._sleep(gap)
                return "event"
        return "timer"

    # --- reload, state, exit ---------------------------------------------------------
    def _reload_config(self, asm: Assembly) -> None:
        path = self.options.config_path
        ctl = asm.controller
        try:
            new = with_overrides(load_config(path), **dict(self.options.overrides))
            # The CPUs it names must exist on the host as it runs now (as at start-up).
            validate_against(new, ctl.topology)
            policy = None
            if (new.policy.name, dict(new.policy.options)) != (
                self.config.policy.name,
                dict(self.config.policy.options),
            ):
                policy = get_policy(new.policy.name, **policy_options(new))
        except AdaptivePinError as exc:
            log.error("SIGHUP: new config refused, keeping the old one: %s", exc)
            return
        ctl.settings = controller_settings(new)
        ctl.guard.settings = new.guard
        ctl.journal.settings = new.verify
        if policy is not None:
            ctl.policy, ctl.policy_state = policy, policy.initial_state()
            if self._exporter is not None:
                self._exporter.prepare(policy.name)
        rules = getattr(asm.runtime.driver, "rules", None)
        if rules is not None:
            from adaptive_pin.config import pinnability_rules

            asm.runtime.driver.rules = pinnability_rules(new)  # type: ignore[attr-defined]
        restart = [
            k for k in ("driver", "metrics", "daemon", "host") if getattr(new, k) != getattr(self.config, k)
        ]
        self.config = replace(new)
        log.info(
            "SIGHUP: config reloaded from %s%s",
            new.source,
            f" ({', '.join(restart)} changes take effect on restart)" if restart else "",
        )

    def _load_state(self, asm: Assembly) -> None:
        path = self.config.daemon.state_file
        try:
            saved = statefile.load_state(path, statefile.host_id())
        except AdaptivePinError as exc:
            log.warning("state file %s not used: %s", path, exc)
            return
        if saved is None:
            return
        for note in statefile.restore(asm.controller, saved):
            log.warning("state file %s: %s", path, note)
        log.info("state loaded from %s", path)

    def _save_state(self, asm: Assembly, report: TickReport | None) -> bool:
        placement = statefile.placement_of(report.snapshot.guests) if report else {}
        try:
            statefile.save_state(self.config.daemon.state_file, statefile.capture(asm.controller, placement))
        except (AdaptivePinError, OSError) as exc:
            log.error("state file %s not written: %s", self.config.daemon.state_file, exc)
            return False
        return True

    def _shutdown(self, asm: Assembly) -> None:
        ctl = asm.controller
        try:
            if self.config.controller.restore_on_exit and not ctl.settings.dry_run:
                failures = ctl.restore()
                for key, why in failures.items():
                    log.error("restore %s vcpu %d failed: %s", key[0], key[1], why)
                if not failures:
                    ctl.original_affinity.clear()
            # The last placement the controller saw (an empty one would forget it on every exit).
            self._save_state(asm, self._last_report)
        finally:
            ctl.close()


def journald_formatter() -> logging.Formatter:
    """sd-daemon(3) priority prefixes: journald files each line under its level."""

    class _Fmt(logging.Formatter):
        PRIO: Mapping[int, int] = {
            logging.CRITICAL: 2,
            logging.ERROR: 3,
            logging.WARNING: 4,
            logging.INFO: 6,
            logging.DEBUG: 7,
        }

        def format(self, record: logging.LogRecord) -> str:
            return f"<{self.PRIO.get(record.levelno, 6)}>{super().format(record)}"

    return _Fmt("%(name)s: %(message)s")


def setup_logging(fmt: str, verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "journald":
        handler.setFormatter(journald_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


def ensure_dirs(config: Config) -> None:
    # The state file's directory is save_state's to create (0700); the lock's is public.
    lock = Path(config.daemon.lock_file)
    try:
        lock.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"daemon.lock_file {lock}: cannot create its directory {lock.parent}: {exc.strerror or exc}"
        ) from None
