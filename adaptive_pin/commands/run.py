"""``adaptive-pin run``: the daemon: a tick every interval, and at once on VM start/stop/change."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable

from adaptive_pin.commands._controller_args import (
    CONTROLLER_EPILOG,
    add_controller_arguments,
    effective_config,
)
from adaptive_pin.config import DEFAULT_PATH
from adaptive_pin.daemon import Daemon, DaemonOptions, ensure_dirs, setup_logging
from adaptive_pin.errors import UsageError
from adaptive_pin.model import TickReport

ORDER = 50

EPILOG = (
    """\
Each tick: inventory, sample, decide, guard (hysteresis, cooldown, budget), pin, verify (a move
whose MPKI got worse is rolled back). Logs one line per decision on stderr. Metrics for
Prometheus on --metrics-address (default 127.0.0.1:19650). SIGHUP reloads the config file;
SIGTERM/SIGINT end after the current tick.

Examples:
  adaptive-pin run                                     the daemon, as systemd runs it
  adaptive-pin run --dry-run -v                        log what it would do, pin nothing
  adaptive-pin run --driver sim --scenario scenarios/demo.toml --watch \\
      --state-file /tmp/ap/state.json --lock-file /tmp/ap/lock
"""
    + "\n"
    + CONTROLLER_EPILOG.format(default=DEFAULT_PATH)
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="the daemon: re-pin periodically and on VM events",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_controller_arguments(p)
    g = p.add_argument_group("daemon")
    g.add_argument("--dry-run", action="store_true", default=None, help="decide and log, pin nothing")
    g.add_argument("--metrics-address", metavar="HOST:PORT", help="Prometheus endpoint (loopback by default)")
    g.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    g.add_argument(
        "--state-file", metavar="FILE", help="state file (default /var/lib/adaptive-pin/state.json)"
    )
    g.add_argument(
        "--lock-file", metavar="FILE", help="instance lock (default /run/adaptive-pin/adaptive-pin.lock)"
    )
    restore = g.add_mutually_exclusive_group()
    restore.add_argument(
        "--restore-on-exit",
        dest="restore",
        action="store_true",
        default=None,
        help="put every vCPU back where it was found when the daemon ends (default)",
    )
    restore.add_argument("--no-restore-on-exit", dest="restore", action="store_false")
    g.add_argument("--log-format", choices=("journald", "plain"), help="stderr log style")
    g.add_argument("--ticks", type=int, metavar="N", help="stop after N ticks (tests, soak runs)")
    g.add_argument("--watch", action="store_true", help="live table of every vCPU in the terminal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.ticks is not None and args.ticks < 1:
        raise UsageError(
            f"--ticks {args.ticks}: expected a number of ticks >= 1 (leave it out to run until stopped)"
        )
    config, overrides = effective_config(
        args,
        **{
            "controller.dry_run": args.dry_run,
            "controller.restore_on_exit": args.restore,
            "metrics.address": args.metrics_address,
            "metrics.enabled": False if args.no_metrics else None,
            "daemon.state_file": args.state_file,
            "daemon.lock_file": args.lock_file,
            "daemon.log_format": args.log_format,
        },
    )
    setup_logging(config.daemon.log_format, args.verbose)
    ensure_dirs(config)
    on_tick = None
    if args.watch:
        on_tick = _live_table()
    options = DaemonOptions(
        config_path=args.config,
        overrides=overrides,
        max_ticks=args.ticks,
        hide_pmu=args.no_pmu,
        on_tick=on_tick,
    )
    return Daemon(config, options).run()


def _live_table() -> Callable[[TickReport], None]:
    """Redraw the per-vCPU table on stdout after every tick (logs stay on stderr)."""
    from adaptive_pin import live_table

    def show(report: TickReport) -> None:
        snap = report.snapshot
        rows = live_table.table_rows(snap.guests, snap.rates, no_pmu=not snap.has_pmu)
        moved = ", ".join(f"{m.guest_name}/{m.vcpu}->{m.to_cpus}" for m in report.applied) or "none"
        head = (
            f"adaptive-pin run  tick {report.tick}  policy {report.policy}  "
            f"{sum(len(g.vcpus) for g in snap.guests)} vCPUs  moves: {moved}"
        )
        width = shutil.get_terminal_size().columns
        out = "\n".join([head[:width], "", *live_table.render(rows, width)])
        sys.stdout.write("\x1b[H\x1b[2J" + out + "\n")
        sys.stdout.flush()

    return show
