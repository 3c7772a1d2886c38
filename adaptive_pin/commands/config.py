"""``adaptive-pin config``: check a config file against this host; print the defaults."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adaptive_pin.config import (
    DEFAULT_PATH,
    Config,
    load_config,
    render_markdown,
    render_toml,
    to_dict,
    validate_against,
)
from adaptive_pin.errors import AdaptivePinError

ORDER = 80

DESCRIPTION = f"""\
Work with adaptive-pin's configuration file ({DEFAULT_PATH}, TOML).

  check           validate a file (unknown keys, types, ranges, CPU lists against this host's
                  topology, duplicate VM entries) and print the effective configuration, every
                  default filled in; a problem is one line naming the key, and exit status 2
  show-defaults   print every option with its default and its meaning, as a commented TOML
                  file to start from (deploy/config.toml is exactly this)
"""

EPILOG = f"""\
examples:
  adaptive-pin config check                         check {DEFAULT_PATH}
  adaptive-pin config check ./config.toml --json    the effective configuration as JSON
  adaptive-pin config check new.toml --sysfs-root /tmp/dump    check CPU lists against a sysfs dump
  adaptive-pin config show-defaults > config.toml   a complete, commented starting point
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "config",
        help="check a config file; print the defaults",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    check = sub.add_parser(
        "check",
        help="validate a config file and print the effective configuration",
        description="Validate FILE and print the effective configuration (defaults filled in). "
        "CPU lists are checked against the topology under --sysfs-root (default: the file's "
        "host.sysfs_root) when it can be read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        type=Path,
        help=f"the file to check (default: {DEFAULT_PATH}; when that does not exist, the defaults)",
    )
    check.add_argument(
        "--sysfs-root",
        metavar="DIR",
        type=Path,
        help="check CPU lists against DIR/sys/devices/system/... (a dump of another host); "
        "an unreadable DIR is an error, while an unreadable default root is only noted",
    )
    check.add_argument("--json", action="store_true", help="print the result and configuration as JSON")
    check.set_defaults(func=run_check)

    defaults = sub.add_parser(
        "show-defaults",
        help="print every option with its default, as a commented TOML file",
        description="Print every option with its default value and meaning.",
        epilog="examples:\n  adaptive-pin config show-defaults > /etc/adaptive-pin/config.toml\n"
        "  adaptive-pin config show-defaults --markdown   the option reference of docs/configuration.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = defaults.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the defaults as JSON")
    fmt.add_argument("--markdown", action="store_true", help="the option reference as Markdown tables")
    defaults.set_defaults(func=run_show_defaults)


def _topology_check(config: Config, root: Path | None) -> dict[str, Any]:
    """Validate against the topology under ``root``; an explicit root must be readable."""
    from adaptive_pin.topology import read_topology

    where = root if root is not None else config.host.sysfs_root
    try:
        topology = read_topology(where)
    except (AdaptivePinError, OSError) as exc:
        if root is not None:
            raise
        return {"checked": False, "root": str(where), "note": f"topology not readable: {exc}"}
    applied = validate_against(config, topology)
    return {
        "checked": True,
        "root": str(where),
        "online": applied.online.to_list(),
        "reserved": applied.reserved.to_list(),
        "usable": applied.usable.to_list(),
    }


def run_check(args: argparse.Namespace) -> int:
    if args.file is None and not DEFAULT_PATH.exists():
        config, file_note = Config(), f"{DEFAULT_PATH} does not exist: the defaults apply"
    else:
        config = load_config(args.file if args.file is not None else DEFAULT_PATH)
        file_note = None
    topo = _topology_check(config, args.sysfs_root)
    if args.json:
        out = {
            "file": str(args.file or DEFAULT_PATH),
            "valid": True,
            "note": file_note,
            "topology": topo,
            "config": to_dict(config),
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    lines = [f"# {args.file or DEFAULT_PATH}: valid"]
    if file_note:
        lines.append(f"# {file_note}")
    if topo["checked"]:
        lines.append(
            f"# checked against the topology under {topo['root']}: online {topo['online']}, "
            f"reserved {topo['reserved'] or 'none'}, usable for vCPUs {topo['usable']}"
        )
    else:
        lines.append(f"# CPU lists not checked against a host: {topo['note']}")
    lines.append("# effective configuration (defaults filled in):")
    print("\n".join(lines))
    print()
    sys.stdout.write(render_toml(config, comments=False))
    return 0


def run_show_defaults(args: argparse.Namespace) -> int:
    if args.json:
        json.dump(to_dict(Config()), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.markdown:
        sys.stdout.write(render_markdown())
    else:
        sys.stdout.write(render_toml())
    return 0
