#!/bin/bash
# A VHD behind /dev/ublkbN offers discard and write-zeroes (the VHD driver implements both;
# the device takes its features from the VBD's capabilities): blkdiscard and blkdiscard -z
# succeed, the ranges read back as zeros, and the data written before and around them is
# intact. In a differencing VHD the discarded range reads as zeros, never the parent's data.
# shellcheck disable=SC2317 # the helpers below run through check
. "$1/tests/vm/lib.sh"

MIB=1048576
# read_range SOURCE OFFSET LEN OUT [iflag]: copies LEN bytes at OFFSET of SOURCE to OUT and
# checks that all of them arrived (the guest has no /dev/fd for process substitution).
read_range() {
    dd if="$1" of="$4" bs=64k iflag="${5:+$5,}skip_bytes,count_bytes" skip="$2" count="$3" status=none &&
        test "$(stat -c %s "$4")" -eq "$3"
}
# same_as FILE OFFSET LEN DEVICE: the device's bytes at OFFSET equal the file's.
same_as() {
    read_range "$4" "$2" "$3" "$SCRATCH/got" direct && read_range "$1" "$2" "$3" "$SCRATCH/want" &&
        cmp "$SCRATCH/got" "$SCRATCH/want"
}
# zeros_at DEVICE OFFSET LEN: the device reads zeros there.
zeros_at() { read_range "$1" "$2" "$3" "$SCRATCH/got" direct && cmp -n "$3" "$SCRATCH/got" /dev/zero; }
destroy_dev() {
    local minor; minor=$(minor_of_device "$1")
    tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor"
}

vhd="$SCRATCH/disk.vhd"
check "vhd-util create (dynamic, 64 MiB, 2 MiB blocks)" vhd-util create -n "$vhd" -s 64
dev=$(tap-ctl create -b ublk -a "vhd:$vhd" 2>>"$LOG")
check "create -b ublk gives /dev/ublkbN ($dev)" sh -c "case '$dev' in /dev/ublkb[0-9]*) test -b '$dev';; *) false;; esac"
name=${dev#/dev/}
check "the device offers discard" test "$(cat "/sys/block/$name/queue/discard_max_bytes")" -gt 0
check "the device offers write-zeroes" test "$(cat "/sys/block/$name/queue/write_zeroes_max_bytes")" -gt 0

dd if=/dev/urandom of="$SCRATCH/data" bs=1M count=24 status=none
check "write 24 MiB of data" dd if="$SCRATCH/data" of="$dev" bs=1M oflag=direct conv=fsync status=none
check "the data reads back" same_as "$SCRATCH/data" 0 $((24 * MIB)) "$dev"

# Whole blocks (2-6 MiB) and a range cutting blocks (9.5-12.25 MiB).
check "blkdiscard 4 MiB at 2 MiB" blkdiscard -o $((2 * MIB)) -l $((4 * MIB)) "$dev"
check "blkdiscard 2.75 MiB at 9.5 MiB" blkdiscard -o $((19 * MIB / 2)) -l $((11 * MIB / 4)) "$dev"
check "blkdiscard -z 1.5 MiB at 16.5 MiB" blkdiscard -z -o $((33 * MIB / 2)) -l $((3 * MIB / 2)) "$dev"
check "blkdiscard -z 2 MiB at 20 MiB (a whole block)" blkdiscard -z -o $((20 * MIB)) -l $((2 * MIB)) "$dev"
check_layout() {
    check "$1: data before the first range" same_as "$SCRATCH/data" 0 $((2 * MIB)) "$dev"
    check "$1: discarded 2-6 MiB reads zeros" zeros_at "$dev" $((2 * MIB)) $((4 * MIB))
    check "$1: data 6-9.5 MiB" same_as "$SCRATCH/data" $((6 * MIB)) $((7 * MIB / 2)) "$dev"
    check "$1: discarded 9.5-12.25 MiB reads zeros" zeros_at "$dev" $((19 * MIB / 2)) $((11 * MIB / 4))
    check "$1: data 12.25-16.5 MiB" same_as "$SCRATCH/data" $((49 * MIB / 4)) $((17 * MIB / 4)) "$dev"
    check "$1: zeroed 16.5-18 MiB reads zeros" zeros_at "$dev" $((33 * MIB / 2)) $((3 * MIB / 2))
    check "$1: data 18-20 MiB" same_as "$SCRATCH/data" $((18 * MIB)) $((2 * MIB)) "$dev"
    check "$1: zeroed 20-22 MiB reads zeros" zeros_at "$dev" $((20 * MIB)) $((2 * MIB))
    check "$1: data 22-24 MiB" same_as "$SCRATCH/data" $((22 * MIB)) $((2 * MIB)) "$dev"
    check "$1: never written 24-64 MiB reads zeros" zeros_at "$dev" $((24 * MIB)) $((40 * MIB))
}
check_layout "live"
check "destroy" destroy_dev "$dev"
check "vhd-util check after the discards" vhd-util check -n "$vhd"
dev=$(tap-ctl create -b ublk -a "vhd:$vhd" 2>>"$LOG")
check "create again ($dev)" test -b "$dev"
check_layout "after destroy and create"
check "destroy" destroy_dev "$dev"

# A differencing VHD over the disk: discarding in the child hides the parent's data.
child="$SCRATCH/child.vhd"
check "vhd-util snapshot" vhd-util snapshot -n "$child" -p "$vhd"
dev=$(tap-ctl create -b ublk -a "vhd:$child" 2>>"$LOG")
check "create on the child ($dev)" test -b "$dev"
check "the child shows the parent's data" same_as "$SCRATCH/data" 0 $((2 * MIB)) "$dev"
check "blkdiscard 1 MiB at 512 KiB in the child" blkdiscard -o $((MIB / 2)) -l "$MIB" "$dev"
check "blkdiscard -z 1 MiB at 6 MiB in the child" blkdiscard -z -o $((6 * MIB)) -l "$MIB" "$dev"
check "child: parent's data before the range" same_as "$SCRATCH/data" 0 $((MIB / 2)) "$dev"
check "child: discarded range reads zeros, not the parent's data" zeros_at "$dev" $((MIB / 2)) "$MIB"
check "child: parent's data after the range" same_as "$SCRATCH/data" $((3 * MIB / 2)) $((MIB / 2)) "$dev"
check "child: zeroed range reads zeros" zeros_at "$dev" $((6 * MIB)) "$MIB"
check "child: parent's data after the zeroed range" same_as "$SCRATCH/data" $((7 * MIB)) $((2 * MIB)) "$dev"
check "destroy" destroy_dev "$dev"
check "vhd-util check on the child" vhd-util check -n "$child"
check "vhd-util check on the parent" vhd-util check -n "$vhd"
finish
