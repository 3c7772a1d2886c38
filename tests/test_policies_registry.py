"""The policy registry: built-ins, options, errors, and a real plug-in package found by entry point."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from adaptive_pin.errors import UsageError
from policies import registry
from policies.base import Policy
from policies.cache_aware import CacheAwarePolicy
from policies.registry import available_policies, get_policy
from tests.policy_helpers import guest, make_topology, rates, snapshot

PLUGIN_DIR = Path(__file__).parent / "plugins" / "example_policy"
BUILTIN = ("cache-aware", "numa", "pack", "uncore", "spread", "none")


def test_builtins_are_listed_with_one_line_descriptions() -> None:
    listed = available_policies()
    assert tuple(listed)[: len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        assert listed[name] and "\n" not in listed[name]
        policy = get_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name
        assert policy.description == listed[name]


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(UsageError) as err:
        get_policy("cache-awre")
    message = str(err.value)
    assert "cache-awre" in message
    for name in BUILTIN:
        assert name in message


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(UsageError) as err:
        get_policy("cache-aware", granularty="pu")
    assert "granularty" in str(err.value)
    assert "granularity" in str(err.value) and "min_gain" in str(err.value)


def test_bad_option_value_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="granularity"):
        get_policy("cache-aware", granularity="socket")
    with pytest.raises(UsageError, match="min_gain"):
        get_policy("cache-aware", min_gain="lots")
    with pytest.raises(UsageError, match="exit"):
        get_policy("cache-aware", enter="0.01", exit="0.5")


def test_string_options_are_converted_to_the_default_type() -> None:
    policy = get_policy("cache-aware", granularity="pu", max_moves="3", min_gain="0.25")
    assert isinstance(policy, CacheAwarePolicy)
    assert (policy.granularity, policy.max_moves, policy.min_gain) == ("pu", 3, 0.25)
    numa = get_policy("numa", reevaluate_s="60")
    assert getattr(numa, "reevaluate_s", None) == 60.0


def test_typed_options_must_have_the_default_type() -> None:
    # a config file's values arrive typed: a wrong type is refused when the policy is built,
    # not by TypeError in every decision of the daemon
    for key, value, want in (
        ("max_moves", 32.5, "max_moves=32.5: expected an integer"),
        ("max_moves", True, "max_moves=true: expected an integer"),
        ("min_gain", False, "min_gain=false: expected a number"),
        ("migrate_memory", 1, "migrate_memory=1: expected true or false"),
    ):
        with pytest.raises(UsageError, match=f"^policy cache-aware: option {want}$"):
            get_policy("cache-aware", **{key: value})
    policy = get_policy("cache-aware", min_gain=0, max_moves=3, migrate_memory=False)
    assert isinstance(policy, CacheAwarePolicy)
    assert (policy.min_gain, policy.max_moves, policy.migrate_memory) == (0, 3, False)


def test_policy_without_options_rejects_any() -> None:
    with pytest.raises(UsageError, match=r"valid options: \(none\)"):
        get_policy("none", speed="1")


def _fake_entry_points(*eps: EntryPoint) -> object:
    def entry_points(group: str) -> tuple[EntryPoint, ...]:
        return eps if group == registry.ENTRY_POINT_GROUP else ()

    return entry_points


def test_broken_plugin_is_a_warning_naming_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = EntryPoint("broken-one", "no_such_module_for_adaptive_pin:Policy", registry.ENTRY_POINT_GROUP)
    shadow = EntryPoint("pack", "policies.none:NonePolicy", registry.ENTRY_POINT_GROUP)
    fine = EntryPoint("quiet", "policies.none:NonePolicy", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points(broken, shadow, fine))
    with caplog.at_level(logging.WARNING, logger="adaptive_pin.policies"):
        listed = available_policies()
    assert "broken-one" not in listed
    assert listed["pack"].startswith("static first-fit")  # the built-in wins
    assert "quiet" in listed
    text = caplog.text
    assert "broken-one" in text and "no_such_module_for_adaptive_pin" in text
    assert "'pack'" in text and "built-in" in text
    with pytest.raises(UsageError, match="unknown policy 'broken-one'"):
        get_policy("broken-one")


def _install(target: Path) -> None:
    """pip-install the example plug-in into ``target``; without ``wheel`` (setuptools < 70.1 cannot
    build one) lay out what pip would: the package plus a .dist-info with its entry points."""
    if importlib.util.find_spec("wheel") is not None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(target),
                str(PLUGIN_DIR),
            ],
            check=True,
            capture_output=True,
        )
        return
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    shutil.copytree(PLUGIN_DIR / "example_policy", target / "example_policy")
    info = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    eps = meta["entry-points"][registry.ENTRY_POINT_GROUP]
    lines = [f"[{registry.ENTRY_POINT_GROUP}]", *(f"{k} = {v}" for k, v in eps.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "site"
    target.mkdir()
    _install(target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("example_policy", None)
        importlib.invalidate_caches()


def test_installed_plugin_is_found_by_name(installed_plugin: Path) -> None:
    listed = available_policies()
    assert listed["sticky-llc"] == "example plug-in: keep each vCPU in the LLC domain it last ran in"
    policy = get_policy("sticky-llc", granularity="node")
    assert policy.name == "sticky-llc"
    with pytest.raises(UsageError, match="granularity"):
        get_policy("sticky-llc", granularity="pu")

    topo = make_topology()
    g = guest("a", [topo.online, topo.online], last_cpus=[5, 1])
    snap = snapshot(topo, [g], {("a", 0): rates(1.0, 1e6, 5), ("a", 1): rates(1.0, 1e6, 1)})
    plan, _ = get_policy("sticky-llc").decide(snap, None)
    assert {m.vcpu: m.to_cpus for m in plan.moves} == {0: topo.llc_of(5).cpus, 1: topo.llc_of(1).cpus}


def test_plugin_gone_after_uninstall() -> None:
    assert "sticky-llc" not in available_policies()
