"""``adaptive-pin run``: the periodic loop, with event-triggered ticks, signals and state.

- a tick every ``controller.interval_s``, and one at once when the driver reports a VM
  started, stopped or changed (at most one per ``EVENT_GAP_S``, so a burst is one tick);
- SIGTERM/SIGINT: the current tick finishes, then the loop ends cleanly (restoring the
  original affinities when ``controller.restore_on_exit`` is set); SIGHUP: reload the config
  file, and keep the old one (with a log line) when the new one is bad;
- the state file (original affinities, cooldowns, rolled-back placements, policy state) is
  written atomically after every tick that changed something, so a restart neither thrashes
  nor forgets how to restore;
- a single-instance lock, taken before anything is touched.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from adaptive_pin import state as statefile
from adaptive_pin.assembly import Assembly, assemble
from adaptive_pin.config import Config, controller_settings, load_config, policy_options, with_overrides
from adaptive_pin.errors import AdaptivePinError
from adaptive_pin.lockfile import InstanceLock
from adaptive_pin.model import TickReport
from policies.registry import get_policy

log = logging.getLogger("adaptive_pin.daemon")

EVENT_GAP_S = 0.2  # coalesce a burst of VM events into one tick
EVENT_POLL_S = 0.5  # how often the loop looks at its signal flags while waiting
STATE_EVERY_TICKS = 12  # also save periodically, so cooldown timestamps stay fresh


@dataclass
class DaemonOptions:
    config_path: str | None = None
    overrides: Mapping[str, object] = field(default_factory=dict)
    max_ticks: int | None = None
    hide_pmu: bool = False
    metrics: bool = True
    on_tick: Callable[[TickReport], None] | None = None  # e.g. the live table


class Daemon:
    def __init__(self, config: Config, options: DaemonOptions) -> None:
        self.config = config
        self.options = options
        self._stop = False
        self._reload = False

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
            asm = assemble(cfg, hide_pmu=self.options.hide_pmu)
            ctl = asm.controller
            self._load_state(asm)
            exporter = None
            if self.options.metrics and cfg.metrics.enabled:
                from adaptive_pin.metrics import MetricsExporter

                exporter = MetricsExporter(host_label=socket.gethostname())
                server = exporter.serve(cfg.metrics.address, flag="metrics.address")
                log.info("metrics on http://%s/metrics", cfg.metrics.address)
            log.info(
                "running: driver %s, policy %s, every %.3gs%s",
                asm.driver_name,
                ctl.policy.name,
                ctl.settings.interval_s,
                " (dry run: nothing is pinned)" if ctl.settings.dry_run else "",
            )
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
        next_due = time.monotonic()
        last_tick = 0.0
        while not self._stop:
            if self._reload:
                self._reload = False
                self._reload_config(asm)
            report = ctl.tick(trigger=trigger)
            last_tick = time.monotonic()
            if exporter is not None:
                exporter.observe(report)
            if self.options.on_tick is not None:
                self.options.on_tick(report)
            if report.applied or report.outcomes or ctl.ticks % STATE_EVERY_TICKS == 0:
                self._save_state(asm, report)
            if self.options.max_ticks is not None and ctl.ticks >= self.options.max_ticks:
                break
            interval = ctl.settings.interval_s
            next_due += interval
            if next_due < last_tick:
                log.warning(
                    "tick %d took %.3gs, over the %.3gs interval: skipping to the next one",
                    ctl.ticks,
                    report.duration_s,
                    interval,
                )
                next_due = last_tick + interval
            trigger = self._wait(asm, next_due, last_tick)

    def _wait(self, asm: Assembly, deadline: float, last_tick: float) -> str:
        """Until the next tick is due, an event arrives, or a signal asks for attention."""
        while not self._stop and not self._reload:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timer"
            try:
                events = asm.runtime.driver.events(timeout=min(remaining, EVENT_POLL_S))
            except AdaptivePinError as exc:
                log.warning("driver events: %s", exc)
                time.sleep(min(max(remaining, 0.0), EVENT_POLL_S))
                continue
            if events:
                for ev in events:
                    log.info("event: %s %s (%s)", ev.name, ev.kind, ev.guest_id)
                gap = last_tick + EVENT_GAP_S - time.monotonic()
                if gap > 0:
                    time.sleep(gap)
                return "event"
        return "timer"

    # --- reload, state, exit ---------------------------------------------------------
    def _reload_config(self, asm: Assembly) -> None:
        path = self.options.config_path
        try:
            new = with_overrides(load_config(path), **dict(self.options.overrides))
            policy = None
            if (new.policy.name, dict(new.policy.options)) != (
                self.config.policy.name,
                dict(self.config.policy.options),
            ):
                policy = get_policy(new.policy.name, **policy_options(new))
        except AdaptivePinError as exc:
            log.error("SIGHUP: new config refused, keeping the old one: %s", exc)
            return
        ctl = asm.controller
        ctl.settings = controller_settings(new)
        ctl.guard.settings = new.guard
        ctl.journal.settings = new.verify
        if policy is not None:
            ctl.policy, ctl.policy_state = policy, policy.initial_state()
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

    def _save_state(self, asm: Assembly, report: TickReport | None) -> None:
        placement = statefile.placement_of(report.snapshot.guests) if report else {}
        try:
            statefile.save_state(self.config.daemon.state_file, statefile.capture(asm.controller, placement))
        except (AdaptivePinError, OSError) as exc:
            log.error("state file %s not written: %s", self.config.daemon.state_file, exc)

    def _shutdown(self, asm: Assembly) -> None:
        ctl = asm.controller
        try:
            if self.config.controller.restore_on_exit and not ctl.settings.dry_run:
                failures = ctl.restore()
                for key, why in failures.items():
                    log.error("restore %s vcpu %d failed: %s", key[0], key[1], why)
                if not failures:
                    ctl.original_affinity.clear()
            self._save_state(asm, None)
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
    Path(config.daemon.lock_file).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
