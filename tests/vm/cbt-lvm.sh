#!/bin/bash
# Changed-block tracking as an LVM SR runs it: the log is a 4 MiB logical volume
# (<vdi>.cbtlog, far longer than its header and bitmap), made with cbt-util on the block
# device, and the disk is served through /dev/ublkbN. Writes and write-zeroes through the
# kernel device mark their 64 KiB blocks; a clean destroy leaves the header as SM set it
# (consistent 0); the snapshot moves tracking to a new log volume (pause, unpause -c) after
# the old one was deactivated and activated again; kill -9 loses no mark of a completed
# write. Checked through cbt-util get -b and extents, as SM and a backup tool read them.
# shellcheck disable=SC2317 # the helpers below run through check
. "$1/tests/vm/lib.sh"

lvm_setup

VG=VG_XenStorage-5e1d0c2b-3a49-4f87-9b6e-0c1d2e3f4a5b
VDI=7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d
SNAP=0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b
DISK=$((16 << 20))      # 256 blocks of 64 KiB: a 32-byte bitmap
dev_of() { echo "/dev/$VG/$1"; }
LOG_LV="$VDI.cbtlog"
SNAP_LV="$SNAP.cbtlog"

# bitmap_is LV HEX: the log's bitmap (cbt-util get -b) is exactly these bytes.
bitmap_is() { test "$(cbt-util get -n "$(dev_of "$1")" -b | od -An -v -tx1 | tr -d ' \n')" = "$2"; }
# bits_set LV BLOCK...: each block's bit is set in the log's bitmap.
bits_set() {
    local lv=$1 hex block byte bit; shift
    hex=$(cbt-util get -n "$(dev_of "$lv")" -b | od -An -v -tx1 | tr -d ' \n')
    for block in "$@"; do
        byte=$((block >> 3))
        byte=$((16#${hex:$((byte * 2)):2}))
        bit=$((block % 8))
        [ $(((byte >> bit) & 1)) -eq 1 ] || { echo "block $block not marked" >&2; return 1; }
    done
}
# bitmap_with BLOCK...: the hex of a 32-byte bitmap with these blocks set.
bitmap_with() {
    local bytes=() block i out=
    for i in $(seq 0 31); do bytes[i]=0; done
    for block in "$@"; do bytes[block / 8]=$((bytes[block / 8] | (1 << (block % 8)))); done
    for i in $(seq 0 31); do out+=$(printf %02x "${bytes[i]}"); done
    echo "$out"
}
write_at() { dd if=/dev/urandom of="$1" bs="$3" count=1 seek="$2" oflag=direct,seek_bytes conv=notrunc status=none; }
destroy_dev() {
    local minor; minor=$(minor_of_device "$1")
    tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor"
}

truncate -s 64M "$SCRATCH/pv.img"
pv=$(losetup -f --show "$SCRATCH/pv.img")
check "volume group on $pv" vgcreate -q -s 4m "$VG" "$pv"
check "data volume" lvcreate -q -an -Zn -L 16m -n "VHD-$VDI" "$VG" -y
check "log volume (4 MiB, as SM's journaler makes it)" lvcreate -q -an -Zn -L 4m -n "$LOG_LV" "$VG" -y
check "activate both" lvchange -q -ay "$VG/VHD-$VDI" "$VG/$LOG_LV"
# Enable CBT, then attach: what SM's VDI.py runs.
check "cbt-util create on the volume" cbt-util create -n "$(dev_of "$LOG_LV")" -s "$DISK"
check "cbt-util set -f 1" cbt-util set -n "$(dev_of "$LOG_LV")" -f 1
check "cbt-util set -f 0 at attach" cbt-util set -n "$(dev_of "$LOG_LV")" -f 0
check "a fresh log has nothing marked" bitmap_is "$LOG_LV" "$(bitmap_with)"

dev=$(tap-ctl create -b ublk -a "aio:$(dev_of "VHD-$VDI")" -D -C "$(dev_of "$LOG_LV")" 2>>"$LOG")
check "create -b ublk -C LV gives /dev/ublkbN ($dev)" test -b "$dev"
# 4 KiB at 1 MiB (block 16); 68 KiB at 3 MiB (blocks 48, 49); zeroing 64 KiB at 15 MiB (240).
check "write 4 KiB at 1 MiB" write_at "$dev" $((1 << 20)) 4096
check "write 68 KiB at 3 MiB" write_at "$dev" $((3 << 20)) 69632
check "blkdiscard -z 64 KiB at 15 MiB" blkdiscard -z -o $((15 << 20)) -l 65536 "$dev"
check "the running log marks blocks 16, 48, 49, 240" bitmap_is "$LOG_LV" "$(bitmap_with 16 48 49 240)"
check "destroy" destroy_dev "$dev"
check "after a clean destroy: the same marks" bitmap_is "$LOG_LV" "$(bitmap_with 16 48 49 240)"
check "the header is SM's: consistent still 0" test "$(cbt-util get -n "$(dev_of "$LOG_LV")" -f)" = 0
check "size still $DISK" test "$(cbt-util get -n "$(dev_of "$LOG_LV")" -s)" = "$DISK"
check "extents as JSON" sh -c "cbt-util extents -n '$(dev_of "$LOG_LV")' | grep -c '\"dirty\"' | grep -qx 3"
check "detach: set -f 1, deactivate" sh -c "cbt-util set -n '$(dev_of "$LOG_LV")' -f 1 && lvchange -q -an '$VG/$LOG_LV'"

# Attach again, then a snapshot: the log moves to the snapshot, a new one tracks.
check "attach: activate, set -f 0" sh -c "lvchange -q -ay '$VG/$LOG_LV' && cbt-util set -n '$(dev_of "$LOG_LV")' -f 0"
dev=$(tap-ctl create -b ublk -a "aio:$(dev_of "VHD-$VDI")" -D -C "$(dev_of "$LOG_LV")" 2>>"$LOG")
check "create again ($dev)" test -b "$dev"
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
check "write 4 KiB at 2 MiB (block 32)" write_at "$dev" $((2 << 20)) 4096
check "pause" tap-ctl pause -p "$pid" -m "$minor"
check "rename the log to the snapshot's" lvrename -q "$VG" "$LOG_LV" "$SNAP_LV"
check "snapshot log: set -f 1" cbt-util set -n "$(dev_of "$SNAP_LV")" -f 1
check "new log volume" sh -c "lvcreate -q -ay -L 4m -n '$LOG_LV' '$VG' -y -Zn && cbt-util create -n '$(dev_of "$LOG_LV")' -s $DISK && cbt-util set -n '$(dev_of "$LOG_LV")' -f 0 -p $SNAP"
check "unpause -c onto the new log" tap-ctl unpause -p "$pid" -m "$minor" -a "aio:$(dev_of "VHD-$VDI")" -c "$(dev_of "$LOG_LV")"
check "write 4 KiB at 5 MiB (block 80)" write_at "$dev" $((5 << 20)) 4096
check "the snapshot's log: what was written before it" bitmap_is "$SNAP_LV" "$(bitmap_with 16 32 48 49 240)"
check "the new log: what was written after it" bitmap_is "$LOG_LV" "$(bitmap_with 80)"
check "the new log keeps SM's parent link" test "$(cbt-util get -n "$(dev_of "$LOG_LV")" -p)" = "$SNAP"

# kill -9 during writes: every write dd completed is marked.
for block in 100 101 150 200; do
    write_at "$dev" $((block << 16)) 4096 >> "$LOG" 2>&1
done
check "kill -9 the tapdisk" kill -9 "$pid"
sleep 1
check "after kill -9: every completed write marked" bits_set "$LOG_LV" 80 100 101 150 200
check "after kill -9: consistent still 0" test "$(cbt-util get -n "$(dev_of "$LOG_LV")" -f)" = 0
# What the dead tapdisk left: a ublk device awaiting recovery; tap-ctl destroy refuses a
# dead tapdisk, so it is left to cleanup_all and the kernel (the guest is discarded).

lvchange -q -an "$VG" >> "$LOG" 2>&1
vgremove -q -f "$VG" >> "$LOG" 2>&1
losetup -d "$pv"
finish
