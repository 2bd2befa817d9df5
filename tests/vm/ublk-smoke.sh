#!/bin/bash
. "$1/tests/vm/lib.sh"
img=$(make_raw smoke.img 64)
dev=$(tap-ctl create -b ublk -a "aio:$img" 2>>"$LOG")
echo "created: $dev" >> "$LOG"
check "create -b ublk prints /dev/ublkbN" test -b "$dev"
check "write/read back" sh -c "dd if=/dev/urandom of=$SCRATCH/pat bs=1M count=4 2>/dev/null && dd if=$SCRATCH/pat of=$dev bs=1M oflag=direct 2>/dev/null && cmp -n 4194304 $SCRATCH/pat $dev"
tap-ctl list >> "$LOG"
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
check "destroy" tap-ctl destroy -p "$pid" -m "$minor"
check "device gone" test ! -e "$dev"
finish
