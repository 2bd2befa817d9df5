#!/bin/bash
# LVHD (VHD written straight onto LVM logical volumes) on real LVM, driven the way
# XenServer's storage manager drives it: a volume group on a loop device, volumes created,
# deactivated (lvchange -an) and reactivated, and the whole life cycle through our tools:
# create -S 2097152 on an existing volume, scan of inactive volumes (-l, -a for the chain),
# tapdisk serving the leaf with guest writes into new blocks (fio verify), snapshot
# (pause/snapshot/hide/unpause), inflate (lvextend, last 512 bytes zeroed, modify -s),
# deflate (modify -s, lvreduce), resize with a journal volume, set parent. After each step
# `vhd-util check` must pass, and the disk's data is compared with a model (a raw file that
# received the same writes). Small volumes (4 MiB extents), a 16 MiB disk.
# shellcheck disable=SC2317 # the helpers below run through check
. "$1/tests/vm/lib.sh"

lvm_setup

SR=41d3c3a4-7a2b-4c1d-8e9f-102030405060
VG="VG_XenStorage-$SR"
A=VHD-8c2f6a04-1b3e-4c5d-9e7f-0a1b2c3d4e5f     # the VDI's first volume (becomes the parent)
B=VHD-0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f70     # the leaf after the snapshot
J=journal-VHD-0d9e8f7a
dev() { echo "/dev/$VG/$1"; }
MODEL="$SCRATCH/model.img"     # what the guest must read back
MB=$((1 << 20))

lv_size() { lvs --noheadings --nosuffix --units b -o lv_size "$VG/$1" | tr -d ' '; }
# inflate LV BYTES: grow the volume, zero its last 512 bytes, move the footer there.
inflate() {
    lvextend -q -L "$(($2 / MB))m" "$VG/$1" &&
        dd if=/dev/zero of="$(dev "$1")" bs=512 count=1 seek=$(($2 / 512 - 1)) \
            oflag=direct conv=notrunc status=none &&
        vhd-util modify -s "$2" -n "$(dev "$1")"
}
# deflate LV: footer to the end of the data (rounded up to an extent), then shrink.
deflate() {
    local phys extents size
    phys=$(vhd-util query -s -n "$(dev "$1")") || return 1
    extents=$(( (phys + 4 * MB - 1) / (4 * MB) ))
    size=$(( extents * 4 * MB ))
    vhd-util modify -s "$size" -n "$(dev "$1")" && lvreduce -q -f -L "$((size / MB))m" "$VG/$1"
}
valid() { vhd-util check -n "$(dev "$1")" | grep -qx "$(dev "$1") is valid"; }
# chain_is_model LEAF: the chain at LEAF, read through vhd-util, is the model.
chain_is_model() {
    vhd-util read -n "$(dev "$1")" -r 0 -c $(($(stat -c %s "$MODEL") / 512)) | cmp - "$MODEL"
}
# served_is_model LEAF: the chain at LEAF, served read-only by tapdisk, reads as the model.
served_is_model() {
    local d m rc
    d=$(tap-ctl create -R -b ublk -a "vhd:$(dev "$1")" 2>>"$LOG") || return 1
    cmp "$d" "$MODEL"; rc=$?
    m=$(minor_of_device "$d"); tap-ctl destroy -p "$(pid_of_minor "$m")" -m "$m"
    return "$rc"
}
# scan_field LINE KEY: a key=value of one scan line, split as SM's _parseVHDInfo does.
scan_field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
# guest_writes DEV SEED: fio writes (and verifies) 6 MiB of new blocks, then the model
# takes the device's whole content.
guest_writes() {
    fio --name=guest --filename="$1" --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
        --bsrange=4k-256k --offset="$2" --size=6M --randseed="$2" --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --output="$SCRATCH/fio-$2.out" &&
        grep -q 'err= 0' "$SCRATCH/fio-$2.out" && dd if="$1" of="$MODEL" bs=1M status=none
}

# --- the storage repository: a VG on a loop device
backing="$SCRATCH/pv.img"
truncate -s 256M "$backing"
loopdev=$(losetup -f --show "$backing")
check "pvcreate + vgcreate $VG on $loopdev" sh -c "pvcreate -q '$loopdev' && vgcreate -q -s 4m '$VG' '$loopdev'"

# --- VDI create: a volume sized for the metadata, then create -S 2097152 onto it
check "lvcreate $A (8 MiB)" lvcreate -q -L 8m -n "$A" "$VG"
check "vhd-util create -s 16 -S 2097152 writes onto the volume" \
    vhd-util create -n "$(dev "$A")" -s 16 -S 2097152
check "$A valid" valid "$A"
info=$(vhd-util query -vsaf -n "$(dev "$A")" | tr '\n' ' ')
check "query -vsaf: 16 MiB, the metadata's size, not hidden, no block ($info)" \
    test "$info" = "16 $(vhd-util query -s -n "$(dev "$A")") hidden: 0 0 "
truncate -s 16M "$MODEL"

# --- inactive: scan reads the volume from the physical volume
check "lvchange -an" lvchange -q -an "$VG"
check "no /dev node while inactive" test ! -e "$(dev "$A")"
line=$(vhd-util scan -f -m 'VHD-*' -l "$VG" 2>>"$LOG")
echo "scan: $line" >> "$LOG"
check "scan -l lists the inactive volume" test "$(scan_field "$line" vhd)" = "$A"
check "... capacity 16 MiB, size = the volume's, no parent" \
    test "$(scan_field "$line" capacity) $(scan_field "$line" size) $(scan_field "$line" parent)" = "$((16 * MB)) $((8 * MB)) none"

# --- attach: activate, inflate to the full size, tapdisk serves the leaf, guest writes
check "lvchange -ay $A" lvchange -q -ay "$VG/$A"
check "inflate $A to 24 MiB (lvextend, zero tail, modify -s)" inflate "$A" $((24 * MB))
check "$A valid after inflate" valid "$A"
leafdev=$(tap-ctl create -b ublk -a "vhd:$(dev "$A")" 2>>"$LOG")
check "tapdisk serves $A ($leafdev)" test -b "$leafdev"
# Needs tapdisk to allocate new blocks before a footer at the volume's end (issue 13 item 2).
check "guest writes into new blocks of $A (fio verify)" guest_writes "$leafdev" 0

# --- snapshot: pause, new leaf volume, snapshot, hide the parent, unpause onto it
minor=$(minor_of_device "$leafdev"); pid=$(pid_of_minor "$minor")
check "tap-ctl pause" tap-ctl pause -p "$pid" -m "$minor"
check "lvcreate $B (8 MiB)" lvcreate -q -L 8m -n "$B" "$VG"
check "vhd-util snapshot -S 2097152 onto $B" \
    vhd-util snapshot -n "$(dev "$B")" -p "$(dev "$A")" -S 2097152
# A device's default journal directory need not exist (the guest's root is a scratch overlay).
rm -rf /var/lib/vhd-util
check "set hidden on $A (its journal directory created on the way)" \
    sh -c "vhd-util set -n '$(dev "$A")' -f hidden -v 1 && test -d /var/lib/vhd-util"
check "query -p: the parent by its device-mapper name" \
    test "$(vhd-util query -p -n "$(dev "$B")")" = "/dev/mapper/${VG//-/--}-${A//-/--}"
check "read -p: the decoded name ends with the parent volume (SM's _getVHDParentNoCheck)" \
    sh -c "vhd-util read -p -n '$(dev "$B")' | grep 'decoded name :' | head -n1 | cut -d: -f2 | tr -d ' ' | sed 's/--/-/g' | grep -q '$A\$'"
check "inflate $B to 24 MiB" inflate "$B" $((24 * MB))
check "tap-ctl unpause onto $B" tap-ctl unpause -p "$pid" -m "$minor" -a "vhd:$(dev "$B")"
check "guest writes into new blocks of $B" guest_writes "$leafdev" $((8 * MB))
check "tap-ctl destroy" tap-ctl destroy -p "$pid" -m "$minor"
check "$A and $B valid" sh -c "vhd-util check -n '$(dev "$B")' -p"
check "chain reads as the model (vhd-util read)" chain_is_model "$B"

# --- deflate the hidden parent (read-only from now on)
check "deflate $A (modify -s to its data, lvreduce)" deflate "$A"
check "$A valid after deflate ($(lv_size "$A") bytes)" valid "$A"
check "chain still reads as the model" chain_is_model "$B"

# --- everything inactive: scan the leaf with -a (the chain, leaf first), then activate
# in that order as SM does
check "lvchange -an" lvchange -q -an "$VG"
out=$(vhd-util scan -f -m "$B" -l "$VG" -a 2>>"$LOG")
echo "scan -a: $out" >> "$LOG"
first=$(head -n1 <<<"$out"); second=$(sed -n 2p <<<"$out")
check "scan -a: the leaf, then its parent" \
    test "$(scan_field "$first" vhd) $(scan_field "$second" vhd)" = "$B $A"
check "... the leaf's parent is $A, the parent hidden with no parent" \
    test "$(scan_field "$first" parent) $(scan_field "$second" hidden) $(scan_field "$second" parent)" = "$A 1 none"
check "scan -c of every volume: no error line" \
    sh -c "! vhd-util scan -f -c -m 'VHD-*' -l '$VG' | grep -q scan-error"
for v in $(scan_field "$first" vhd) $(scan_field "$second" vhd); do
    lvchange -q -ay "$VG/$v"
done
check "chain reads as the model after reactivation" chain_is_model "$B"

# --- resize with a journal volume SM created
check "lvcreate $J" lvcreate -q -L 8m -n "$J" "$VG"
check "resize -s 32 -j (journal volume)" vhd-util resize -s 32 -n "$(dev "$B")" -j "$(dev "$J")"
check "query -v says 32" test "$(vhd-util query -v -n "$(dev "$B")")" = 32
check "$B valid after resize" valid "$B"
truncate -s 32M "$MODEL"
check "chain reads as the (grown) model" chain_is_model "$B"
check "lvremove $J" lvremove -q -f "$VG/$J"

# --- set parent (SM relinks a child after coalescing): onto the same parent again
check "modify -p" vhd-util modify -p "$(dev "$A")" -n "$(dev "$B")"
check "check -p after modify -p" vhd-util check -n "$(dev "$B")" -p
check "set hidden 0 then 1 on the parent" sh -c "vhd-util set -n '$(dev "$A")' -f hidden -v 0 && vhd-util set -n '$(dev "$A")' -f hidden -v 1 && [ \"\$(vhd-util query -f -n '$(dev "$A")')\" = 'hidden: 1' ]"
check "chain served by tapdisk reads as the model at the end" served_is_model "$B"

# --- teardown (tapdisks first: a failed step may have left one holding a volume)
pkill_ours
sleep 0.5
teardown() {
    lvchange -q -an "$VG" && vgremove -q -f "$VG" && pvremove -q "$loopdev" && losetup -d "$loopdev"
}
check "vgremove, pvremove, losetup -d" teardown
finish
