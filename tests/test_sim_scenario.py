"""Scenario files: validation with one-line errors naming the key; fuzzing never escapes."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

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


# --- [controller] is validated at load, with the config file's own rules ---------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("half_life_s = -3", "s.toml: controller.half_life_s: expected a number > 0, got -3"),
        ('interval_s = "x"', 's.toml: controller.interval_s: expected a number > 0, got "x"'),
        ("interval_s = 0", "s.toml: controller.interval_s: expected a number > 0, got 0"),
        ("dry_run = 1", "s.toml: controller.dry_run: expected true or false, got 1"),
        (
            "bogus_setting = 1",
            "s.toml: controller.bogus_setting: unknown key (known: dry_run, guard, half_life_s, "
            "interval_s, verify)",
        ),
        (
            "guard = { hold_ticks = 0 }",
            "s.toml: controller.guard.hold_ticks: expected an integer >= 1, got 0",
        ),
        (
            "guard = { cooldown_s = -1 }",
            "s.toml: controller.guard.cooldown_s: expected a number >= 0, got -1",
        ),
        ("guard = { nope = 1 }", "s.toml: controller.guard.nope: unknown key (known: budget_per_tick, "),
        ("verify = 3", "s.toml: controller.verify: expected a table, got 3"),
        (
            "verify = { window_ticks = 1.5 }",
            "s.toml: controller.verify.window_ticks: expected an integer >= 1",
        ),
    ],
)
def test_controller_table_is_checked_at_load_types_and_ranges(table: str, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        loads_scenario(GOOD + f"[controller]\n{table}\n", origin="s.toml")
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_controller_table_not_a_table() -> None:
    with pytest.raises(UsageError, match=r"^s\.toml: controller: expected a table, got 3$"):
        loads_scenario("controller = 3\n" + GOOD, origin="s.toml")


def test_a_good_controller_table_is_kept_converted() -> None:
    sc = loads_scenario(
        GOOD + "[controller]\ninterval_s = 2\nhalf_life_s = 4.5\n[controller.guard]\nhold_ticks = 1\n",
        origin="s.toml",
    )
    assert sc.controller == {"interval_s": 2.0, "half_life_s": 4.5, "guard": {"hold_ticks": 1}}
    assert isinstance(sc.controller["interval_s"], float)


def test_every_controller_setting_has_a_rule_in_the_config_declaration() -> None:
    """check_controller reuses config.SECTIONS: a new ControllerSettings field needs a rule there."""
    import dataclasses

    from adaptive_pin.config import SECTIONS
    from adaptive_pin.controller import ControllerSettings

    declared = {s.name: {o.key for o in s.options} for s in SECTIONS}
    for f in dataclasses.fields(ControllerSettings):
        default = getattr(ControllerSettings(), f.name)
        if dataclasses.is_dataclass(default):
            assert {g.name for g in dataclasses.fields(default)} <= declared[f.name], f.name
        else:
            assert f.name in declared["controller"], f.name


def test_a_bad_controller_table_fails_even_with_no_controller_running(tmp_path: Path) -> None:
    from adaptive_pin.sim.runner import run_scenario

    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD + "[controller]\nhalf_life_s = -3\n")
    with pytest.raises(UsageError, match=r"bad\.toml: controller\.half_life_s: expected a number > 0"):
        run_scenario(bad, "none")


def test_controller_overrides_are_checked_like_the_file() -> None:
    from adaptive_pin.sim.runner import run_scenario

    sc = loads_scenario(GOOD, origin="s.toml")
    with pytest.raises(
        UsageError, match=r"^s\.toml: controller\.half_life_s: expected a number > 0, got -3$"
    ):
        run_scenario(sc, "spread", controller={"half_life_s": -3})


# --- duration and seed: one rule for the file and for the overrides ---------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"duration": math.inf}, "duration: expected a positive number, got inf"),
        ({"duration": math.nan}, "duration: expected a positive number, got nan"),
        ({"duration": 0}, "duration: expected a positive number, got 0"),
        ({"duration": 1e9}, "duration: more than 100000 ticks of 1 s, got 1e+09"),
        ({"duration": 0.5}, "duration: shorter than one tick (1 s), got 0.5"),
        ({"seed": -1}, "seed: expected a non-negative integer, got -1"),
        ({"seed": 1.5}, "seed: expected a non-negative integer, got 1.5"),
    ],
)
def test_run_overrides_follow_the_files_rules(kwargs: dict[str, float], message: str) -> None:
    from adaptive_pin.sim.runner import run_scenario

    with pytest.raises(UsageError) as exc:
        run_scenario(loads_scenario(GOOD), "none", **kwargs)  # type: ignore[arg-type]
    assert str(exc.value) == message


def test_the_tick_cap_is_the_same_in_the_file() -> None:
    from adaptive_pin.sim.scenario import MAX_TICKS

    loads_scenario(GOOD.replace("duration = 30", f"duration = {MAX_TICKS}"))
    with pytest.raises(UsageError, match=r"^s\.toml: duration: more than 100000 ticks of 1 s, got 100001$"):
        loads_scenario(GOOD.replace("duration = 30", f"duration = {MAX_TICKS + 1}"), origin="s.toml")
    with pytest.raises(UsageError, match=r"^s\.toml: seed: expected a non-negative integer, got -1$"):
        loads_scenario("seed = -1\n" + GOOD, origin="s.toml")


# --- paths: relative to the scenario file; messages name the file as given ---------------------


def _vm_table() -> str:
    return '[[vms]]\nname = "a"\nvcpus = 1\nworkload = "sort"\n'


def test_relative_topology_path_is_relative_to_the_scenario_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptive_pin.fixtures import fixture_root
    from adaptive_pin.sim.host import SimHost
    from adaptive_pin.sim.scenario import load_scenario

    here = tmp_path / "scenarios"
    (here / "hosts").mkdir(parents=True)
    (here / "hosts" / "box").symlink_to(fixture_root("8em64t-4c2t"))
    f = here / "s.toml"
    f.write_text('[host]\ntopology = "hosts/box"\n' + _vm_table())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory has no hosts/box
    host = SimHost(load_scenario(f))
    assert len(host.topology.pus) == 8
    monkeypatch.chdir(here)  # ... and a relative scenario path works the same
    assert len(SimHost(load_scenario("s.toml")).topology.pus) == 8


def test_host_errors_name_the_scenario_file(tmp_path: Path) -> None:
    from adaptive_pin.sim.host import SimHost
    from adaptive_pin.sim.scenario import load_scenario

    f = tmp_path / "s.toml"
    f.write_text('[host]\ntopology = "no-such-tree"\n' + _vm_table())
    with pytest.raises(UsageError) as exc:
        SimHost(load_scenario(f))
    msg = str(exc.value)
    assert msg.startswith(
        f"{f}: host.topology: 'no-such-tree' is neither a sysfs tree ({tmp_path}/no-such-tree"
    )
    assert "\n" not in msg
    (tmp_path / "empty").mkdir()  # a directory, but no sysfs tree: the topology reader's message
    f.write_text('[host]\ntopology = "empty"\n' + _vm_table())
    at = re.escape(str(f))
    with pytest.raises(UsageError, match=rf"^{at}: host\.topology: .*empty.*missing"):
        SimHost(load_scenario(f))
    f.write_text('[host]\ntopology = "8em64t-4c2t"\nreserved = "8-11"\n' + _vm_table())
    with pytest.raises(UsageError, match=rf"^{at}: host\.reserved: CPUs 8-11 are not online on this host"):
        SimHost(load_scenario(f))
    f.write_text('[host]\nsynthetic = {}\nreserved = "99"\n' + _vm_table())
    with pytest.raises(UsageError, match=rf"^{at}: host\.reserved: CPUs 99 are not on the synthetic host"):
        SimHost(load_scenario(f))


def test_scenario_errors_name_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_pin.sim.scenario import load_scenario

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"^sub/passwd: not valid TOML"):
        load_scenario("sub/passwd")
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path))}/sub/passwd: not valid TOML"):
        load_scenario(tmp_path / "sub" / "passwd")


@pytest.mark.parametrize("key", ["duration", "controller.interval_s", "controller.guard.cooldown_s"])
def test_an_integer_too_big_for_a_float_is_a_usage_error(key: str) -> None:
    *tables, leaf = key.split(".")
    line = f"{leaf} = 1{'0' * 400}"
    text = GOOD + f"[{'.'.join(tables)}]\n{line}\n" if tables else GOOD.replace("duration = 30", line)
    with pytest.raises(UsageError, match=rf"^s\.toml: {re.escape(key)}: expected a (positive )?number"):
        loads_scenario(text, origin="s.toml")


@settings(max_examples=100, deadline=None)
@given(
    table=st.dictionaries(
        st.sampled_from(["interval_s", "dry_run", "half_life_s", "guard", "verify", "bogus"]),
        st.one_of(
            toml_value,
            st.integers(-(10**30), 10**30),
            st.dictionaries(
                st.sampled_from(["hold_ticks", "cooldown_s", "window_ticks", "rollback_margin", "x"]),
                st.one_of(toml_scalar, st.integers(-(10**30), 10**30)),
                max_size=3,
            ),
        ),
        max_size=4,
    )
)
def test_fuzz_controller_tables_only_ever_raise_usage_error(table: dict[str, object]) -> None:
    text = GOOD + "[controller]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in table.items())
    with contextlib.suppress(UsageError):
        loads_scenario(text)
