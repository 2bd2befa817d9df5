#!/bin/bash
# The kernel NBD client on tapdisk's NBD socket: /dev/nbd0 reads and writes the image.
. "$1/tests/vm/lib.sh"
img=$(make_raw nbd.img 64)
dd if=/dev/urandom of="$img" bs=1M count=16 conv=notrunc 2>/dev/null
out=$(tap-ctl create -b none -a "aio:$img" 2>>"$LOG")
minor=$(tap-ctl list | sed -n 's/.*minor=\([0-9]*\).*/\1/p' | head -n1)
pid=$(pid_of_minor "$minor")
sock="$BLKTAP_CONTROL_DIR/nbd$pid.$minor"
check "create -b none (NBD only) prints the marker ($out)" test -e "$out"
check "NBD socket $sock" test -S "$sock"
check "nbd-client -unix attaches /dev/nbd0" nbd-client -unix "$sock" /dev/nbd0 -b 4096
check "/dev/nbd0 has the image's size" test "$(blockdev --getsize64 /dev/nbd0)" -eq $((64 << 20))
check "reads through /dev/nbd0 match the image" cmp -n 16777216 /dev/nbd0 "$img"
check "writes through /dev/nbd0 reach the image" sh -c "dd if=/dev/urandom of='$SCRATCH/w' bs=1M count=4 2>/dev/null && dd if='$SCRATCH/w' of=/dev/nbd0 bs=1M seek=20 oflag=direct conv=fsync 2>/dev/null && cmp -n 4194304 '$SCRATCH/w' /dev/nbd0 --ignore-initial=0:20971520 && cmp -n 4194304 '$SCRATCH/w' '$img' --ignore-initial=0:20971520"
check "nbd-client -d detaches" nbd-client -d /dev/nbd0
check "destroy" tap-ctl destroy -p "$pid" -m "$minor"
finish
