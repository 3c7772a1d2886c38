#!/usr/bin/env bash
# Bring up libvirtd (QEMU driver) on a host or container without systemd, as the integration
# tests need it. Idempotent: safe to run again while everything already runs.
#
# Needs the Debian packages: qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu
# libvirt-clients (and libvirt-dev pkg-config to build libvirt-python).
set -euo pipefail

QEMU_CONF=/etc/libvirt/qemu.conf
URI=qemu:///system
WAIT_S=${ADAPTIVE_PIN_LIBVIRT_WAIT_S:-60}

log() { echo "setup-libvirt: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
for bin in libvirtd virtlogd virsh qemu-system-x86_64; do
    command -v "$bin" >/dev/null || { log "$bin not found: apt-get install qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"; exit 1; }
done

# libvirt's QEMU driver refuses to start without its configured user and group, even when
# qemu.conf overrides them to root.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu

mkdir -p /var/log/libvirt/qemu /etc/libvirt

# Set one key in qemu.conf: drop any live setting of it, then append ours. Comments stay.
set_key() {
    local key=$1 value=$2
    touch "$QEMU_CONF"
    if grep -qxF "$key = $value" "$QEMU_CONF"; then
        return 1
    fi
    sed -i -E "/^[[:space:]]*${key}[[:space:]]*=/d" "$QEMU_CONF"
    printf '%s = %s\n' "$key" "$value" >>"$QEMU_CONF"
}
changed=0
# Root, because a container has no way to hand /dev and cgroup files to libvirt-qemu.
set_key user '"root"' && changed=1
set_key group '"root"' && changed=1
# No "memory": the memory controller is delegated to the sandbox and libvirt cannot write it.
set_key cgroup_controllers '[ "cpu", "cpuacct", "cpuset", "devices" ]' && changed=1

running() { pgrep -x "$1" >/dev/null; }

if [ "$changed" = 1 ] && running libvirtd; then
    log "qemu.conf changed while libvirtd runs: restart libvirtd for it to take effect"
fi

running virtlogd || { log "starting virtlogd"; virtlogd -d; }
running libvirtd || { log "starting libvirtd"; libvirtd -d; }

# The first call probes QEMU's capabilities (about 8 s on a small machine).
deadline=$((SECONDS + WAIT_S))
until virsh -c "$URI" list >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "libvirtd did not answer on $URI within ${WAIT_S}s"
        virsh -c "$URI" list || true
        exit 1
    fi
    sleep 0.5
done
log "libvirtd answers on $URI"
