#!/usr/bin/env bash
# Installs the Debian package into a fresh root, uses the installed tools, purges the package
# and checks that nothing is left behind. Run as root: scripts/test.sh runs it on what
# scripts/package.sh built.
#
# The fresh root is this machine's / seen through an overlay whose changes go to a scratch
# tmpfs, in a private mount namespace, so nothing on the machine changes and parallel runs do
# not meet. dpkg runs chrooted into it with the machine's package database: real dependency
# checks (Depends, Conflicts), real maintainer scripts and triggers, the installed paths.
# What is checked inside: the files at their places, the control directory made by postinst,
# `tap-ctl create`/`list`/`destroy` from /usr/sbin spawning /usr/libexec/tapdisk, which reads
# the installed /etc/blktap/tapdisk.toml, a C program built with the installed
# libblktapctl.pc finding that VBD through libblktapctl.so.0, `vhd-util create`/`check` from
# /usr/bin, `tapback --help` from /usr/sbin, its unit installed and enabled but not started
# (the root runs no systemd: no /run/systemd/system), `man tap-ctl`, `man tapdisk.toml` and
# `man tapback` rendering, bash completion offering the commands and tapback's options;
# after `dpkg --purge`, no file of the package, no conffile, no unit enablement and no
# control directory.
# Afterwards the overlay's upper layer must hold nothing but dpkg's own records and caches.
#
# Usage: tests/package/install.sh PACKAGE.deb...   (scripts/package.sh prints them)
# Output: one line per check and "N passed, M failed"; exit status non-zero on any failure.
set -euo pipefail

if [ "${BLKTAP_PKG_TEST_NS:-}" != 1 ]; then
    debs=()
    for deb in "$@"; do
        [ -f "$deb" ] || { echo "usage: $0 PACKAGE.deb..." >&2; exit 2; }
        debs+=("$(realpath "$deb")")
    done
    [ ${#debs[@]} -gt 0 ] || { echo "usage: $0 PACKAGE.deb..." >&2; exit 2; }
    BLKTAP_PKG_TEST_NS=1 exec unshare --mount --propagation private "$0" "${debs[@]}"
fi
scratch=$(mktemp -d /tmp/blktap-pkg.XXXXXX)
trap 'umount -R "$scratch" 2>/dev/null || true; rmdir "$scratch"' EXIT
# The upper layer lives on its own tmpfs: an upper directory inside the lower one (/) would
# overlap it, which overlayfs refuses.
mount -t tmpfs -o size=1g blktap-pkg "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
root=$scratch/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
cp "$@" "$root/tmp/"

# The part that runs inside the fresh root.
inside=$(cat <<'INSIDE'
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
unset BLKTAP_CONTROL_DIR BLKTAP_TAPDISK BLKTAP_BLOCK_DEVICE TAPDISK_CONFIG TAPDISK_LOG
passed=0 failed=0
check() {
    local what=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then
        passed=$((passed + 1)); echo "ok   $what"
    else
        failed=$((failed + 1)); echo "FAIL $what"; sed 's/^/     /' /tmp/check.out
    fi
}

check "dpkg -i" dpkg -i /tmp/*.deb
for f in /usr/sbin/tap-ctl /usr/sbin/td-util /usr/sbin/cbt-util /usr/bin/vhd-util \
         /usr/libexec/tapdisk /usr/sbin/tapback; do
    check "installed $f" test -x "$f"
done
for f in /etc/blktap/tapdisk.toml /usr/lib/tmpfiles.d/blktap.conf \
         /usr/share/bash-completion/completions/tap-ctl /usr/share/man/man8/tap-ctl.8.gz \
         /usr/share/man/man5/tapdisk.toml.5.gz /usr/share/man/man8/tapback.8.gz \
         /usr/lib/systemd/system/tapback.service /usr/share/bash-completion/completions/tapback; do
    check "installed $f" test -f "$f"
done
check "conffile /etc/blktap/tapdisk.toml" grep -qx /etc/blktap/tapdisk.toml \
    /var/lib/dpkg/info/blktap-rs.conffiles
check "postinst made /run/blktap-control" test -d /run/blktap-control
check "tapdisk reads the installed site file" \
    sh -c '/usr/libexec/tapdisk --print-config | grep -qx "# site file: /etc/blktap/tapdisk.toml"'

truncate -s 64M /tmp/disk.img
check "tap-ctl create (finds /usr/libexec/tapdisk)" \
    sh -c 'tap-ctl create -a aio:/tmp/disk.img >/tmp/create.out'
pid=$(tap-ctl list 2>/dev/null | sed -n 's/^pid=\([0-9]*\) minor=\([0-9]*\) .*args=aio:\/tmp\/disk.img$/\1/p')
minor=$(tap-ctl list 2>/dev/null | sed -n 's/^pid=[0-9]* minor=\([0-9]*\) .*args=aio:\/tmp\/disk.img$/\1/p')
check "tap-ctl list shows the VBD" test -n "$pid"
check "the tapdisk runs /usr/libexec/tapdisk" \
    sh -c "[ \"\$(readlink /proc/$pid/exe)\" = /usr/libexec/tapdisk ]"
cat >/tmp/client.c <<'C'
#include <stdio.h>
#include <tap-ctl.h>
int main(void)
{
	int minor = tap_ctl_find_minor("aio", "/tmp/disk.img");
	printf("%d\n", minor);
	return minor < 0;
}
C
check "libblktapctl.so.0 known to ldconfig" sh -c 'ldconfig -p | grep -q "libblktapctl.so.0 "'
check "a C program builds against libblktapctl.pc" \
    sh -c 'cc -o /tmp/client /tmp/client.c $(pkg-config --cflags --libs libblktapctl)'
check "it finds the VBD through the installed library" \
    sh -c "[ \"\$(/tmp/client)\" = \"$minor\" ]"
check "shlibs names the package" grep -qx "libblktapctl 0 blktap-rs (>= 0.1.0)" \
    /var/lib/dpkg/info/blktap-rs.shlibs
check "tap-ctl destroy" tap-ctl destroy -p "$pid" -m "$minor"
check "no VBD left" sh -c '[ -z "$(tap-ctl list)" ]'

check "tapback --help from /usr/sbin" \
    sh -c '/usr/sbin/tapback --help | grep -q "^usage: tapback "'
# deb-systemd-helper links to /lib/systemd/system/..., which is /usr/lib/... on merged /usr.
check "tapback.service enabled" sh -c '[ "$(readlink -f /etc/systemd/system/multi-user.target.wants/tapback.service)" = /usr/lib/systemd/system/tapback.service ]'
check "systemd-analyze verify tapback.service" \
    systemd-analyze verify /usr/lib/systemd/system/tapback.service
# Nothing started it: the fresh root runs no systemd, and postinst starts units only where
# one does.
check "no tapback started" sh -c '
    for exe in /proc/[0-9]*/exe; do
        [ "$(readlink "$exe" 2>/dev/null)" != /usr/sbin/tapback ] || exit 1
    done'

check "vhd-util create" vhd-util create -n /tmp/disk.vhd -s 64
check "vhd-util check" sh -c 'vhd-util check -n /tmp/disk.vhd | grep -q "is valid"'

check "man tap-ctl renders" sh -c 'MANPAGER=cat man tap-ctl 2>/dev/null | grep -q "control tapdisk processes and their virtual block devices"'
check "man tapdisk.toml renders" \
    sh -c 'MANPAGER=cat man 5 tapdisk.toml 2>/dev/null | grep -q "max_connections_per_vbd"'
check "man tapback renders" \
    sh -c 'MANPAGER=cat man tapback 2>/dev/null | grep -q "connect Xen guests"'
check "bash completion offers commands" bash -c '
    source /usr/share/bash-completion/completions/tap-ctl
    COMP_WORDS=(tap-ctl cre); COMP_CWORD=1
    _blktap_rs tap-ctl cre tap-ctl
    [ "${COMPREPLY[*]}" = create ]'
check "bash completion offers tapback's options" bash -c '
    source /usr/share/bash-completion/completions/tapback
    COMP_WORDS=(tapback -); COMP_CWORD=1
    _blktap_rs tapback - tapback
    [ "${COMPREPLY[*]}" = "-b -d -n -s -v" ]'

check "dpkg --purge" dpkg --purge blktap-rs
for f in /usr/sbin/tap-ctl /usr/libexec/tapdisk /usr/bin/vhd-util /etc/blktap \
         /run/blktap-control /usr/share/man/man8/tap-ctl.8.gz /usr/include/blktap \
         /usr/lib/x86_64-linux-gnu/libblktapctl.so.0 /usr/sbin/tapback \
         /usr/lib/systemd/system/tapback.service \
         /etc/systemd/system/multi-user.target.wants/tapback.service; do
    check "purged $f" test ! -e "$f" -a ! -L "$f"
done
echo "inside: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
INSIDE
)

status=0
chroot "$root" /bin/bash -c "$inside" || status=1

# Nothing may be left in the upper layer but dpkg's records, logs and the caches its triggers
# rebuild (manual-page index, ldconfig's): directories that / has too (copied up on the way)
# and files rewritten with the content / has (ld.so.cache, after the ldconfig trigger ran
# again on purge); no new directory, no other file.
left=$(cd "$scratch/upper" && find . -mindepth 1 \
    \( -path ./var/lib/dpkg -o -path ./var/log -o -path ./var/cache/man \
       -o -path ./var/cache/ldconfig -o -path ./var/cache/debconf \) -prune -o -print |
    while read -r path; do
        upper=$scratch/upper/$path
        if [ -d "$upper" ] && [ ! -L "$upper" ] && [ -d "/$path" ]; then
            continue
        fi
        if [ -f "$upper" ] && [ ! -L "$upper" ] && cmp -s "$upper" "/$path"; then
            continue
        fi
        echo "$path"
    done)
if [ -n "$left" ]; then
    echo "FAIL left behind after purge:"
    printf '     %s\n' "${left//$'\n'/$'\n     '}"
    status=1
else
    echo "ok   nothing left behind after purge"
fi
[ $status -eq 0 ] && echo "package install test: passed" || echo "package install test: FAILED"
exit $status
