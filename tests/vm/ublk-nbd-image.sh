#!/bin/bash
# An nbd: image as a kernel block device: a tapdisk serves a raw image (NBD only), a second
# VBD opens it as nbd:unix:SOCKET (the form SM passes) behind /dev/ublkbN; reads match the
# image, direct writes through the device land in the image, ext4 made and checked on it.
. "$1/tests/vm/lib.sh"
img=$(make_raw remote.img 64)
dd if=/dev/urandom of="$img" bs=1M count=16 conv=notrunc 2>/dev/null
tap-ctl create -b none -a "aio:$img" >>"$LOG" 2>&1
remote_minor=$(tap-ctl list | sed -n 's/.*minor=\([0-9]*\).*/\1/p' | head -n1)
remote_pid=$(pid_of_minor "$remote_minor")
sock="$BLKTAP_CONTROL_DIR/nbd$remote_pid.$remote_minor"
check "the remote disk's NBD socket $sock" test -S "$sock"
dev=$(tap-ctl create -b ublk -a "nbd:unix:$sock" 2>>"$LOG")
echo "created: $dev" >> "$LOG"
check "create -b ublk -a nbd:unix:SOCKET prints /dev/ublkbN" test -b "$dev"
check "the device has the export's size" test "$(blockdev --getsize64 "$dev")" -eq $((64 << 20))
check "reads through the device match the image" cmp -n 16777216 "$dev" "$img"
check "direct writes through the device reach the image" sh -c "dd if=/dev/urandom of='$SCRATCH/w' bs=1M count=4 2>/dev/null && dd if='$SCRATCH/w' of='$dev' bs=1M seek=20 oflag=direct conv=fsync 2>/dev/null && cmp -n 4194304 '$SCRATCH/w' '$img' --ignore-initial=0:20971520"
tap-ctl stats -p "$(pid_of_minor "$(minor_of_device "$dev")")" -m "$(minor_of_device "$dev")" >> "$LOG"
check "mkfs.ext4 on the device" mkfs.ext4 -q -F "$dev"
mnt="$SCRATCH/mnt"
mkdir -p "$mnt"
check "mount, write a file, unmount" sh -c "mount '$dev' '$mnt' && dd if=/dev/urandom of='$mnt/f' bs=1M count=8 2>/dev/null && sync && umount '$mnt'"
minor=$(minor_of_device "$dev")
pid=$(pid_of_minor "$minor")
check "destroy the nbd: VBD" tap-ctl destroy -p "$pid" -m "$minor"
check "device gone" test ! -e "$dev"
check "destroy the remote disk" tap-ctl destroy -p "$remote_pid" -m "$remote_minor"
check "the image holds a clean ext4" e2fsck -f -n "$img"
finish
