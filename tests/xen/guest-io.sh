# shellcheck shell=sh
# tests/xen/guest-io.sh -- the I/O checker a PV guest runs (busybox sh, from its initramfs).
#
# dom0 prepends the settings:
#   DISKS="xvda xvdb"      disks to exercise
#   MAILBOX=xvdc           a small disk dom0 writes "STOP" on when the guest should finish
#   EXPECT="xvdb:0:4:MD5"  (optional) regions dom0 filled: DISK:FIRST_MIB:MIBS:md5
#   SLOTS=8                1 MiB slots per disk the rounds write (from MiB 8 on)
#   MAX_ROUNDS=400         give up (failure) if no STOP came by then
#   BLKFRONT="..."         (optional) reload xen-blkfront with these module parameters first
#                          (the initramfs insmods it, so the kernel command line cannot)
#
# "GUEST: blkfront ready" tells dom0 to hot-plug the disks (none exist before, so the module
# reload never has to let go of a connected disk). Every round writes 256 KiB of fresh random
# data into the next slot of each disk (direct I/O, fsync), reads it back and compares;
# "GUEST: round N ok" tells dom0 how far it got. After STOP every slot written is read back
# once more, and "GUEST-DISK-MD5 DISK MD5" gives the md5 of each disk's first (8 + SLOTS) MiB,
# for dom0 to compare after the guest halted.
set -u
fail() { echo "GUEST: FAIL $*"; exit 1; }
md5() { md5sum | cut -d' ' -f1; }
if [ -n "${BLKFRONT:-}" ]; then
    # shellcheck disable=SC2086 # module parameters, one word each
    { rmmod xen_blkfront && insmod /mods/xen-blkfront.ko $BLKFRONT; } || fail "reloading xen-blkfront"
fi
echo "GUEST: blkfront ready"
for d in $DISKS $MAILBOX; do xen_wait_dev "/dev/$d" 300 || fail "no /dev/$d"; done
for d in $DISKS; do echo "GUEST: $d has $(cat "/sys/block/$d/size") sectors"; done
for e in ${EXPECT:-}; do
    IFS=: read -r d first n want <<E
$e
E
    got=$(dd if="/dev/$d" bs=1M skip="$first" count="$n" iflag=direct 2>/dev/null | md5)
    [ "$got" = "$want" ] || fail "$d MiB $first+$n has md5 $got, dom0 wrote $want"
    echo "GUEST: $d MiB $first+$n holds what dom0 wrote"
done
r=0
while :; do
    r=$((r + 1))
    slot=$(( (r - 1) % SLOTS ))
    seek=$(( (8 + slot) * 16 ))
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=4 2>/dev/null
    want=$(md5 < /tmp/pattern)
    for d in $DISKS; do
        dd if=/tmp/pattern of="/dev/$d" bs=64k seek="$seek" oflag=direct conv=fsync,notrunc 2>/dev/null ||
            fail "round $r: write to $d slot $slot failed"
        got=$(dd if="/dev/$d" bs=64k skip="$seek" count=4 iflag=direct 2>/dev/null | md5)
        [ "$got" = "$want" ] || fail "round $r: $d slot $slot reads back $got, wrote $want"
        echo "$want" > "/tmp/$d.slot$slot"
    done
    echo "GUEST: round $r ok"
    stop=$(dd if="/dev/$MAILBOX" bs=512 count=1 iflag=direct 2>/dev/null | head -c 4)
    [ "$stop" = STOP ] && break
    [ "$r" -ge "${MAX_ROUNDS:-400}" ] && fail "no STOP from dom0 after $r rounds"
done
for d in $DISKS; do
    for f in "/tmp/$d".slot*; do
        slot=${f##*slot}
        got=$(dd if="/dev/$d" bs=64k skip=$(( (8 + slot) * 16 )) count=4 iflag=direct 2>/dev/null | md5)
        [ "$got" = "$(cat "$f")" ] || fail "final check: $d slot $slot reads $got, wrote $(cat "$f")"
    done
    sync
    echo "GUEST-DISK-MD5 $d $(dd if="/dev/$d" bs=1M count=$((8 + SLOTS)) iflag=direct 2>/dev/null | md5)"
done
echo "GUEST: $r rounds, every slot verified"
