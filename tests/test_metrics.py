"""MetricsExporter: what observe() accumulates and what collect() renders, checked on the text format."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adaptive_pin.errors import UsageError
from adaptive_pin.metrics import DEFAULT_ADDRESS, DEFAULT_PORT, MetricsExporter, parse_address
from adaptive_pin.model import CpuSet, MemoryMove, Verdict
from tests.conftest import require
from tests.metrics_helpers import demo_host, move, outcome, tick_report

Labels = frozenset[tuple[str, str]]


def scrape(exporter: MetricsExporter) -> dict[str, dict[Labels, float]]:
    """Sample name -> {labels -> value}, parsed back from the exposition the server would send."""
    text = generate_latest(exporter.registry).decode()
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for lab, v in samples.get(name, {}).items() if want <= lab]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples in {samples.get(name)}"
    return hits[0]


def labelsets(samples: dict[str, dict[Labels, float]], name: str) -> list[dict[str, str]]:
    return [dict(lab) for lab in samples.get(name, {})]


@pytest.fixture
def exporter() -> MetricsExporter:
    return MetricsExporter("hv1")


def test_before_any_tick_only_build_info_is_exported(exporter: MetricsExporter) -> None:
    s = scrape(exporter)
    assert value(s, "adaptive_pin_build_info", host="hv1") == 1
    assert "adaptive_pin_vcpu_mpki" not in s
    assert "adaptive_pin_last_tick_timestamp_seconds" not in s


def test_vcpu_counters_come_from_totals_and_gauges_from_rates(exporter: MetricsExporter) -> None:
    _, (_web, db), snap = demo_host(tick=1)
    exporter.observe(tick_report(snap))
    s = scrape(exporter)
    # demo_host: db vCPU 0 misses 8e6/s over 105 s, 5e8 instructions/s, utilization 0.5.
    assert value(s, "adaptive_pin_vcpu_llc_misses_total", domain="db", vcpu="0") == pytest.approx(8e6 * 105)
    assert value(s, "adaptive_pin_vcpu_instructions_total", domain="db", vcpu="0") == pytest.approx(5e8 * 105)
    assert value(s, "adaptive_pin_vcpu_cycles_total", domain="db", vcpu="0") == pytest.approx(4e8 * 105)
    assert value(s, "adaptive_pin_vcpu_cpu_seconds_total", domain="web", vcpu="1") == pytest.approx(52.5)
    assert value(s, "adaptive_pin_vcpu_run_delay_seconds_total", domain="web", vcpu="1") == pytest.approx(
        1.05
    )
    assert value(s, "adaptive_pin_vcpu_mpki", domain="db", vcpu="0") == pytest.approx(16.0)
    assert value(s, "adaptive_pin_vcpu_mpki", domain="web", vcpu="1") == pytest.approx(1.0)
    assert value(s, "adaptive_pin_vcpu_ipc", domain="web", vcpu="0") == pytest.approx(1.25)
    assert value(s, "adaptive_pin_vcpu_utilization_ratio", domain="db", vcpu="1") == pytest.approx(0.5)
    assert len(s["adaptive_pin_vcpu_mpki"]) == 4
    assert {d["domain"] for d in labelsets(s, "adaptive_pin_vm_info")} == {"web", "db"}
    assert value(s, "adaptive_pin_vm_info", domain="db", managed="true", uuid=db.id) == 1


def test_counters_track_the_latest_totals_across_ticks(exporter: MetricsExporter) -> None:
    for tick in (1, 2, 3):
        exporter.observe(tick_report(demo_host(tick=tick)[2], tick=tick))
    s = scrape(exporter)
    assert value(s, "adaptive_pin_vcpu_llc_misses_total", domain="web", vcpu="0") == pytest.approx(2e6 * 115)
    assert value(s, "adaptive_pin_ticks_total", trigger="timer") == 3


def test_without_pmu_hardware_counters_are_absent_not_zero(exporter: MetricsExporter) -> None:
    exporter.observe(tick_report(demo_host(pmu=False)[2]))
    s = scrape(exporter)
    for name in ("llc_misses_total", "instructions_total", "cycles_total", "mpki", "ipc"):
        assert f"adaptive_pin_vcpu_{name}" not in s, name
    assert "adaptive_pin_llc_domain_misses_per_second" not in s
    assert value(s, "adaptive_pin_vcpu_cpu_seconds_total", domain="db", vcpu="1") == pytest.approx(52.5)
    assert value(s, "adaptive_pin_collector_capability", counter="llc_misses") == 0
    reason = next(
        d["reason"] for d in labelsets(s, "adaptive_pin_collector_capability") if d["counter"] == "cycles"
    )
    assert reason.startswith("no PMU")
    assert value(s, "adaptive_pin_collector_capability", counter="cpu_time_s", reason="") == 1


def test_placement_info_names_pu_set_llc_and_node(exporter: MetricsExporter) -> None:
    exporter.observe(tick_report(demo_host()[2]))
    s = scrape(exporter)
    by_vcpu = {(d["domain"], d["vcpu"]): d for d in labelsets(s, "adaptive_pin_vcpu_placement_info")}
    assert (by_vcpu[("web", "1")]["cpus"], by_vcpu[("web", "1")]["llc"], by_vcpu[("web", "1")]["node"]) == (
        "1,5",
        "0",
        "0",
    )
    assert (by_vcpu[("db", "0")]["llc"], by_vcpu[("db", "0")]["node"]) == ("1", "1")
    # Unpinned: the mask reaches every PU, so both L3 domains and both nodes.
    assert (by_vcpu[("db", "1")]["cpus"], by_vcpu[("db", "1")]["llc"], by_vcpu[("db", "1")]["node"]) == (
        "0-7",
        "0,1",
        "0,1",
    )


def test_llc_pressure_sums_misses_where_each_vcpu_last_ran(exporter: MetricsExporter) -> None:
    exporter.observe(tick_report(demo_host()[2]))
    s = scrape(exporter)
    # web 0+1 ran on CPUs 0,1 (L3 0): 2e6 + 1e6. db 0 ran on CPU 2, db 1 (unpinned) on CPU 7: L3 1.
    assert value(s, "adaptive_pin_llc_domain_misses_per_second", llc="0") == pytest.approx(3e6)
    assert value(s, "adaptive_pin_llc_domain_misses_per_second", llc="1") == pytest.approx(12e6)
    assert value(s, "adaptive_pin_llc_domain_vcpus", llc="0") == 2
    assert value(s, "adaptive_pin_llc_domain_vcpus", llc="1") == 2
    assert value(s, "adaptive_pin_llc_domain_info", llc="1", cpus="2,3,6,7", source="L3") == 1
    assert value(s, "adaptive_pin_llc_domain_size_bytes", llc="0") == 16 << 20


def test_migrations_refusals_and_dry_run(exporter: MetricsExporter) -> None:
    _, (web, db), snap = demo_host()
    m1 = move(db, 1, CpuSet.of(3, 7))
    m2 = move(web, 0, CpuSet.of(2, 6), kind="cohesion")
    exporter.observe(tick_report(snap, planned=[m1, m2], applied=[m1], refused=[(m2, "cooldown: 30 s left")]))
    exporter.observe(tick_report(snap, tick=2, planned=[m1], applied=[m1]))
    exporter.observe(tick_report(snap, tick=3, planned=[m2], applied=[m2], dry_run=True))
    s = scrape(exporter)
    assert value(s, "adaptive_pin_migrations_total", kind="rebalance", policy="cache_aware") == 2
    # A dry-run tick pins nothing, so its "applied" moves are plans, not migrations.
    assert [d for d in labelsets(s, "adaptive_pin_migrations_total") if d["kind"] == "cohesion"] == []
    assert value(s, "adaptive_pin_moves_planned_total", kind="cohesion") == 2
    assert value(s, "adaptive_pin_moves_planned_total", kind="rebalance") == 2
    assert value(s, "adaptive_pin_moves_refused_total", kind="cohesion") == 1
    assert value(s, "adaptive_pin_controller_info", dry_run="true", policy="cache_aware") == 1


def test_memory_migrations_are_counted_unless_dry_run(exporter: MetricsExporter) -> None:
    _, (_web, db), snap = demo_host()
    mm = MemoryMove(db.id, db.name, CpuSet.of(0), CpuSet.of(1), "test", 0.5)
    exporter.observe(tick_report(snap, memory_applied=[mm]))
    exporter.observe(tick_report(snap, tick=2, memory_applied=[mm], dry_run=True))
    assert value(scrape(exporter), "adaptive_pin_memory_migrations_total", policy="cache_aware") == 1


def test_verdicts_rollbacks_and_before_after_histograms(exporter: MetricsExporter) -> None:
    _, (web, db), snap = demo_host()
    kept = move(db, 0, CpuSet.of(3, 7))
    worse = move(web, 1, CpuSet.of(2, 6))
    exporter.observe(
        tick_report(
            snap,
            outcomes=[
                outcome(kept, 8.0, 4.0, Verdict.KEPT),
                outcome(worse, 1.0, 3.0, Verdict.ROLLED_BACK),
                outcome(worse, None, None, Verdict.UNMEASURED),
                outcome(kept, 8.0, None, Verdict.PENDING),
            ],
        )
    )
    s = scrape(exporter)
    assert value(s, "adaptive_pin_move_verdicts_total", verdict="kept") == 1
    assert value(s, "adaptive_pin_move_verdicts_total", verdict="rolled_back") == 1
    assert value(s, "adaptive_pin_move_verdicts_total", verdict="unmeasured") == 1
    assert not [d for d in labelsets(s, "adaptive_pin_move_verdicts_total") if d["verdict"] == "pending"]
    assert value(s, "adaptive_pin_rollbacks_total", policy="cache_aware") == 1
    # Only the two measured moves enter the histograms, in both of them.
    assert value(s, "adaptive_pin_move_mpki_before_count") == 2
    assert value(s, "adaptive_pin_move_mpki_after_count") == 2
    assert value(s, "adaptive_pin_move_mpki_before_sum") == pytest.approx(9.0)
    assert value(s, "adaptive_pin_move_mpki_after_sum") == pytest.approx(7.0)
    assert value(s, "adaptive_pin_move_mpki_before_bucket", le="5.0") == 1  # the 1.0
    assert value(s, "adaptive_pin_move_mpki_before_bucket", le="10.0") == 2  # and the 8.0
    assert value(s, "adaptive_pin_move_mpki_after_bucket", le="2.0") == 0
    assert value(s, "adaptive_pin_move_mpki_after_bucket", le="5.0") == 2
    assert value(s, "adaptive_pin_move_mpki_after_before_ratio", domain="db") == pytest.approx(0.5)
    assert value(s, "adaptive_pin_move_mpki_after_before_ratio", domain="web") == pytest.approx(3.0)


def test_ratio_keeps_the_latest_move_and_vanished_vms_disappear(exporter: MetricsExporter) -> None:
    topo, (web, db), snap = demo_host()
    m = move(db, 0, CpuSet.of(3, 7))
    exporter.observe(tick_report(snap, outcomes=[outcome(m, 8.0, 4.0, Verdict.KEPT)]))
    exporter.observe(tick_report(snap, tick=2, outcomes=[outcome(m, 4.0, 5.0, Verdict.KEPT)]))
    assert value(scrape(exporter), "adaptive_pin_move_mpki_after_before_ratio", domain="db") == pytest.approx(
        1.25
    )
    # db stops: its ratio and every per-vCPU series of it go, web's stay.
    from tests.metrics_helpers import snapshot

    only_web = snapshot(topo, [web], {k: v for k, v in snap.rates.items() if k[0] == web.id})
    exporter.observe(tick_report(only_web, tick=3))
    s = scrape(exporter)
    assert "adaptive_pin_move_mpki_after_before_ratio" not in s
    assert {d["domain"] for d in labelsets(s, "adaptive_pin_vcpu_mpki")} == {"web"}
    assert {d["domain"] for d in labelsets(s, "adaptive_pin_vcpu_placement_info")} == {"web"}


def test_controller_health(exporter: MetricsExporter) -> None:
    snap = demo_host()[2]
    exporter.observe(tick_report(snap, wall_time=1000.0, duration_s=0.25, interval_s=2.0, errors={"pin": 2}))
    exporter.observe(
        tick_report(
            snap,
            tick=2,
            wall_time=1002.0,
            duration_s=0.5,
            interval_s=2.0,
            trigger="event",
            errors={"pin": 1, "guest_gone": 1, "sample": 0},
            inventory_errors={"db": "domain not found"},
        )
    )
    s = scrape(exporter)
    assert value(s, "adaptive_pin_last_tick_timestamp_seconds") == pytest.approx(1002.5)
    assert value(s, "adaptive_pin_tick_interval_seconds") == 2.0
    assert value(s, "adaptive_pin_ticks_total", trigger="timer") == 1
    assert value(s, "adaptive_pin_ticks_total", trigger="event") == 1
    assert value(s, "adaptive_pin_tick_duration_seconds_count") == 2
    assert value(s, "adaptive_pin_tick_duration_seconds_sum") == pytest.approx(0.75)
    assert value(s, "adaptive_pin_tick_duration_seconds_bucket", le="0.25") == 1
    assert value(s, "adaptive_pin_errors_total", kind="pin") == 3
    assert value(s, "adaptive_pin_errors_total", kind="guest_gone") == 1
    assert not [d for d in labelsets(s, "adaptive_pin_errors_total") if d["kind"] == "sample"]
    assert value(s, "adaptive_pin_inventory_errors") == 1


def test_names_and_labels_follow_prometheus_conventions(exporter: MetricsExporter) -> None:
    _, (_web, db), snap = demo_host()
    m = move(db, 0, CpuSet.of(3, 7))
    exporter.observe(
        tick_report(snap, applied=[m], outcomes=[outcome(m, 8.0, 4.0, Verdict.KEPT)], errors={"pin": 1})
    )
    text = generate_latest(exporter.registry).decode()
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("adaptive_pin_")]
    assert len(families) > 25
    for f in families:
        assert not any(unit in f.name for unit in ("_ms", "milli", "percent")), f.name
        for s in f.samples:
            assert s.labels.get("host") == "hv1", s
            assert not {"tid", "pid", "thread"} & set(s.labels), s
            if f.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
            if s.name.endswith("_ratio") and "after_before" not in s.name:
                assert 0.0 <= s.value <= 1.0, s


def test_promtool_check_metrics_finds_nothing(exporter: MetricsExporter) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (Debian package prometheus)")
    assert promtool is not None
    _, (_web, db), snap = demo_host()
    m = move(db, 0, CpuSet.of(3, 7))
    exporter.observe(
        tick_report(
            snap,
            planned=[m],
            applied=[m],
            refused=[(m, "budget")],
            outcomes=[outcome(m, 8.0, 4.0, Verdict.ROLLED_BACK)],
            errors={"pin": 1},
        )
    )
    text = generate_latest(exporter.registry)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.decode(), done.stderr.decode()) == (0, "", "")


def test_observe_and_scrape_concurrently(exporter: MetricsExporter) -> None:
    snaps = [demo_host(tick=t)[2] for t in range(1, 4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrape(exporter)
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)
                return

    t = threading.Thread(target=scraper)
    t.start()
    try:
        for i in range(300):
            exporter.observe(tick_report(snaps[i % 3], tick=i + 1))
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert value(scrape(exporter), "adaptive_pin_ticks_total", trigger="timer") == 300


def test_serve_answers_over_http_and_shuts_down(exporter: MetricsExporter) -> None:
    exporter.observe(tick_report(demo_host()[2]))
    server = exporter.serve("127.0.0.1:0")
    host, port = server.address
    try:
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert 'adaptive_pin_vcpu_mpki{domain="db",host="hv1",vcpu="0"} 16.0' in body
    finally:
        server.shutdown()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # nobody listens any more


def test_serve_on_a_busy_port_is_a_usage_error(exporter: MetricsExporter) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=rf"--metrics-address 127.0.0.1:{port}: cannot listen"):
            exporter.serve(f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:19650", ("127.0.0.1", 19650)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9999", ("::1", 9999)),
        ("hv1.example.org:1234", ("hv1.example.org", 1234)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["19650", ":19650", "localhost:", "localhost:http", "h:70000", "::1:80"])
def test_parse_address_rejects_with_the_flag_named(text: str) -> None:
    with pytest.raises(UsageError, match="--metrics-address"):
        parse_address(text)


def test_default_address_is_loopback_on_the_documented_port() -> None:
    assert DEFAULT_ADDRESS.startswith("127.0.0.1:")
    assert parse_address(DEFAULT_ADDRESS)[1] == DEFAULT_PORT
    assert not 9100 <= DEFAULT_PORT <= 9999  # that range of the allocations wiki is full
    assert DEFAULT_PORT < 32768  # below Linux's ephemeral ports


def test_prepare_creates_every_known_label_set_at_zero(exporter: MetricsExporter) -> None:
    # increase() cannot see the first jump of a series born at 1: the daemon prepares the
    # bounded, known label sets before its first scrape so a first move, error or rollback shows.
    from adaptive_pin.metrics import ERROR_KINDS, MOVE_KINDS, TRIGGERS, VERDICTS

    exporter.prepare("cache-aware")
    s = scrape(exporter)
    for kind in MOVE_KINDS:
        for name in ("migrations", "moves_planned", "moves_refused"):
            assert value(s, f"adaptive_pin_{name}_total", policy="cache-aware", kind=kind) == 0
    assert "initial" in MOVE_KINDS and "rollback" in MOVE_KINDS
    for verdict in VERDICTS:
        assert value(s, "adaptive_pin_move_verdicts_total", policy="cache-aware", verdict=verdict) == 0
    assert "pending" not in VERDICTS
    assert value(s, "adaptive_pin_rollbacks_total", policy="cache-aware") == 0
    for kind in ERROR_KINDS:
        assert value(s, "adaptive_pin_errors_total", kind=kind) == 0
    for trigger in TRIGGERS:
        assert value(s, "adaptive_pin_ticks_total", trigger=trigger) == 0
    assert value(s, "adaptive_pin_tick_overruns_total") == 0
    assert value(s, "adaptive_pin_move_mpki_before_count", policy="cache-aware") == 0
    # Then the first initial placement is a jump from 0, and the other kinds stay at 0.
    _, (_web, db), snap = demo_host()
    m = move(db, 0, CpuSet.of(3, 7), kind="initial")
    exporter.observe(tick_report(snap, policy="cache-aware", applied=[m]))
    s = scrape(exporter)
    assert value(s, "adaptive_pin_migrations_total", kind="initial") == 1
    assert value(s, "adaptive_pin_migrations_total", kind="rebalance") == 0


def test_daemon_level_faults_and_overruns_are_counted(exporter: MetricsExporter) -> None:
    exporter.count_error("tick")
    exporter.count_error("thread_gone", 3)
    exporter.count_overrun()
    exporter.count_overrun()
    s = scrape(exporter)
    assert value(s, "adaptive_pin_errors_total", kind="tick") == 1
    assert value(s, "adaptive_pin_errors_total", kind="thread_gone") == 3
    assert value(s, "adaptive_pin_tick_overruns_total", host="hv1") == 2
