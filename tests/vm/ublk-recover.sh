#!/bin/bash
# Daemon restart without losing the device: SIGKILL tapdisk under fio load, tap-ctl recover,
# fio goes on and verifies; recovery with -a; an orphan device never blocks a later create.
# The image is fully allocated, so both tapdisks serve reads from its mapped pages (the
# default for images in memory).
. "$1/tests/vm/lib.sh"

img=$(make_raw recover.img 128)
fallocate -l 128M "$img"
dev=$(tap-ctl create -b ublk -a "aio:$img" 2>>"$LOG")
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
check "created $dev (tapdisk $pid)" test -b "$dev"
check "recovery state file written" grep -q "params=aio:$img" "$BLKTAP_CONTROL_DIR/vbd-$minor"

# Rate-limited so the write phase (8192 writes, ~8 s) is still running when tapdisk is killed,
# however fast the device is.
fio --name=recover --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --size=32M --rate_iops=1000 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output="$SCRATCH/fio.out" >/dev/null 2>&1 &
fio_pid=$!
sleep 4
check "fio is running before the kill" kill -0 "$fio_pid"
kill -9 "$pid"
sleep 1
check "tapdisk $pid is gone" sh -c "! kill -0 $pid 2>/dev/null"
check "the device stays" test -b "$dev"
check "fio is waiting, not failed" kill -0 "$fio_pid"
new=$(tap-ctl recover -m "$minor" 2>>"$LOG")
check "tap-ctl recover re-attaches the same device ($new)" test "$new" = "$dev"
new_pid=$(pid_of_minor "$minor")
check "a new tapdisk serves minor $minor ($new_pid)" sh -c "test -n '$new_pid' && test '$new_pid' != '$pid'"
check "the new tapdisk maps the image too" sh -c "tap-ctl stats -p '$new_pid' -m $minor | grep -q '\"mapped\": true'"
wait "$fio_pid"; rc=$?
cat "$SCRATCH/fio.out" >> "$LOG" 2>/dev/null
check "fio completes with verify passing (exit $rc)" sh -c "test $rc -eq 0 && grep -q 'err= 0' '$SCRATCH/fio.out'"

# Again, recovering with an explicit image (-a) while a reader waits.
pid=$new_pid
dd if="$dev" of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null
kill -9 "$pid"
(dd if="$dev" of="$SCRATCH/after" bs=1M count=8 iflag=direct 2>>"$LOG") &
reader=$!
sleep 1
new=$(tap-ctl recover -m "$minor" -a "aio:$img" 2>>"$LOG")
check "recover -a aio:$img" test "$new" = "$dev"
wait "$reader"; rc=$?
check "a read issued while no tapdisk ran completes after recovery" sh -c "test $rc -eq 0 && cmp -n 8388608 '$SCRATCH/after' '$img'"
check "destroy after recovery" tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor"
check "device removed" test ! -e "$dev"
check "state file removed" test ! -e "$BLKTAP_CONTROL_DIR/vbd-$minor"

# An orphan (tapdisk killed, never recovered, minor freed) must not break later creates.
img2=$(make_raw orphan.img 32)
dev=$(tap-ctl create -b ublk -a "aio:$img2" 2>>"$LOG")
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
kill -9 "$pid"; sleep 1
check "free the minor of the dead tapdisk" tap-ctl free -m "$minor"
dev2=$(tap-ctl create -b ublk -a "aio:$img2" 2>>"$LOG")
check "create over the orphan device works ($dev2)" test -b "$dev2"
check "and serves data" sh -c "dd if=/dev/urandom of='$SCRATCH/q' bs=64k count=8 2>/dev/null && dd if='$SCRATCH/q' of='$dev2' bs=64k oflag=direct 2>/dev/null && cmp -n 524288 '$SCRATCH/q' '$dev2'"
check "destroy" tap-ctl destroy -p "$(pid_of_minor "$(minor_of_device "$dev2")")" -m "$(minor_of_device "$dev2")"
expect_status 2 "recover of an unallocated minor fails with ENOENT" tap-ctl recover -m 77
finish
