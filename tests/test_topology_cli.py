"""``adaptive-pin topology``: output forms, and one-line errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_pin.cli import main
from adaptive_pin.fixtures import fixture_root
from adaptive_pin.topology import read_topology
from adaptive_pin.topology_view import topology_to_json


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["topology", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adaptive-pin: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("bad", ["x", "3-1", "0-", "1,,2"])
def test_bad_reserved_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    rc, out, err = run(capsys, "--fixture", "8em64t-4c2t", "--reserved", bad)
    assert rc == 2
    assert out == ""
    assert one_error_line(err).startswith("adaptive-pin: --reserved: bad cpulist")


def test_reserved_outside_online_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--fixture", "8em64t-4c2t", "--reserved", "6-9")
    assert rc == 2
    assert "reserved CPUs 8,9 are not online" in one_error_line(err)


def test_unknown_fixture_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--fixture", "pdp11")
    assert rc == 2
    line = one_error_line(err)
    assert "unknown topology fixture 'pdp11'" in line
    assert "64amd64-4s2n4ca2co" in line


def test_empty_sysfs_root_is_one_line_naming_the_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, _, err = run(capsys, "--sysfs-root", str(tmp_path))
    assert rc == 2
    assert (
        one_error_line(err) == f"adaptive-pin: {tmp_path}/sys/devices/system/cpu: missing (not a sysfs tree?)"
    )


def test_json_is_the_topology_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--fixture", "32amd64-4s2n4c-cgroup2", "--json", "--reserved", "0")
    assert rc == 0
    got = json.loads(out)
    want = topology_to_json(read_topology(fixture_root("32amd64-4s2n4c-cgroup2")))
    assert got["reserved_pus"] == [0]
    assert got["usable_pus"] == [1, 2, 3, 4, 5]
    for key in ("pu_list", "numa", "l3_domains", "llc_domains", "allowed_pus", "numa_distances", "caches"):
        assert got[key] == want[key], key


def test_text_marks_offline_disallowed_and_package_llc(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--fixture", "16amd64-8n2c-cpusets", "--reserved", "0")
    assert rc == 0
    assert "LLC = the package (no L3 in sysfs)" in out
    assert "PU 7 (disallowed)" in out
    assert "PU 0 (reserved)" in out
    assert "Offline PUs: 4" in out
    assert "Usable for vCPUs: 1-3,5,6,12-15" in out


def test_text_tree_nests_package_node_l3_core(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--fixture", "8em64t-4c2t")
    assert rc == 0
    lines = out.splitlines()
    pkg = next(i for i, line in enumerate(lines) if line.startswith("Package P#0"))
    assert lines[pkg + 1].startswith("  NUMA node 0")
    assert lines[pkg + 2].startswith("    L3 #0 8 MiB (0-7)")
    assert lines[pkg + 3] == "      Core 0: PU 0, PU 4  [L2 256 KiB]"  # private L2: its size only


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["topology", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "adaptive-pin topology --reserved 0,1" in out
    assert "nvidiagpunumanodes" in out  # the shipped machines are listed


def test_fixture_and_sysfs_root_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["topology", "--fixture", "8em64t-4c2t", "--sysfs-root", "/"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "level"),
    [([], 0), (["-v"], 1), (["-vv"], 2)],
)
def test_verbose_counts_before_or_after_the_command(argv: list[str], level: int) -> None:
    from adaptive_pin.cli import build_parser

    p = build_parser()
    before = p.parse_args([*argv, "plan", "--driver", "sim"])
    after = p.parse_args(["plan", "--driver", "sim", *argv])
    assert before.verbose + before.command_verbose == level
    assert after.verbose + after.command_verbose == level
    both = p.parse_args(["-v", "run", "--dry-run", "-v"])
    assert both.verbose + both.command_verbose == 2
