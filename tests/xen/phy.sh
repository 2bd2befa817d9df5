#!/bin/bash
# A PV guest on disks tapdisk serves through its kernel block device, handed to the guest by
# dom0's standard back-end (xen-blkback on /dev/ublkbN, what xl's "phy:" disks are): one raw
# image and one VHD chain (base <- leaf1, data written into the base through tapdisk
# beforehand). While the guest writes and verifies (tests/xen/guest-io.sh), dom0 checks that
# destroy refuses the held device (EBUSY) and the guest keeps going, pauses and unpauses the
# raw disk, and takes a live snapshot of the VHD (pause, vhd-util snapshot, unpause onto the
# new leaf). After the guest halted, dom0 reads both disks and compares them with what the
# guest reported.
# shellcheck disable=SC2317 # the helpers below run through check
# shellcheck source=tests/xen/lib.sh
. "$1/tests/xen/lib.sh"

destroy_minor() { tap-ctl destroy -p "$(pid_of_minor "$1")" -m "$1"; }
# destroy_when_free MINOR: destroy, retried for 60 s while blkback still lets go (EBUSY).
destroy_when_free() {
    local i
    for i in $(seq 60); do destroy_minor "$1" && return 0; sleep 1; done
    return 1
}

# --- the raw image, its first 4 MiB random
raw="$SCRATCH/raw.img"
dd if=/dev/urandom of="$raw" bs=1M count=4 2>/dev/null && truncate -s 32M "$raw"
raw_head=$(dd if="$raw" bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)
dev_a=$(tap-ctl create -b ublk -a "aio:$raw" 2>>"$LOG")
check "raw VBD on ublk ($dev_a)" test -b "$dev_a"
minor_a=$(minor_of_device "$dev_a")

# --- the VHD chain: 4 MiB of random data written into the base through tapdisk, then a leaf
base="$SCRATCH/base.vhd" leaf1="$SCRATCH/leaf1.vhd" leaf2="$SCRATCH/leaf2.vhd"
check "vhd-util create base" vhd-util create -n "$base" -s 32
dd if=/dev/urandom of="$SCRATCH/prefill" bs=1M count=4 2>/dev/null
vhd_head=$(md5sum < "$SCRATCH/prefill" | cut -d' ' -f1)
dev=$(tap-ctl create -b ublk -a "vhd:$base" 2>>"$LOG")
check "fill the base through tapdisk" dd if="$SCRATCH/prefill" of="$dev" bs=1M oflag=direct
check "destroy the filling VBD" destroy_minor "$(minor_of_device "$dev")"
check "vhd-util snapshot base -> leaf1" vhd-util snapshot -n "$leaf1" -p "$base"
dev_b=$(tap-ctl create -b ublk -a "vhd:$leaf1" 2>>"$LOG")
check "VHD chain VBD on ublk ($dev_b)" test -b "$dev_b"
minor_b=$(minor_of_device "$dev_b")

mbox=$(make_mailbox)
check "mailbox loop device ($mbox)" test -b "$mbox"

guest_initrd /run/phy.cpio.gz 'DISKS="xvda xvdb"' MAILBOX=xvdc SLOTS=8 \
    "EXPECT=\"xvda:0:4:$raw_head xvdb:0:4:$vhd_head\"" 'BLKFRONT="max_ring_page_order=3"'
domid=$(guest_start phy /run/phy.cpio.gz)
check "guest started, blkfront ready (domain $domid)" test -n "$domid"
attach_disks() {
    guest_disk "$domid" xvda vbd "$dev_a" && guest_disk "$domid" xvdb vbd "$dev_b" &&
        guest_disk "$domid" xvdc vbd "$mbox"
}
check "blkback disks: raw VBD, VHD VBD, mailbox" attach_disks

if check "guest reads dom0's data and finishes a round" wait_console phy '^GUEST: round 1 ok' 300; then
    # destroy must refuse while blkback holds the device, and the guest must not notice
    expect_status 16 "destroy of the raw VBD refused while the guest holds it (EBUSY)" \
        tap-ctl destroy -p "$(pid_of_minor "$minor_a")" -m "$minor_a"
    check "the guest goes on after the refused destroy" wait_rounds phy 2 120

    # pause holds the guest's requests, unpause lets them through
    check "pause the raw VBD under the guest's I/O" tap-ctl pause -p "$(pid_of_minor "$minor_a")" -m "$minor_a"
    sleep 1; before=$(last_round phy); sleep 3
    check "the guest makes no progress while paused (round $before)" test "$(last_round phy)" -le $((before + 1))
    check "unpause" tap-ctl unpause -p "$(pid_of_minor "$minor_a")" -m "$minor_a"
    check "the guest goes on after unpause" wait_rounds phy 2 120

    # live snapshot of the VHD: the guest's later writes land in leaf2
    pid_b=$(pid_of_minor "$minor_b")
    check "pause the VHD VBD" tap-ctl pause -p "$pid_b" -m "$minor_b"
    check "vhd-util snapshot leaf1 -> leaf2 while paused" vhd-util snapshot -n "$leaf2" -p "$leaf1"
    leaf2_size=$(stat -c %s "$leaf2")
    check "unpause onto leaf2" tap-ctl unpause -p "$pid_b" -m "$minor_b" -a "vhd:$leaf2"
    check "the guest goes on on the new leaf" wait_rounds phy 3 120
    check "tap-ctl list shows the new leaf" sh -c "tap-ctl list -m $minor_b | grep -q 'vhd:$leaf2'"
else
    xen_diag "$domid"
fi
post_stop "$mbox"
check "guest verified every slot and halted cleanly (GUEST-RC=0)" guest_wait phy 300
guest_unplug "$domid" vbd
check "dom0 reads the raw disk as the guest last saw it" \
    test "$(dev_md5 "$dev_a" 16)" = "$(guest_md5 phy xvda)"
check "dom0 reads the VHD chain as the guest last saw it" \
    test "$(dev_md5 "$dev_b" 16)" = "$(guest_md5 phy xvdb)"
check "the guest's writes after the snapshot went into leaf2" test "$(stat -c %s "$leaf2")" -gt "${leaf2_size:-0}"
check "destroy the raw VBD once the guest is gone" destroy_when_free "$minor_a"
check "destroy the VHD VBD" destroy_when_free "$minor_b"
check "vhd-util check leaf1" vhd-util check -n "$leaf1"
check "vhd-util check leaf2" vhd-util check -n "$leaf2"
losetup -d "$mbox"
finish
