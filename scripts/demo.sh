#!/usr/bin/env bash
# The built-in demo: make a raw disk image with data, serve it with tap-ctl + tapdisk,
# show the VBD, its block device and its NBD socket, read and write it, and tear it all down;
# then serve a VHD and snapshot it under the running disk, as a toolstack does.
# Run as root from a fresh checkout: it installs and builds what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

BIN=$PWD/target/debug
WORK=$(mktemp -d /tmp/blktap-demo.XXXXXX)
export BLKTAP_CONTROL_DIR=${BLKTAP_CONTROL_DIR:-$WORK/control}
# The kernel block device: ublk where the kernel has it, else FUSE + loop (/dev/loopN).
# BLKTAP_BLOCK_DEVICE=none runs the demo over NBD only.
PID='' MINOR=''
# On any exit: tear the VBD down if the demo stopped half-way (unmounts FUSE, frees the loop).
cleanup() {
    if [ -n "$PID" ] && [ -n "$MINOR" ]; then "$BIN/tap-ctl" destroy -p "$PID" -m "$MINOR" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "A 64 MiB raw image with a pattern in its first MiB"
run qemu-img create -q -f raw "$WORK/disk.img" 64M
run qemu-io -f raw -c "write -P 0x42 0 1M" "$WORK/disk.img" >/dev/null

step "tap-ctl create: allocate a minor, spawn tapdisk, attach, open; it prints the block device"
CREATED=$(run "$BIN/tap-ctl" create -a "aio:$WORK/disk.img")
echo "$CREATED"
DEVICE=
case $CREATED in /dev/*) DEVICE=$CREATED ;; esac

step "tap-ctl list (the form toolstacks parse)"
LINE=$(run "$BIN/tap-ctl" list -f "$WORK/disk.img")
echo "$LINE"
PID=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$LINE")
MINOR=$(sed -n 's/.*minor=\([0-9]*\).*/\1/p' <<<"$LINE")
SOCK=$BLKTAP_CONTROL_DIR/nbd$PID.$MINOR
URI="nbd+unix:///?socket=$SOCK"

step "The VBD's NBD socket"
run ls -l "$SOCK"
run nbdinfo "$URI"

step "Read it back over NBD and compare with the file"
run qemu-io -f raw -r -c "read -P 0x42 0 1M" "$URI"
run qemu-img compare -f raw -F raw "$WORK/disk.img" "$URI"

step "Write over NBD, read the change from the file itself"
run qemu-io -f raw -c "write -P 0x99 8M 64k" -c flush "$URI"
run qemu-io -f raw -r -c "read -P 0x99 8M 64k" "$WORK/disk.img"

if [ -n "$DEVICE" ]; then
    step "The kernel block device $DEVICE"
    run lsblk "$DEVICE"
    run blockdev --getsize64 "$DEVICE"
    case $DEVICE in
        /dev/loop*) run losetup -l "$DEVICE"; echo "its backing file is tapdisk's FUSE export:"
                    run grep "$BLKTAP_CONTROL_DIR" /proc/self/mountinfo ;;
    esac

    step "Read the whole device back and compare it with the image"
    run cmp "$DEVICE" "$WORK/disk.img" && echo "identical"

    step "Write through the block device (direct I/O), read the change over NBD"
    run qemu-io -n -f raw -c "write -P 0x77 16M 1M" -c flush "$DEVICE" >/dev/null
    run qemu-io -f raw -r -c "read -P 0x77 16M 1M" "$URI"
else
    echo "(no kernel block device: BLKTAP_BLOCK_DEVICE=${BLKTAP_BLOCK_DEVICE:-})"
fi

step "Pause and unpause (what a toolstack does around a snapshot)"
run "$BIN/tap-ctl" pause -p "$PID" -m "$MINOR"
run "$BIN/tap-ctl" list -m "$MINOR"
run "$BIN/tap-ctl" unpause -p "$PID" -m "$MINOR"

step "Statistics"
run "$BIN/tap-ctl" stats -p "$PID" -m "$MINOR"

step "tap-ctl destroy: close, detach (tapdisk exits), free"
run "$BIN/tap-ctl" destroy -p "$PID" -m "$MINOR"
PID=
run "$BIN/tap-ctl" list
echo "remaining files in $BLKTAP_CONTROL_DIR:"; find "$BLKTAP_CONTROL_DIR" -type f -o -type s
if [ -n "$DEVICE" ]; then
    echo "loop devices and mounts left on $BLKTAP_CONTROL_DIR:"
    losetup -a | grep "$BLKTAP_CONTROL_DIR" || echo "  none"
    grep "$BLKTAP_CONTROL_DIR" /proc/self/mountinfo || echo "  none"
fi

step "A dynamic VHD served by tapdisk, snapshotted while it runs"
run "$BIN/vhd-util" create -n "$WORK/base.vhd" -s 64
CREATED=$(BLKTAP_BLOCK_DEVICE=none run "$BIN/tap-ctl" create -a "vhd:$WORK/base.vhd")
MINOR=${CREATED##*tapdisk-}
PID=$("$BIN/tap-ctl" list -m "$MINOR" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
URI="nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd$PID.$MINOR"
run qemu-io -f raw -c "write -P 0x11 0 4M" -c flush "$URI" >/dev/null
echo "pause, snapshot a new leaf on top of the running disk, unpause onto it:"
run "$BIN/tap-ctl" pause -p "$PID" -m "$MINOR"
run "$BIN/vhd-util" snapshot -n "$WORK/leaf.vhd" -p "$WORK/base.vhd"
run "$BIN/tap-ctl" unpause -p "$PID" -m "$MINOR" -a "vhd:$WORK/leaf.vhd"
run "$BIN/tap-ctl" list -m "$MINOR"
run qemu-io -f raw -c "write -P 0x22 2M 1M" -c flush "$URI" >/dev/null
echo "reads see the leaf's new data over the base's old data:"
run qemu-io -f raw -r -c "read -P 0x11 0 2M" -c "read -P 0x22 2M 1M" -c "read -P 0x11 3M 1M" "$URI"
echo "allocation through the chain (base:allocation):"
run nbdinfo --map "$URI"
run "$BIN/tap-ctl" destroy -p "$PID" -m "$MINOR"
PID=
run "$BIN/vhd-util" query -n "$WORK/leaf.vhd" -p -d
run "$BIN/vhd-util" check -n "$WORK/leaf.vhd"
run "$BIN/vhd-util" scan -p -f "$WORK"/*.vhd

echo
echo "demo finished"
