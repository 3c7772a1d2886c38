"""The ``adaptive-pin`` command: argument parsing and one-line errors; the work is elsewhere."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from adaptive_pin import __version__, commands
from adaptive_pin.errors import AdaptivePinError


def _command_modules() -> list[ModuleType]:
    """Every module in adaptive_pin.commands, in the order of their ``ORDER`` (for --help)."""
    mods = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


DESCRIPTION = """\
Pin the vCPUs of running VMs to host CPUs, driven by cache-miss telemetry.

Typical use:
  adaptive-pin topology                 what this host looks like (packages, NUMA, L3, SMT)
  adaptive-pin status                   every VM's vCPU threads, where they run, MPKI, util
  adaptive-pin plan                     advice: what would move and why (touches nothing)
  adaptive-pin apply                    one shot: decide, pin, report MPKI before and after
  adaptive-pin run                      the daemon (periodic + on VM events), with metrics
  adaptive-pin simulate demo            the same controller on a simulated host, scored
  adaptive-pin bench                    every scenario under every policy, side by side
  adaptive-pin config check             validate /etc/adaptive-pin/config.toml

Each command's --help has examples.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptive-pin",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log lines on stderr (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        module.register(sub)
    for command in sub.choices.values():  # -v after the command too: "adaptive-pin run -v"
        command.add_argument(
            "-v", "--verbose", action="count", default=0, dest="command_verbose",
            help="more log lines on stderr (-vv: debug)",
        )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "command_verbose", 0)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="adaptive-pin: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args.func(args)
        return rc
    except AdaptivePinError as exc:
        print(f"adaptive-pin: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
