"""Scenario files: validation with one-line errors naming the key; fuzzing never escapes."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuSet
from adaptive_pin.sim.scenario import loads_scenario, shipped_scenarios

GOOD = """
duration = 30
[host]
synthetic = { packages = 2, cores_per_llc = 4 }
[[vms]]
name = "a"
vcpus = 2
workload = "sort"
[[vms]]
name = "b"
count = 3
vcpus = 1
workload = "redis"
pinned_cpus = "0-1"
"""


def test_a_good_scenario_expands_replicas_and_keeps_used_workloads_only() -> None:
    sc = loads_scenario(GOOD, origin="s.toml")
    assert [v.name for v in sc.vms] == ["a", "b-1", "b-2", "b-3"]
    assert sc.vms[1].pinned_cpus == CpuSet.parse("0-1")
    assert set(sc.workloads) == {"sort", "redis"}
    assert sc.vcpu_count == 5


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (("vcpus = 2", 'vcpus = "x"'), 's.toml: vms[0].vcpus: expected a positive integer, got "x"'),
        (("vcpus = 1", "vcpus = 0"), "s.toml: vms[1].vcpus: expected a positive integer, got 0"),
        (('workload = "sort"', 'workload = "nope"'), "s.toml: vms[0].workload: unknown workload"),
        (("duration = 30", "duration = -1"), "s.toml: duration: expected a positive number, got -1"),
        (('pinned_cpus = "0-1"', 'pinned_cpus = "3-1"'), "s.toml: vms[1].pinned_cpus: bad cpulist"),
        (("count = 3", "count = 3\ncolour = 1"), "s.toml: vms[1].colour: unknown key"),
        (
            ("duration = 30", "duration = 30\n[workloads.w]\nmpki = { big = 1 }"),
            "s.toml: workloads.w.mpki.big",
        ),
    ],
)
def test_errors_name_the_file_and_key_path(patch: tuple[str, str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        loads_scenario(GOOD.replace(*patch, 1), origin="s.toml")
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_inline_workload_curve_and_overrides() -> None:
    text = GOOD.replace(
        "duration = 30",
        'duration = 30\n[workloads.kv]\nclass = "e-server"\nmpki = { "1MiB" = 4.0, "16MiB" = 1.0 }\n'
        "[workloads.sort]\nshared_fraction = 0.9",
    ).replace('workload = "redis"', 'workload = "kv"')
    sc = loads_scenario(text)
    assert sc.workloads["kv"].mpki == (4.0, 1.0)
    assert sc.workloads["sort"].shared_fraction == 0.9


def test_not_toml_and_not_utf8_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"x\.toml: not valid TOML"):
        loads_scenario("[[vms]\n", origin="x.toml")
    with pytest.raises(UsageError, match=r"x\.toml: not UTF-8"):
        loads_scenario(b"\xff\xfe", origin="x.toml")


def test_unknown_shipped_name_lists_the_shipped_ones() -> None:
    from adaptive_pin.sim.scenario import load_scenario

    with pytest.raises(UsageError, match=r"shipped: .*demo"):
        load_scenario("no-such-scenario")
    assert {"demo", "mixed-cloud", "noisy-neighbours", "snc", "overcommit", "churn", "phase-change"} <= set(
        shipped_scenarios()
    )


toml_scalar = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=6), st.booleans(), st.just("0-3")
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["name", "vcpus", "x", "at"]), inner, max_size=3),
    ),
    max_leaves=8,
)
KEYS = [
    "name",
    "duration",
    "tick",
    "seed",
    "host",
    "vms",
    "workloads",
    "controller",
    "curves",
    "count",
    "vcpus",
]


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(st.sampled_from(KEYS), toml_value, max_size=6))
def test_fuzz_structured_documents_only_ever_raise_usage_error(doc: dict[str, object]) -> None:
    text = "\n".join(f"{k} = {_toml(v)}" for k, v in doc.items())
    try:
        loads_scenario(text)
    except UsageError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_fuzz_garbage_only_ever_raises_usage_error(raw: bytes | str) -> None:
    with pytest.raises(UsageError):
        loads_scenario(raw)


@settings(max_examples=80, deadline=None)
@given(
    vm=st.dictionaries(
        st.sampled_from(
            [
                "name",
                "vcpus",
                "workload",
                "count",
                "start",
                "stop",
                "load",
                "pinning",
                "phases",
                "memory_nodes",
                "pinned_cpus",
            ]
        ),
        toml_value,
        max_size=8,
    )
)
def test_fuzz_vm_tables_only_ever_raise_usage_error(vm: dict[str, object]) -> None:
    text = "[host]\nsynthetic = {}\n[[vms]]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in vm.items())
    with contextlib.suppress(UsageError):
        loads_scenario(text)
