"""``--driver auto`` when libvirtd answers: libvirt's domains and the plain QEMUs it does not manage.

One host may run both: VMs under libvirt and QEMU processes started by hand (or by another
tool). This driver asks both and merges what they see:

- the libvirt driver lists every running domain;
- the plain-QEMU driver runs with ``exclude_libvirt``: it leaves out QEMUs that libvirtd
  started (its pidfiles ``/run/libvirt/qemu/<name>.pid``, its ``machine-qemu`` cgroups, its
  ``/var/lib/libvirt/qemu/domain-*`` state on the command line);
- as a last guard, a QEMU guest whose pid or UUID a libvirt domain also reports is dropped,
  so no VM is ever listed (and pinned) twice.

``pin`` goes to the driver that listed the guest (``Guest.driver``), ``events`` merges both
streams, ``close`` closes both. When libvirt fails as a whole the inventory fails
(:class:`DriverError`), as it would under ``--driver libvirt``: half a host would look like
VMs gone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from adaptive_pin.drivers.libvirt import LibvirtDriver
from adaptive_pin.drivers.qemu import QemuDriver
from adaptive_pin.errors import PinError
from adaptive_pin.model import CpuSet, Guest, GuestEvent, Inventory
from adaptive_pin.pinnability import PinnabilityRules

EVENT_STEP_S = 0.05  # how often events() looks at the other driver while waiting on one


class CompositeDriver:
    """Options: ``uri`` (libvirt), ``qmp_sockets`` (plain QEMU), ``rules`` (both)."""

    name = "libvirt+qemu"

    def __init__(
        self,
        uri: str | None = None,
        qmp_sockets: Mapping[str, str] | None = None,
        rules: PinnabilityRules | None = None,
        libvirt: LibvirtDriver | None = None,
        qemu: QemuDriver | None = None,
    ) -> None:
        self.libvirt = libvirt if libvirt is not None else LibvirtDriver(uri=uri, rules=rules)
        try:
            self.qemu = (
                qemu
                if qemu is not None
                else QemuDriver(qmp_sockets=qmp_sockets, rules=rules, exclude_libvirt=True)
            )
        except BaseException:
            self.libvirt.close()
            raise
        self._libvirt_ids: set[str] = set()

    def inventory(self) -> Inventory:
        lv = self.libvirt.inventory()
        qm = self.qemu.inventory()
        lv_pids = {g.pid for g in lv.guests if g.pid is not None}
        lv_ids = {g.id for g in lv.guests}
        self._libvirt_ids = lv_ids
        plain = tuple(g for g in qm.guests if g.pid not in lv_pids and g.id not in lv_ids)
        errors = dict(qm.errors)
        errors.update(lv.errors)
        return Inventory(guests=(*lv.guests, *plain), errors=errors, time=max(lv.time, qm.time))

    def _route(self, guest: Guest) -> LibvirtDriver | QemuDriver:
        if guest.driver == self.libvirt.name:
            return self.libvirt
        if guest.driver == self.qemu.name:
            return self.qemu
        raise PinError(f"{guest.name}: listed by driver {guest.driver!r}, which auto does not run")

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        self._route(guest).pin(guest, vcpu, cpus)

    def migrate_memory(self, guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet) -> None:
        self._route(guest).migrate_memory(guest, from_nodes, to_nodes)

    def events(self, timeout: float) -> list[GuestEvent]:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            out = self.libvirt.events(0)
            # A libvirt QEMU the watcher saw before libvirtd wrote its pidfile: libvirt speaks for it.
            lv_ids = self._libvirt_ids | {e.guest_id for e in out}
            out.extend(e for e in self.qemu.events(0) if e.guest_id not in lv_ids)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(EVENT_STEP_S, remaining))

    def close(self) -> None:
        try:
            self.libvirt.close()
        finally:
            self.qemu.close()
