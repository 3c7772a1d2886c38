"""Real machines' sysfs trees shipped with the package (from hwloc's test suite).

Each tree is ``data/topologies/<name>.tar.xz`` beside ``<name>.expected.json`` (hwloc's reading
of it). ``fixture_root(name)`` unpacks a tree once into a per-user cache and returns the
directory to hand to ``read_topology``. Provenance and license: data/topologies/README.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from adaptive_pin.errors import UsageError

FIXTURE_DIR = Path(__file__).resolve().parent / "data" / "topologies"
_SUFFIXES = (".tar.xz", ".tar.gz")


def _tarball(name: str) -> Path:
    for suffix in _SUFFIXES:
        p = FIXTURE_DIR / f"{name}{suffix}"
        if p.is_file():
            return p
    raise UsageError(f"unknown topology fixture {name!r}; known: {', '.join(fixture_names()) or '(none)'}")


def fixture_names() -> list[str]:
    """Names of the shipped trees, sorted."""
    if not FIXTURE_DIR.is_dir():
        return []
    names = {p.name.removesuffix(s) for p in FIXTURE_DIR.iterdir() for s in _SUFFIXES if p.name.endswith(s)}
    return sorted(names)


def expected(name: str) -> dict[str, Any]:
    """hwloc's reading of the tree (see the README for each key's meaning)."""
    _tarball(name)
    data: dict[str, Any] = json.loads((FIXTURE_DIR / f"{name}.expected.json").read_text())
    return data


def _cache_base() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "adaptive-pin" / "topologies"


@cache
def _digest(tarball: Path) -> str:
    return hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]


def fixture_root(name: str) -> Path:
    """The unpacked tree of ``name`` (a directory holding ``sys/``, ``proc/``...).

    Unpacked once per content hash; safe when several processes ask at the same time: each
    unpacks into its own temporary directory and the first rename wins.
    """
    tarball = _tarball(name)
    leaf = f"{name}-{_digest(tarball)}"
    for base in (_cache_base(), Path(tempfile.gettempdir()) / f"adaptive-pin-{os.getuid()}" / "topologies"):
        final = base / leaf
        if final.is_dir():
            return final
        try:
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{leaf}.", dir=base))
        except OSError:
            continue  # read-only home (some CI runners): fall back to the temp dir
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            os.rename(tmp, final)
        except OSError as exc:
            if not final.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise UsageError(f"cannot unpack {tarball} into {base}: {exc}") from None
        except tarfile.TarError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"{tarball}: broken fixture archive: {exc}") from None
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race: another process renamed first
        return final
    raise UsageError(f"cannot unpack {tarball}: no writable cache directory")
