#!/bin/sh
# Turn a debootstrap'ed bookworm rootfs into a test node that boots cleanly under systemd-nspawn.
# Run on the host as root: customize.sh ROOTFS OVERLAY_DIR. The harness hashes this file, the
# overlay and the package list into the cache key, so any change here rebuilds the cache.
set -eu
root=$1
overlay=$2

# Files the harness injects (units, scripts, drop-ins).
cp -a "$overlay"/. "$root"/
ln -sf /etc/systemd/system/cgroup-rw.service \
    "$root"/etc/systemd/system/sysinit.target.wants/cgroup-rw.service

# Units that cannot work (or make no sense) in a container sharing the host's network.
mask="systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
systemd-udev-trigger.service systemd-udev-settle.service systemd-hwdb-update.service
getty@.service serial-getty@.service console-getty.service container-getty@.service
getty-static.service autovt@.service getty.target
systemd-timesyncd.service systemd-time-wait-sync.service
systemd-networkd-wait-online.service systemd-networkd.service systemd-networkd.socket
systemd-firstboot.service systemd-machine-id-commit.service
systemd-sysctl.service procps.service systemd-pstore.service systemd-modules-load.service
kmod-static-nodes.service systemd-remount-fs.service systemd-fsck-root.service
systemd-journald-audit.socket systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount
dev-hugepages.mount e2scrub_reap.service e2scrub_all.service apt-daily.service
apt-daily-upgrade.service dpkg-db-backup.service fstrim.service systemd-logind.service
cryptdisks.service cryptdisks-early.service"
for unit in $mask; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done
for timer in "$root"/lib/systemd/system/*.timer; do
    ln -sfn /dev/null "$root/etc/systemd/system/$(basename "$timer")"
done
rm -rf "$root"/etc/systemd/system/timers.target.wants "$root"/etc/systemd/system/getty.target.wants
rm -f "$root"/etc/systemd/system/multi-user.target.wants/e2scrub_reap.service \
    "$root"/etc/systemd/system/sysinit.target.wants/systemd-pstore.service

# Identity: the harness writes a fresh machine-id and the node's name into each copy. An empty
# machine-id (not "uninitialized") means "not a first boot" if a copy is ever booted as is.
: > "$root"/etc/machine-id
rm -f "$root"/var/lib/dbus/machine-id
ln -s /etc/machine-id "$root"/var/lib/dbus/machine-id
echo node > "$root"/etc/hostname
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root"/etc/hosts

# Size: package caches, lists, docs, manuals and translations are not needed to run tests.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
