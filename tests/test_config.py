"""The config file: defaults, every kind of bad input (as UsageError naming the key, and through
the CLI as one stderr line + exit 2), host validation, overrides, conversions, and the shipped
example and docs staying equal to the option declaration."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

import policies.registry as policies_registry
from adaptive_pin import cli, pinnability
from adaptive_pin.config import (
    SECTIONS,
    VM_OPTIONS,
    Config,
    VmRule,
    controller_settings,
    load_config,
    metrics_listen,
    parse_config,
    pinnability_rules,
    policy_options,
    render_markdown,
    render_toml,
    to_dict,
    validate_against,
    with_overrides,
)
from adaptive_pin.errors import UsageError
from adaptive_pin.fixtures import fixture_root
from adaptive_pin.guard import GuardSettings
from adaptive_pin.model import CpuSet, Topology
from adaptive_pin.verify import VerifySettings

REPO = Path(__file__).resolve().parent.parent


def topo(online: str = "0-3", offline: str = "", isolated: str = "", allowed: str | None = None) -> Topology:
    """A flat host: one package, one LLC, one core per PU."""
    pus = tuple(CpuSet.parse(online))
    n = len(pus)
    zeros = np.zeros(n, dtype=np.int64)
    return Topology(
        root="/test",
        pus=pus,
        offline=CpuSet.parse(offline),
        cores=tuple(CpuSet.of(p) for p in pus),
        packages=(CpuSet(pus),),
        numa_nodes={},
        l2=(),
        l3=(),
        llc=(),
        llc_source="package",
        isolated=CpuSet.parse(isolated),
        allowed=CpuSet.parse(allowed) if allowed is not None else CpuSet(pus),
        reserved=CpuSet(),
        pu_core=np.arange(n, dtype=np.int64),
        pu_package=zeros,
        pu_l2=zeros - 1,
        pu_llc=zeros,
        pu_node=zeros - 1,
    )


@pytest.fixture
def any_policy_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that accepts any policy options (these tests are about the config file)."""
    registry = policies_registry
    monkeypatch.setattr(registry, "get_policy", lambda name, **options: object())


# --------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------


def test_empty_file_is_all_defaults() -> None:
    assert parse_config("", "x.toml") == Config()


def test_values_are_typed_and_defaults_fill_the_rest() -> None:
    c = parse_config(
        """
        [host]
        reserved = "0,2-3"
        [guard]
        cooldown_s = 30          # an int where a float is expected is fine
        hold_ticks = 3
        [driver]
        name = "qemu"
        [driver.qmp]
        web1 = "/run/qemu/web1.qmp"
        [[pinnability.vm]]
        name = "db1"
        mode = "off"
        [[pinnability.vm]]
        uuid = "6C0B1D63-3A53-4F3B-9C5E-0F5F2C3E8A10"
        whole_cores = true
        [metrics]
        address = "[::1]:9000"
        """,
        "x.toml",
    )
    assert c.host.reserved == CpuSet.of(0, 2, 3)
    assert c.guard == GuardSettings(cooldown_s=30.0, hold_ticks=3)
    assert isinstance(c.guard.cooldown_s, float)
    assert c.driver.name == "qemu" and c.driver.qmp == {"web1": Path("/run/qemu/web1.qmp")}
    assert c.pinnability.vm == (
        VmRule(name="db1", mode="off"),
        VmRule(uuid="6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10", whole_cores=True),
    )
    assert c.verify == VerifySettings()
    assert metrics_listen(c) == ("::1", 9000)
    assert c.source == "x.toml"


# --------------------------------------------------------------------------------------
# Bad input: one UsageError naming file and key
# --------------------------------------------------------------------------------------

BAD = [
    pytest.param(
        '[guard]\ncooldown_s = "soon"',
        'x.toml: guard.cooldown_s: expected a number >= 0, got "soon"',
        id="type",
    ),
    pytest.param(
        "[guard]\ncooldown_s = -1", "x.toml: guard.cooldown_s: expected a number >= 0, got -1", id="range"
    ),
    pytest.param(
        "[guard]\nhold_ticks = 0", "x.toml: guard.hold_ticks: expected an integer >= 1, got 0", id="int-range"
    ),
    pytest.param(
        "[guard]\nhold_ticks = 2.5",
        "x.toml: guard.hold_ticks: expected an integer >= 1, got 2.5",
        id="int-type",
    ),
    pytest.param(
        "[controller]\ninterval_s = 0",
        "x.toml: controller.interval_s: expected a number > 0, got 0",
        id="exclusive",
    ),
    pytest.param(
        "[controller]\ninterval_s = inf",
        "x.toml: controller.interval_s: expected a number > 0, got inf",
        id="inf",
    ),
    pytest.param(
        "[controller]\ndry_run = 1", "x.toml: controller.dry_run: expected true or false, got 1", id="bool"
    ),
    pytest.param(
        "[verify]\nwindow_ticks = true",
        "x.toml: verify.window_ticks: expected an integer >= 1, got true",
        id="bool-is-not-int",
    ),
    pytest.param(
        "[guard]\ncooldwn_s = 1",
        "x.toml: guard.cooldwn_s: unknown key (did you mean cooldown_s?)",
        id="unknown-key",
    ),
    pytest.param("[gaurd]\n", "x.toml: gaurd: unknown section (did you mean guard?)", id="unknown-section"),
    pytest.param("guard = 5", "x.toml: guard: expected a table ([guard]), got 5", id="section-not-table"),
    pytest.param(
        '[driver]\nname = "xen"',
        'x.toml: driver.name: expected one of "auto", "libvirt", "qemu", "sim", got "xen"',
        id="choice",
    ),
    pytest.param(
        '[driver.qmp]\nweb1 = "relative.sock"',
        'x.toml: driver.qmp.web1: expected an absolute path, got "relative.sock"',
        id="qmp-path",
    ),
    pytest.param(
        '[host]\nreserved = "3-1"',
        'x.toml: host.reserved: expected a cpulist such as "0-1,8", got "3-1"',
        id="cpulist",
    ),
    pytest.param(
        '[host]\nsysfs_root = "sys"',
        'x.toml: host.sysfs_root: expected an absolute path, got "sys"',
        id="path",
    ),
    pytest.param(
        '[metrics]\naddress = "localhost"',
        'x.toml: metrics.address: expected HOST:PORT, an IPv6 host in brackets ([::1]:PORT), got "localhost"',
        id="address",
    ),
    pytest.param(
        '[daemon]\nlog_format = "json"',
        'x.toml: daemon.log_format: expected one of "journald", "plain", got "json"',
        id="log-format",
    ),
    pytest.param(
        '[[pinnability.vm]]\nname = "a"\n[[pinnability.vm]]\nname = "a"',
        'x.toml: pinnability.vm[1].name: "a" is already configured by pinnability.vm[0]',
        id="duplicate-name",
    ),
    pytest.param(
        '[[pinnability.vm]]\nuuid = "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10"\n'
        '[[pinnability.vm]]\nuuid = "6C0B1D63-3A53-4F3B-9C5E-0F5F2C3E8A10"',
        'x.toml: pinnability.vm[1].uuid: "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10" '
        "is already configured by pinnability.vm[0]",
        id="duplicate-uuid-any-case",
    ),
    pytest.param(
        '[[pinnability.vm]]\nmode = "off"',
        "x.toml: pinnability.vm[0]: give exactly one of name or uuid",
        id="vm-unnamed",
    ),
    pytest.param(
        '[[pinnability.vm]]\nname = "a"\nuuid = "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10"',
        "x.toml: pinnability.vm[0]: give exactly one of name or uuid",
        id="vm-both",
    ),
    pytest.param(
        '[[pinnability.vm]]\nname = "a"\nmode = "manual"',
        'x.toml: pinnability.vm[0].mode: expected one of "auto", "off", got "manual"',
        id="vm-mode",
    ),
    pytest.param(
        '[[pinnability.vm]]\nname = "a"\npriority = 2',
        "x.toml: pinnability.vm[0].priority: unknown key "
        "(known keys: latency_sensitive, mode, name, uuid, whole_cores)",
        id="vm-unknown",
    ),
    pytest.param(
        '[[pinnability.vm]]\nuuid = "not-a-uuid"',
        "x.toml: pinnability.vm[0].uuid: expected a UUID such as "
        '"6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10", got "not-a-uuid"',
        id="vm-uuid",
    ),
    pytest.param(
        '[pinnability]\nvm = "db1"',
        'x.toml: pinnability.vm: expected [[pinnability.vm]] tables, got "db1"',
        id="vm-not-array",
    ),
    pytest.param(
        "[policy.options]\nwhen = 1979-05-27",
        "x.toml: policy.options.when: dates and times are not supported here, got 1979-05-27",
        id="option-date",
    ),
    pytest.param(
        "[guard]\nhold_ticks = 1\nhold_ticks = 2",
        "x.toml: at the end of the file: invalid TOML: Cannot overwrite a value",
        id="duplicate-toml-key",
    ),
    pytest.param(
        "[guard]\ncooldown_s = ",
        "x.toml: at the end of the file: invalid TOML: Invalid value",
        id="syntax-eof",
    ),
    pytest.param(
        '[host]\nreserved = "\\q"',
        "x.toml: line 2, column 15: invalid TOML: Unescaped '\\' in a string",
        id="syntax-line-col",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config_is_one_usage_error_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_config(text, "x.toml")
    assert str(err.value) == message
    assert err.value.exit_code == 2


@pytest.mark.parametrize(("text", "message"), BAD[:3] + BAD[-3:])
def test_cli_check_prints_one_line_and_exits_2(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.toml"
    path.write_text(text)
    rc = cli.main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.splitlines() == [f"adaptive-pin: {message.replace('x.toml', str(path), 1)}"]


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[driver]\nlibvirt_uri = "caf\xe9"\n')
    with pytest.raises(UsageError, match=r"latin1\.toml: not UTF-8 text \(byte 27\)"):
        load_config(bad)


def test_default_path_missing_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import adaptive_pin.config as config_mod

    monkeypatch.setattr(config_mod, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert load_config(None) == Config()


def test_policy_options_are_judged_by_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = policies_registry
    seen: list[tuple[str, dict[str, object]]] = []

    def fake_get_policy(name: str, **options: object) -> object:
        seen.append((name, options))
        if name != "cache-aware":
            raise UsageError(f"unknown policy {name!r}: choose one of cache-aware")
        if options.get("threshold", 0) == -1:
            raise ValueError("threshold must be >= 0")
        return object()

    monkeypatch.setattr(registry, "get_policy", fake_get_policy)
    c = parse_config("[policy.options]\nthreshold = 2\nweights = { a = [1, 2] }\n", "x.toml")
    assert seen[-1] == ("cache-aware", {"threshold": 2, "weights": {"a": [1, 2]}})
    assert c.policy.options["threshold"] == 2
    with pytest.raises(UsageError, match=r"^x\.toml: policy\.name: unknown policy 'nope'"):
        parse_config('[policy]\nname = "nope"', "x.toml")
    with pytest.raises(
        UsageError, match=r"^x\.toml: policy\.options: policy cache-aware: ValueError: threshold must"
    ):
        parse_config("[policy.options]\nthreshold = -1", "x.toml")


def test_policy_option_of_the_wrong_type_is_refused_at_load() -> None:
    # the real registry: a daemon started with this file would fail every decision
    with pytest.raises(
        UsageError,
        match=r"^x\.toml: policy\.options: policy cache-aware: option max_moves=32\.5: expected an integer$",
    ):
        parse_config("[policy.options]\nmax_moves = 32.5", "x.toml")
    assert parse_config("[policy.options]\nmin_gain = 0", "x.toml").policy.options["min_gain"] == 0


def test_settings_own_validation_is_applied_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def stricter(self: GuardSettings) -> None:
        raise ValueError("a new rule")

    monkeypatch.setattr(GuardSettings, "validate", stricter)
    with pytest.raises(UsageError, match=r"^x\.toml: guard: a new rule$"):
        parse_config("", "x.toml")


# --------------------------------------------------------------------------------------
# Against a host's topology
# --------------------------------------------------------------------------------------


def test_reserved_is_applied_to_the_topology() -> None:
    applied = validate_against(parse_config('[host]\nreserved = "0"', "x.toml"), topo("0-3"))
    assert applied.reserved == CpuSet.of(0)
    assert applied.usable == CpuSet.parse("1-3")


def test_reserved_naming_absent_cpus_is_an_error() -> None:
    c = parse_config('[host]\nreserved = "0,8-9"', "x.toml")
    with pytest.raises(UsageError) as err:
        validate_against(c, topo("0-3", offline="4-7"))
    assert str(err.value) == "x.toml: host.reserved: names CPUs this host does not have: 8,9 (it has 0-7)"


def test_reserved_may_overlap_offline_isolated_and_disallowed_cpus() -> None:
    c = parse_config('[host]\nreserved = "1,2,5"', "x.toml")
    applied = validate_against(c, topo("0-3", offline="5", isolated="2", allowed="0-2"))
    assert applied.usable == CpuSet.of(0)


def test_reserved_covering_every_usable_cpu_is_an_error() -> None:
    c = parse_config('[host]\nreserved = "0-1"', "x.toml")
    with pytest.raises(UsageError) as err:
        validate_against(c, topo("0-3", isolated="2", allowed="0-2"))
    assert str(err.value) == 'x.toml: host.reserved: "0,1" leaves no CPU for vCPUs (usable without it: 0,1)'


def test_cli_check_against_a_sysfs_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fixture_root("8em64t-4c2t")  # online 0-7
    path = tmp_path / "c.toml"
    path.write_text('[host]\nreserved = "0,4"\n')
    assert cli.main(["config", "check", str(path), "--sysfs-root", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True
    assert out["topology"] == {
        "checked": True,
        "root": str(root),
        "online": "0-7",
        "reserved": "0,4",
        "usable": "1-3,5-7",
    }
    assert out["config"]["host"]["reserved"] == "0,4"
    path.write_text('[host]\nreserved = "0-15"\n')
    assert cli.main(["config", "check", str(path), "--sysfs-root", str(root)]) == 2
    assert capsys.readouterr().err == (
        f"adaptive-pin: {path}: host.reserved: names CPUs this host does not have: 8-15 (it has 0-7)\n"
    )


def test_cli_check_prints_the_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[guard]\nhold_ticks = 4\n")
    empty_root = tmp_path / "no-sysfs"
    empty_root.mkdir()
    # The file's own sysfs_root is unreadable: noted, not fatal (unlike an explicit --sysfs-root).
    path.write_text(f'[guard]\nhold_ticks = 4\n[host]\nsysfs_root = "{empty_root}"\n')
    assert cli.main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# CPU lists not checked against a host: topology not readable" in out
    effective = parse_config(out, "stdout")
    assert effective.guard.hold_ticks == 4
    assert effective == dataclasses.replace(
        Config(),
        guard=GuardSettings(hold_ticks=4),
        host=dataclasses.replace(Config().host, sysfs_root=empty_root),
    )
    assert cli.main(["config", "check", str(path), "--sysfs-root", str(empty_root)]) == 2


# --------------------------------------------------------------------------------------
# Overrides and conversions
# --------------------------------------------------------------------------------------


def test_flags_override_the_file_and_none_means_not_given() -> None:
    file = parse_config('[controller]\ninterval_s = 2\ndry_run = false\n[host]\nreserved = "0"', "x.toml")
    c = with_overrides(
        file,
        **{"controller.dry_run": True, "controller.interval_s": None, "host.reserved": CpuSet.of(1, 2)},
    )
    assert c.controller.dry_run is True  # the flag wins
    assert c.controller.interval_s == 2.0  # flag not given: the file's value stays
    assert c.host.reserved == CpuSet.of(1, 2)
    assert c.source == "x.toml + command line"
    assert file.controller.dry_run is False  # frozen: the original is untouched
    assert with_overrides(file, **{"controller.dry_run": None}) == file


def test_overrides_are_validated_like_the_file(any_policy_options: None) -> None:
    c = parse_config("", "x.toml")
    with pytest.raises(
        UsageError, match=r"^command line: controller\.interval_s: expected a number > 0, got 0$"
    ):
        with_overrides(c, **{"controller.interval_s": 0})
    with pytest.raises(UsageError, match=r"^command line: controller\.intervl_s: unknown key"):
        with_overrides(c, **{"controller.intervl_s": 1})
    c2 = with_overrides(c, **{"policy.options.threshold": 3, "metrics.address": "0.0.0.0:9"})
    assert c2.policy.options == {"threshold": 3}
    c3 = with_overrides(c2, **{"policy.options.weights": {"a": [1, 2]}})
    assert policy_options(c3) == {"threshold": 3, "weights": {"a": [1, 2]}}
    assert type(policy_options(c3)["weights"]["a"]) is list
    assert c2.metrics.address == "0.0.0.0:9"


def test_conversions_to_the_settings_objects() -> None:
    c = parse_config(
        "[controller]\ninterval_s = 1\ndry_run = true\nhalf_life_s = 4\n[guard]\nbudget_per_tick = 2\n"
        "[verify]\nwindow_ticks = 5",
        "x.toml",
    )
    s = controller_settings(c)
    assert (s.interval_s, s.dry_run, s.half_life_s) == (1.0, True, 4.0)
    assert s.guard == GuardSettings(budget_per_tick=2)
    assert s.verify == VerifySettings(window_ticks=5)


def test_pinnability_rules() -> None:
    pin = pinnability
    c = parse_config(
        '[pinnability]\ndefault = "off"\nmanage_orchestrator_pinned = true\n'
        '[[pinnability.vm]]\nname = "db1"\nmode = "off"\n'
        '[[pinnability.vm]]\nuuid = "6C0B1D63-3A53-4F3B-9C5E-0F5F2C3E8A10"\nlatency_sensitive = true\n',
        "x.toml",
    )
    rules = pinnability_rules(c)
    assert rules.default_managed is False and rules.manage_orchestrator_pinned is True
    assert rules.overrides == {
        "db1": pin.Hints(pin.Mode.OFF, None, None),
        "6c0b1d63-3a53-4f3b-9c5e-0f5f2c3e8a10": pin.Hints(pin.Mode.AUTO, None, True),
    }
    uuid_upper = "6C0B1D63-3A53-4F3B-9C5E-0F5F2C3E8A10"
    p = pin.resolve(name="whatever", uuid=uuid_upper, rules=rules)
    assert p.managed and p.latency_sensitive
    assert not pin.resolve(name="db1", uuid=None, rules=rules).managed


# --------------------------------------------------------------------------------------
# One declaration: the parser, the example file and the docs agree
# --------------------------------------------------------------------------------------


def test_every_guard_and_verify_setting_is_an_option() -> None:
    declared = {s.name: {o.key for o in s.options} for s in SECTIONS}
    assert declared["guard"] == {f.name for f in dataclasses.fields(GuardSettings)}
    assert declared["verify"] == {f.name for f in dataclasses.fields(VerifySettings)}
    assert {"interval_s", "dry_run", "half_life_s"} <= declared["controller"]


def test_rendered_defaults_parse_back_to_the_defaults() -> None:
    text = render_toml()
    assert parse_config(text, "defaults") == Config()
    expected = to_dict(Config())
    del expected["pinnability"]["vm"]  # an empty array of tables has no TOML spelling
    assert tomllib.loads(text) == expected


def test_effective_config_round_trips_through_toml(any_policy_options: None) -> None:
    c = parse_config(
        '[host]\nreserved = "1"\n[driver.qmp]\n"vm with space" = "/run/q.sock"\n'
        '[[pinnability.vm]]\nname = "a\\"b"\nwhole_cores = false\n'
        '[policy.options]\nx = [1.5, "t\\u0001"]\ny = { z = true }\n',
        "x.toml",
    )
    assert parse_config(render_toml(c, comments=False), "again") == c
    assert parse_config(render_toml(c), "again") == c


def test_deploy_example_is_exactly_the_documented_defaults() -> None:
    text = (REPO / "deploy" / "config.toml").read_text()
    assert parse_config(text, "deploy/config.toml") == Config()
    assert text == render_toml(), "regenerate: adaptive-pin config show-defaults > deploy/config.toml"
    # ...and documents every option: a comment right above each key.
    lines = text.splitlines()
    for sec in SECTIONS:
        start = lines.index(f"[{sec.name}]")
        for opt in sec.options:
            at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{opt.key} = "))
            assert lines[at - 1].startswith("#"), f"{sec.name}.{opt.key} has no comment"
    for opt in VM_OPTIONS:
        assert f"# {opt.key}: " in text


def test_docs_option_reference_is_generated_from_the_declaration() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    m = re.search(r"<!-- BEGIN GENERATED[^\n]*-->\n(.*)<!-- END GENERATED -->", doc, re.S)
    assert m, "docs/configuration.md lost its GENERATED markers"
    assert m.group(1) == render_markdown(), "regenerate: adaptive-pin config show-defaults --markdown"
    for sec in SECTIONS:
        for opt in sec.options:
            assert f"| `{opt.key}` |" in m.group(1)


def test_show_defaults_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show-defaults"]) == 0
    assert capsys.readouterr().out == render_toml()
    assert cli.main(["config", "show-defaults", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == to_dict(Config())
