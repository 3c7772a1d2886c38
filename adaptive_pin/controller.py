"""The control loop of one tick: inventory, sample, decide, guard, act, verify.

    driver.inventory() -> sampler (collectors -> rates) -> Snapshot
        -> policy.decide() -> Plan -> Guard -> driver.pin() -> MoveJournal (before/after)
                                       -> driver.migrate_memory() (a VM now wholly on other nodes)

A fault in one VM (gone between inventory and pin, a refused pin) is counted and logged for
that VM and the tick goes on; a fault of a whole stage (driver down, policy crashed) ends that
tick with an error in the report and the next tick starts afresh. The controller never raises
out of ``tick()`` for a runtime fault.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from adaptive_pin.errors import AdaptivePinError, GuestGoneError, PinError
from adaptive_pin.guard import Guard, GuardSettings
from adaptive_pin.model import (
    CpuSet,
    Guest,
    Inventory,
    MemoryMove,
    Move,
    MoveOutcome,
    Plan,
    Snapshot,
    TickReport,
    Topology,
    VCpuKey,
    Verdict,
)
from adaptive_pin.verify import MoveJournal, VerifySettings
from collectors.base import Collector
from collectors.sampler import Sampler
from policies.base import Policy, is_movable

log = logging.getLogger("adaptive_pin.controller")


@dataclass(frozen=True)
class ControllerSettings:
    interval_s: float = 5.0
    dry_run: bool = False
    half_life_s: float = 10.0  # EWMA half-life of the rates the policy sees
    guard: GuardSettings = field(default_factory=GuardSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)


class Controller:
    def __init__(
        self,
        driver: object,
        collectors: Sequence[Collector],
        policy: Policy,
        topology: Topology,
        settings: ControllerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        topology_source: Callable[[], Topology] | None = None,
    ) -> None:
        from adaptive_pin.drivers.base import Driver

        if not isinstance(driver, Driver):
            raise TypeError(f"{driver!r} does not implement the Driver protocol")
        self.driver: Driver = driver
        self.policy = policy
        self.topology = topology
        self.settings = settings or ControllerSettings()
        self.clock = clock
        self._topology_source = topology_source
        self.sampler = Sampler(list(collectors), half_life_s=self.settings.half_life_s)
        self.guard = Guard(self.settings.guard)
        self.journal = MoveJournal(self.settings.verify)
        self.policy_state: object = policy.initial_state()
        self.original_affinity: dict[VCpuKey, CpuSet] = {}
        self.ticks = 0
        self._last_inventory = Inventory(guests=())

    # --- the tick ---------------------------------------------------------------------
    def observe(self) -> Snapshot:
        """Inventory and sample without deciding: warms the rates up (first sample has none)."""
        errors: Counter[str] = Counter()
        return self._snapshot(errors)

    def tick(self, trigger: str = "timer", one_shot: bool = False) -> TickReport:
        started_wall, started = time.time(), time.perf_counter()
        self.ticks += 1
        errors: Counter[str] = Counter()
        snapshot = self._snapshot(errors)
        plan = Plan(policy=self.policy.name)
        applied: list[Move] = []
        refused: list[tuple[Move, str]] = []
        memory: tuple[list[MemoryMove], list[tuple[MemoryMove, str]]] = ([], [])
        outcomes: list[MoveOutcome] = []
        if "inventory" not in errors:
            # Verify first: this tick's readings close earlier moves' after-windows and open
            # the before-window of any move made now; a rollback then holds its vCPU in
            # cooldown, so the policy cannot move it again in the same tick.
            outcomes = self.journal.observe(snapshot)
            for outcome in outcomes:
                self._log_outcome(outcome)
                if outcome.verdict is Verdict.ROLLED_BACK:
                    back = self._rollback_move(outcome.move, snapshot)
                    if back is not None and self._apply(back, snapshot, errors, refused):
                        applied.append(back)
            # After the rollbacks, so the policy sees their vCPUs held too. As of when a move
            # proposed now can first be made (after hold_ticks - 1 more ticks): one the guard
            # holds now but not then is proposed, and happens as soon as the rule lets it.
            hold = 0 if one_shot else self.settings.guard.hold_ticks - 1
            then = snapshot.time + hold * self.settings.interval_s
            snapshot = replace(snapshot, frozen=self.guard.cooling(then), barred=self.guard.barred(then))
            plan = self._decide(snapshot, errors)
            verdict = self.guard.filter(self._sane(plan, snapshot, refused), snapshot, one_shot=one_shot)
            refused.extend(verdict.refused)
            for move in verdict.accepted:
                if self._apply(move, snapshot, errors, refused):
                    applied.append(move)
            memory = self._migrate_memory(plan, snapshot, applied, refused, errors)
            self.guard.forget({(g.id, v.index) for g in snapshot.guests for v in g.vcpus})
        for move, why in refused:
            log.debug("held %s vcpu %d -> %s: %s", move.guest_name, move.vcpu, move.to_cpus, why)
        return TickReport(
            tick=self.ticks,
            time=started_wall,
            duration_s=time.perf_counter() - started,
            interval_s=self.settings.interval_s,
            policy=self.policy.name,
            snapshot=snapshot,
            plan=plan,
            applied=tuple(applied),
            refused=tuple(refused),
            memory_applied=tuple(memory[0]),
            memory_refused=tuple(memory[1]),
            outcomes=tuple(outcomes),
            errors=dict(errors),
            inventory_errors=dict(self._last_inventory.errors),
            dry_run=self.settings.dry_run,
            trigger=trigger,
        )

    def _snapshot(self, errors: Counter[str]) -> Snapshot:
        if self._topology_source is not None:
            try:
                self.topology = self._topology_source().with_reserved(self.topology.reserved)
            except AdaptivePinError as exc:
                errors["topology"] += 1
                log.warning("topology re-read failed, keeping the last one: %s", exc)
        try:
            inv = self.driver.inventory()
        except AdaptivePinError as exc:
            errors["inventory"] += 1
            log.error("inventory failed: %s", exc)
            return Snapshot(time=self.clock(), topology=self.topology, guests=(), rates={})
        now = self.clock()  # after the inventory: a simulated host's clock advances inside it
        self._last_inventory = inv
        self._forget_departed(inv)
        for guest, err in inv.errors.items():
            errors["guest"] += 1
            log.warning("guest %s: %s", guest, err)
        try:
            sampled = self.sampler.sample(inv.guests)
            rates, caps = sampled.rates, sampled.capabilities
        except Exception as exc:  # a collector bug must not stop the loop
            errors["sample"] += 1
            log.exception("sampling failed: %s", exc)
            rates, caps = {}, {}
        taken = CpuSet()
        for g in inv.guests:
            if g.orchestrator_pinned and not g.pinnability.managed:
                for v in g.vcpus:
                    taken |= v.affinity
        return Snapshot(
            time=now,
            topology=self.topology,
            guests=inv.guests,
            rates=rates,
            capabilities=caps,
            taken=taken & self.topology.online,
            bad_placements=self.journal.bad_placements(now),
        )

    def _forget_departed(self, inv: Inventory) -> None:
        """Drop the original affinities of VMs that are gone (bounded under churn).

        Only after a complete look: a VM the driver could not read this time may still be
        running, and its originals are what restores it, so nothing is dropped in that tick.
        """
        if inv.errors or not self.original_affinity:
            return
        live = {g.id for g in inv.guests}
        for key in [k for k in self.original_affinity if k[0] not in live]:
            del self.original_affinity[key]

    def _decide(self, snapshot: Snapshot, errors: Counter[str]) -> Plan:
        try:
            plan, self.policy_state = self.policy.decide(snapshot, self.policy_state)
        except Exception as exc:  # a plug-in's bug must not stop the loop
            errors["policy"] += 1
            log.exception("policy %s failed: %s", self.policy.name, exc)
            return Plan(policy=self.policy.name, notes=(f"policy failed: {exc}",))
        for note in plan.notes:
            log.debug("policy note: %s", note)
        return plan

    @staticmethod
    def _sane(plan: Plan, snapshot: Snapshot, refused: list[tuple[Move, str]]) -> Plan:
        """Drop moves no policy may make, whatever it is: defense in depth for plug-ins."""
        guests = {g.id: g for g in snapshot.guests}
        keep: list[Move] = []
        for m in plan.moves:
            g = guests.get(m.guest_id)
            why = None
            if g is None:
                why = "no such guest in this snapshot"
            elif not g.pinnability.managed:
                why = f"not managed ({g.pinnability.source}: {g.pinnability.reason or 'opted out'})"
            elif g.problem:
                why = f"guest has a problem: {g.problem}"
            elif all(v.index != m.vcpu for v in g.vcpus):
                why = f"guest has no vCPU {m.vcpu}"
            if why:
                refused.append((m, why))
            else:
                keep.append(m)
        return replace(plan, moves=tuple(keep))

    def _apply(
        self, move: Move, snapshot: Snapshot, errors: Counter[str], refused: list[tuple[Move, str]]
    ) -> bool:
        guest = snapshot.guest(move.guest_id)
        verb = "would move" if self.settings.dry_run else "move"
        log.info(
            "%s %s vcpu %d %s -> %s (%s, gain %.3g): %s",
            verb,
            move.guest_name,
            move.vcpu,
            move.from_cpus or "-",
            move.to_cpus,
            move.kind,
            move.predicted_gain,
            move.reason,
        )
        if self.settings.dry_run:
            # The guard still remembers it, so advice is given once per cooldown, not every tick.
            self.guard.record_move(move, snapshot.time)
            return True
        try:
            self.driver.pin(guest, move.vcpu, move.to_cpus)
        except GuestGoneError as exc:
            errors["guest_gone"] += 1
            refused.append((move, f"guest gone: {exc}"))
            log.warning("%s vcpu %d: gone before pin: %s", move.guest_name, move.vcpu, exc)
            return False
        except (PinError, AdaptivePinError) as exc:
            errors["pin"] += 1
            refused.append((move, f"pin failed: {exc}"))
            log.warning("%s vcpu %d: pin failed: %s", move.guest_name, move.vcpu, exc)
            return False
        self.original_affinity.setdefault(move.key, move.from_cpus)
        self.guard.record_move(move, snapshot.time)
        self.journal.record(move, snapshot.time)
        return True

    def _migrate_memory(
        self,
        plan: Plan,
        snapshot: Snapshot,
        applied: Sequence[Move],
        refused: Sequence[tuple[Move, str]],
        errors: Counter[str],
    ) -> tuple[list[MemoryMove], list[tuple[MemoryMove, str]]]:
        """Carry out the plan's memory moves whose VM now runs wholly on the target nodes."""
        from adaptive_pin.drivers.base import MemoryMigrator

        done: list[MemoryMove] = []
        held: list[tuple[MemoryMove, str]] = []
        if not plan.memory_moves:
            return done, held
        now_at = {m.key: m.to_cpus for m in applied}
        held_back = {m.guest_id for m, _ in refused}
        verb = "would migrate" if self.settings.dry_run else "migrate"
        migrator = self.driver if isinstance(self.driver, MemoryMigrator) else None
        for mm in plan.memory_moves:
            why = self._memory_refusal(mm, snapshot, now_at, held_back)
            if why is None and migrator is None:
                why = f"driver {self.driver.name} cannot migrate memory"
            if why is None:
                why = self.guard.memory_refusal(mm, snapshot.time, len(done))
            if why is not None:
                held.append((mm, why))
                log.debug("held %s memory -> node(s) %s: %s", mm.guest_name, mm.to_nodes, why)
                continue
            log.info(
                "%s %s memory node(s) %s -> %s (gain %.3g): %s",
                verb, mm.guest_name, mm.from_nodes, mm.to_nodes, mm.predicted_gain, mm.reason,
            )  # fmt: skip
            if migrator is not None and not self.settings.dry_run:
                try:
                    migrator.migrate_memory(snapshot.guest(mm.guest_id), mm.from_nodes, mm.to_nodes)
                except (GuestGoneError, PinError, AdaptivePinError) as exc:
                    errors["memory"] += 1
                    held.append((mm, f"migration failed: {exc}"))
                    log.warning("%s: memory migration failed: %s", mm.guest_name, exc)
                    continue
            self.guard.record_memory_move(mm, snapshot.time)
            done.append(mm)
        return done, held

    def _memory_refusal(
        self, mm: MemoryMove, snapshot: Snapshot, now_at: dict[VCpuKey, CpuSet], held_back: set[str]
    ) -> str | None:
        try:
            g = snapshot.guest(mm.guest_id)
        except KeyError:
            return "no such guest in this snapshot"
        if not is_movable(g):
            return "not a VM this controller may move"
        if g.memory_bound:
            return "memory bound by the VM's own configuration"
        if not mm.to_nodes or not mm.from_nodes:
            return "empty node set"
        nodes = snapshot.topology.numa_nodes
        if not all(n in nodes for n in mm.to_nodes):
            return f"no NUMA node {mm.to_nodes.to_list()} on this host"
        if g.id in held_back:
            return "some of its vCPU moves were held back this tick"
        there = CpuSet(c for n in mm.to_nodes for c in nodes[n].cpus)
        if not all(now_at.get((g.id, v.index), v.affinity) <= there for v in g.vcpus):
            return f"its vCPUs do not all run on node(s) {mm.to_nodes.to_list()}"
        return None

    @staticmethod
    def _rollback_move(move: Move, snapshot: Snapshot) -> Move | None:
        try:
            guest = snapshot.guest(move.guest_id)
            current = guest.vcpu(move.vcpu).affinity
        except KeyError:
            return None
        target = move.from_cpus & (snapshot.topology.usable - snapshot.taken)
        if not target or target == current:
            return None
        return Move(
            guest_id=move.guest_id,
            guest_name=move.guest_name,
            vcpu=move.vcpu,
            from_cpus=current,
            to_cpus=target,
            reason=f"rollback: MPKI got worse after the move to {move.to_cpus}",
            predicted_gain=0.0,
            kind="rollback",
        )

    @staticmethod
    def _log_outcome(o: MoveOutcome) -> None:
        before = "n/a" if o.mpki_before is None else f"{o.mpki_before:.3g}"
        after = "n/a" if o.mpki_after is None else f"{o.mpki_after:.3g}"
        log.info(
            "verdict %s vcpu %d -> %s: MPKI %s -> %s: %s",
            o.move.guest_name,
            o.move.vcpu,
            o.move.to_cpus,
            before,
            after,
            o.verdict,
        )

    # --- exit -------------------------------------------------------------------------
    def restore(self) -> dict[VCpuKey, str]:
        """Put every vCPU this controller moved back where it found it; returns failures."""
        failures: dict[VCpuKey, str] = {}
        if not self.original_affinity:
            return failures
        try:
            guests: dict[str, Guest] = {g.id: g for g in self.driver.inventory().guests}
        except AdaptivePinError as exc:
            return dict.fromkeys(self.original_affinity, f"inventory failed: {exc}")
        for key, cpus in sorted(self.original_affinity.items()):
            guest = guests.get(key[0])
            if guest is None:
                continue  # gone: nothing to restore
            try:
                self.driver.pin(guest, key[1], cpus & self.topology.online or self.topology.online)
                log.info("restored %s vcpu %d -> %s", guest.name, key[1], cpus)
            except AdaptivePinError as exc:
                failures[key] = str(exc)
                log.warning("could not restore %s vcpu %d: %s", guest.name, key[1], exc)
        return failures

    def close(self) -> None:
        self.sampler.close()
        self.driver.close()
