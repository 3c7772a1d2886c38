"""The reader against hwloc itself, on trees that are not shipped: this host, the shared folder,
and any tree an operator or reviewer names.

``ADAPTIVE_PIN_TOPOLOGY_TREES`` (paths separated by ``:``) adds trees: a directory holding
``sys/`` (an unpacked tree), a directory of such trees, or ``.tar.xz|.tar.gz|.tar.bz2`` files as
hwloc's test suite keeps them. A tree with an ``expected.json`` (inside it, or ``NAME.expected.json``
beside it) is compared with that too. hwloc comes from Debian's ``hwloc-nox``; CI installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from adaptive_pin.fixtures import expected, fixture_names, fixture_root
from adaptive_pin.topology import read_topology
from adaptive_pin.topology_view import topology_to_json
from tests import hwloc_oracle
from tests.conftest import require
from tests.test_topology_fixtures import KEY_GROUPS

KEYS = [k for group in KEY_GROUPS.values() for k in group]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "topologies"
TARBALLS = (".tar.xz", ".tar.gz", ".tar.bz2")


def _trees_in(path: Path) -> list[Path]:
    if path.is_file() and path.name.endswith(TARBALLS):
        return [path]
    if (path / "sys").is_dir():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if (p / "sys").is_dir() or p.name.endswith(TARBALLS))
    return []


def extra_trees() -> list[Path]:
    named = [Path(p) for p in os.environ.get("ADAPTIVE_PIN_TOPOLOGY_TREES", "").split(":") if p]
    shared = [SHARED] if SHARED.is_dir() else []
    return [t for p in (*shared, *named) for t in _trees_in(p)]


def _unpacked(tree: Path, tmp: Path) -> Path:
    if tree.is_dir():
        return tree
    with tarfile.open(tree) as tar:
        tar.extractall(tmp, filter="data")  # links out of the tree and device files are refused
    roots = [p.parent for p in tmp.rglob("sys") if p.is_dir() and p.parent != tmp.parent]
    assert roots, f"{tree}: no sys/ inside"
    return min(roots, key=lambda p: len(p.parts))


def _expected_beside(tree: Path) -> dict[str, Any] | None:
    name = tree.name
    for suffix in TARBALLS:
        name = name.removesuffix(suffix)
    for candidate in (tree / "expected.json", tree.parent / f"{name}.expected.json"):
        if candidate.is_file():
            data: dict[str, Any] = json.loads(candidate.read_text())
            return data
    return None


def _diff(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k}: reader {got[k]!r} != hwloc {want[k]!r}" for k in KEYS if got[k] != want[k]]


def _need_hwloc() -> None:
    require(hwloc_oracle.available(), f"{hwloc_oracle.LSTOPO} not installed (Debian: hwloc-nox)")


@pytest.mark.parametrize("name", fixture_names())
def test_the_oracle_reproduces_every_shipped_expected_json(name: str) -> None:
    # Proves the oracle is the command that made expected.json, so its verdict elsewhere counts.
    _need_hwloc()
    assert _diff(hwloc_oracle.reading(fixture_root(name)), expected(name)) == []


def test_this_host_matches_hwloc() -> None:
    _need_hwloc()
    got = topology_to_json(read_topology(Path("/")))
    assert _diff(got, hwloc_oracle.reading(Path("/"))) == []


@pytest.mark.parametrize("tree", extra_trees(), ids=lambda p: p.name)
def test_trees_not_shipped_match_hwloc(tree: Path, tmp_path: Path) -> None:
    root = _unpacked(tree, tmp_path)
    got = topology_to_json(read_topology(root))
    want = _expected_beside(tree)
    if want is not None:
        assert _diff(got, want) == [], f"{tree} against its expected.json"
    oracle = None
    if hwloc_oracle.available():
        try:
            oracle = hwloc_oracle.reading(root)
        except subprocess.CalledProcessError as exc:  # hwloc gives up on some trees the reader reads
            assert want is not None, f"{tree}: lstopo failed ({exc.stderr.strip()[-200:]}), no expected.json"
    if oracle is not None:
        assert _diff(got, oracle) == [], f"{tree} against lstopo"
    assert want is not None or oracle is not None, f"{tree}: no expected.json and no lstopo to compare with"
