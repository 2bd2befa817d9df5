#!/bin/bash
# A PV guest whose disks are served by our blkif back-end: tapdisk maps the guest's rings,
# connected by our tapback from XenStore (vbd3, as on XenServer/XCP-ng; the disks' nodes
# are written as xenopsd writes them). One raw image and one VHD chain (base <- leaf1,
# data written into the base by dom0 through the NBD export); multi-page rings (the guest's
# blkfront asks for order 3) and indirect descriptors (blkfront's default 32 segments).
# While the guest writes and verifies (tests/xen/guest-io.sh), dom0 pauses and unpauses the
# raw disk and takes a live snapshot of the VHD (pause, vhd-util snapshot, unpause onto the
# new leaf); it checks tap-ctl stats and the statistics files xcp-rrdd reads. After the guest
# halted, tapback disconnects the rings and dom0 reads both disks through NBD and compares
# them with what the guest reported.
# shellcheck disable=SC2317 # the helpers below run through check
# shellcheck source=tests/xen/lib.sh
. "$1/tests/xen/lib.sh"

# create_vbd PARAMS: a VBD with no block device (the guest's ring is its frontend); prints
# "PID MINOR".
create_vbd() {
    tap-ctl create -b none -a "$1" >> "$LOG" 2>&1 || return 1
    tap-ctl list | grep -F "args=$1" | sed -n 's/.*pid=\([0-9]*\).*minor=\([0-9]*\).*/\1 \2/p' | head -n1
}
nbd_of() { echo "nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd${1% *}.${1#* }"; }
nbd_md5() {
    qemu-img convert -f raw "$(nbd_of "$1")" -O raw "$SCRATCH/read.raw" >> "$LOG" 2>&1 &&
        dd if="$SCRATCH/read.raw" bs=1M count="$2" 2>/dev/null | md5sum | cut -d' ' -f1
}

tapback -v 2>> "$SHARE/tapback.log" &
tapback_pid=$!
check "tapback runs" kill -0 "$tapback_pid"

raw="$SCRATCH/raw.img"
dd if=/dev/urandom of="$raw" bs=1M count=4 2>/dev/null && truncate -s 32M "$raw"
raw_head=$(dd if="$raw" bs=1M count=4 2>/dev/null | md5sum | cut -d' ' -f1)
vbd_a=$(create_vbd "aio:$raw")
check "raw VBD without a block device ($vbd_a)" test -n "$vbd_a"

base="$SCRATCH/base.vhd" leaf1="$SCRATCH/leaf1.vhd" leaf2="$SCRATCH/leaf2.vhd"
check "vhd-util create base" vhd-util create -n "$base" -s 32
dd if=/dev/urandom of="$SCRATCH/prefill" bs=1M count=4 2>/dev/null
vhd_head=$(md5sum < "$SCRATCH/prefill" | cut -d' ' -f1)
fill=$(create_vbd "vhd:$base")
check "fill the base through the NBD export" \
    qemu-img convert -n -f raw "$SCRATCH/prefill" -O raw "$(nbd_of "$fill")"
check "destroy the filling VBD" tap-ctl destroy -p "${fill% *}" -m "${fill#* }"
check "vhd-util snapshot base -> leaf1" vhd-util snapshot -n "$leaf1" -p "$base"
vbd_b=$(create_vbd "vhd:$leaf1")
check "VHD chain VBD ($vbd_b)" test -n "$vbd_b"

mbox=$(make_mailbox)
guest_initrd /run/vbd3.cpio.gz 'DISKS="xvda xvdb"' MAILBOX=xvdc SLOTS=8 \
    "EXPECT=\"xvda:0:4:$raw_head xvdb:0:4:$vhd_head\"" 'BLKFRONT="max_ring_page_order=3"'
domid=$(guest_start vbd3 /run/vbd3.cpio.gz)
check "guest started, blkfront ready (domain $domid)" test -n "$domid"
attach_disks() {
    guest_disk "$domid" xvda vbd3 "$vbd_a" && guest_disk "$domid" xvdb vbd3 "$vbd_b" &&
        guest_disk "$domid" xvdc vbd "$mbox"
}
check "vbd3 disks (raw, VHD) and a blkback mailbox" attach_disks

read -r pid_a minor_a <<<"$vbd_a"
read -r pid_b minor_b <<<"$vbd_b"
be_a=/local/domain/0/backend/vbd3/$domid/51712
if check "guest reads dom0's data through our back-end and finishes a round" \
        wait_console vbd3 '^GUEST: round 1 ok' 300; then
    check "tapback connected the rings (state 4, kthread-pid)" \
        sh -c "[ \"\$(xenstore-read $be_a/state)\" = 4 ] && [ \"\$(xenstore-read $be_a/kthread-pid)\" = $pid_a ]"
    check "the guest took a multi-page ring (ring-page-order 3)" \
        sh -c "[ \"\$(xenstore-read /local/domain/$domid/device/vbd/51712/ring-page-order)\" = 3 ]"
    check "tap-ctl stats shows the ring (xenbus)" \
        sh -c "tap-ctl stats -p $pid_a -m $minor_a | grep -q '\"xenbus\": { \"pool\": \"td-xenio-default\", \"domid\": $domid, \"devid\": 51712'"
    check "statistics files for xcp-rrdd" \
        test -s "/dev/shm/td3-$pid_a/vbd-$domid-51712" -a -s "/dev/shm/vbd3-$domid-51712/statistics"
    check "io_ring published" test -s "/dev/shm/vbd3-$domid-51712/io_ring"

    check "pause the raw VBD under the guest's I/O" tap-ctl pause -p "$pid_a" -m "$minor_a"
    sleep 1; before=$(last_round vbd3); sleep 3
    check "the guest makes no progress while paused (round $before)" test "$(last_round vbd3)" -le $((before + 1))
    check "unpause" tap-ctl unpause -p "$pid_a" -m "$minor_a"
    check "the guest goes on after unpause" wait_rounds vbd3 2 180

    check "pause the VHD VBD" tap-ctl pause -p "$pid_b" -m "$minor_b"
    check "vhd-util snapshot leaf1 -> leaf2 while paused" vhd-util snapshot -n "$leaf2" -p "$leaf1"
    leaf2_size=$(stat -c %s "$leaf2")
    check "unpause onto leaf2" tap-ctl unpause -p "$pid_b" -m "$minor_b" -a "vhd:$leaf2"
    check "the guest goes on on the new leaf" wait_rounds vbd3 3 180
else
    xen_diag "$domid"
fi
post_stop "$mbox"
check "guest verified every slot and halted cleanly (GUEST-RC=0)" guest_wait vbd3 300
guest_unplug "$domid" vbd
check "tapback removed the back ends of the vanished guest" \
    sh -c "for i in \$(seq 60); do xenstore-read $be_a/state >/dev/null 2>&1 || exit 0; sleep 1; done; exit 1"
check "the ring's statistics files are gone" sh -c "for i in \$(seq 30); do [ -e /dev/shm/vbd3-$domid-51712 ] || exit 0; sleep 1; done; exit 1"
check "no ring left in tap-ctl stats" sh -c "! tap-ctl stats -p $pid_a -m $minor_a | grep -q xenbus"
check "dom0 reads the raw disk as the guest last saw it" \
    test "$(nbd_md5 "$vbd_a" 16)" = "$(guest_md5 vbd3 xvda)"
check "dom0 reads the VHD chain as the guest last saw it" \
    test "$(nbd_md5 "$vbd_b" 16)" = "$(guest_md5 vbd3 xvdb)"
check "the guest's writes after the snapshot went into leaf2" test "$(stat -c %s "$leaf2")" -gt "${leaf2_size:-0}"
check "destroy the raw VBD" tap-ctl destroy -p "$pid_a" -m "$minor_a"
check "destroy the VHD VBD" tap-ctl destroy -p "$pid_b" -m "$minor_b"
check "vhd-util check leaf2" vhd-util check -n "$leaf2"
kill "$tapback_pid" 2>/dev/null
losetup -d "$mbox"
finish
