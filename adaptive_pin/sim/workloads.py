"""Workloads: measured MPKI-vs-LLC-size curves plus the few per-class constants the model needs.

Curves come from ``adaptive_pin/data/workloads/miss_curves.json`` (cachegrind, see its README)
or any file of the same schema. Every constant is explained in docs/simulator.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adaptive_pin.errors import UsageError

FloatArray = npt.NDArray[np.float64]

MIB = 1 << 20

# Per-class defaults (docs/simulator.md, "Workload constants"). Keys are the curve file's
# class labels; anything else falls back to DEFAULT_CLASS.
CLASS_BASE_CPI: Mapping[str, float] = {
    "a-compute": 0.5,
    "b-sensitive": 0.7,
    "c-streaming": 0.7,
    "d-random": 0.8,
    "e-server": 0.9,
}
# Misses outstanding at once: latency is divided by this (prefetch + out-of-order overlap).
CLASS_MLP: Mapping[str, float] = {
    "a-compute": 2.0,
    "b-sensitive": 2.0,
    "c-streaming": 6.0,
    "d-random": 1.0,
    "e-server": 1.5,
}
# Part of the working set a VM's vCPUs share with each other.
CLASS_SHARED_FRACTION: Mapping[str, float] = {
    "a-compute": 0.0,
    "b-sensitive": 0.3,
    "c-streaming": 0.05,
    "d-random": 0.1,
    "e-server": 0.5,
}
DEFAULT_CLASS = "b-sensitive"

_SIZE_KEY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)\s*$")
_UNIT = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


@dataclass(frozen=True)
class Workload:
    """One program's miss curve and model constants.

    ``sizes`` are LLC sizes in bytes (ascending), ``mpki`` the misses per kilo-instruction there,
    made non-increasing: under LRU a bigger cache never misses more (Mattson's inclusion
    property), so a rise between two points is run-to-run noise of the measurement.
    """

    name: str
    sizes: tuple[float, ...]
    mpki: tuple[float, ...]
    llc_accesses_pki: float
    klass: str = DEFAULT_CLASS
    base_cpi: float = CLASS_BASE_CPI[DEFAULT_CLASS]
    mlp: float = CLASS_MLP[DEFAULT_CLASS]
    shared_fraction: float = CLASS_SHARED_FRACTION[DEFAULT_CLASS]
    source: str = "inline"

    def mpki_at(self, size_bytes: float) -> float:
        """MPKI at one LLC share, interpolated in log2(size) and clamped at the curve's ends."""
        x = math.log2(max(size_bytes, 1.0))
        return float(np.interp(x, np.log2(self.sizes), self.mpki))

    def knots(self, k: int) -> tuple[FloatArray, FloatArray]:
        """The curve as exactly ``k`` knots (log2 bytes, mpki), padded flat on the right."""
        xs = np.log2(np.asarray(self.sizes, dtype=np.float64))
        ys = np.asarray(self.mpki, dtype=np.float64)
        pad = k - len(xs)
        if pad > 0:
            xs = np.concatenate([xs, xs[-1] + np.arange(1, pad + 1, dtype=np.float64)])
            ys = np.concatenate([ys, np.full(pad, ys[-1])])
        return xs, ys


def make_workload(
    name: str,
    points: Sequence[tuple[float, float]],
    *,
    llc_accesses_pki: float | None = None,
    klass: str = DEFAULT_CLASS,
    base_cpi: float | None = None,
    mlp: float | None = None,
    shared_fraction: float | None = None,
    source: str = "inline",
) -> Workload:
    """Build a workload from (size bytes, mpki) points, filling constants from its class."""
    pts = sorted((float(s), float(m)) for s, m in points)
    if not pts:
        raise ValueError(f"workload {name!r} has no curve points")
    sizes = [s for s, _ in pts]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"workload {name!r} gives two MPKI values for one size")
    mono = np.minimum.accumulate(np.asarray([m for _, m in pts], dtype=np.float64))
    return Workload(
        name=name,
        sizes=tuple(sizes),
        mpki=tuple(float(v) for v in mono),
        llc_accesses_pki=float(llc_accesses_pki if llc_accesses_pki is not None else mono[0]),
        klass=klass,
        base_cpi=base_cpi
        if base_cpi is not None
        else CLASS_BASE_CPI.get(klass, CLASS_BASE_CPI[DEFAULT_CLASS]),
        mlp=mlp if mlp is not None else CLASS_MLP.get(klass, CLASS_MLP[DEFAULT_CLASS]),
        shared_fraction=(
            shared_fraction
            if shared_fraction is not None
            else CLASS_SHARED_FRACTION.get(klass, CLASS_SHARED_FRACTION[DEFAULT_CLASS])
        ),
        source=source,
    )


def parse_size(text: str) -> float:
    """``"8MiB"`` -> bytes; raises ValueError on anything else."""
    m = _SIZE_KEY.match(text)
    if not m:
        raise ValueError(f"expected a size such as '8MiB', got {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if value < 0:
        raise UsageError(f"{where}: expected a non-negative number, got {value!r}")
    return float(value)


def parse_curves(data: Any, origin: str) -> dict[str, Workload]:
    """Workloads from a decoded miss_curves.json document; errors name ``origin`` and the key."""
    if not isinstance(data, dict) or not isinstance(data.get("workloads"), list):
        raise UsageError(f"{origin}: expected an object with a 'workloads' list")
    out: dict[str, Workload] = {}
    for i, entry in enumerate(data["workloads"]):
        where = f"{origin}: workloads[{i}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}.name: expected a non-empty string, got {name!r}")
        curve = entry.get("mpki")
        if not isinstance(curve, dict) or not curve:
            raise UsageError(f"{where}.mpki: expected an object of size -> MPKI")
        points: list[tuple[float, float]] = []
        for key, value in curve.items():
            try:
                size = parse_size(str(key))
            except ValueError as exc:
                raise UsageError(f"{where}.mpki: {exc}") from None
            points.append((size, _num(value, f"{where}.mpki.{key}")))
        klass = entry.get("class", DEFAULT_CLASS)
        if not isinstance(klass, str):
            raise UsageError(f"{where}.class: expected a string, got {klass!r}")
        acc = entry.get("llc_accesses_pki")
        try:
            out[name] = make_workload(
                name,
                points,
                llc_accesses_pki=None if acc is None else _num(acc, f"{where}.llc_accesses_pki"),
                klass=klass,
                source=origin,
            )
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return out


def load_curves(path: str | Path | None = None) -> dict[str, Workload]:
    """The shipped curves (``path=None``) or those of another file of the same schema."""
    if path is None:
        ref = resources.files("adaptive_pin") / "data" / "workloads" / "miss_curves.json"
        return parse_curves(json.loads(ref.read_text(encoding="utf-8")), "miss_curves.json")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not JSON: {exc}") from None
    return parse_curves(data, str(p))
