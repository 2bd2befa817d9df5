#!/bin/bash
# ublk block devices end to end: file system round trip across destroy/create (-b ublk and
# -b auto), fio verify, EBUSY while held, compatibility links, 20 create/destroy cycles.
. "$1/tests/vm/lib.sh"

# create_dev MODE IMAGE [TAP-CTL ARGS...]: prints the block device tap-ctl create printed.
create_dev() {
    local mode=$1 image=$2; shift 2
    tap-ctl create -b "$mode" -a "aio:$image" "$@" 2>>"$LOG"
}
destroy_dev() {
    local minor; minor=$(minor_of_device "$1")
    tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor"
}

# --- file system round trip, both ways of asking for ublk
for mode in ublk auto; do
    img=$(make_raw "fs-$mode.img" 128)
    dev=$(create_dev "$mode" "$img")
    check "create -b $mode gives /dev/ublkbN ($dev)" sh -c "case '$dev' in /dev/ublkb[0-9]*) test -b '$dev';; *) false;; esac"
    mnt="$SCRATCH/mnt-$mode"; mkdir -p "$mnt"
    check "mkfs.ext4 on $dev" mkfs.ext4 -q -F "$dev"
    check "mount $dev" mount "$dev" "$mnt"
    check "write files" sh -c "dd if=/dev/urandom of='$mnt/blob' bs=1M count=8 2>/dev/null && seq 1 20000 > '$mnt/numbers' && sha256sum '$mnt/blob' '$mnt/numbers' > '$SCRATCH/sums-$mode'"
    check "sync" sync
    check "umount" umount "$mnt"
    check "destroy" destroy_dev "$dev"
    check "device removed after destroy" test ! -e "$dev"
    dev=$(create_dev "$mode" "$img")
    check "create again ($dev)" test -b "$dev"
    check "mount again" mount "$dev" "$mnt"
    check "files intact after destroy/create" sh -c "cd / && sha256sum -c '$SCRATCH/sums-$mode'"
    check "umount" umount "$mnt"
    check "stats show the device" sh -c "tap-ctl stats -p $(pid_of_minor "$(minor_of_device "$dev")") -m $(minor_of_device "$dev") | grep -q '\"blockdev\": \"$dev\"'"
    check "destroy" destroy_dev "$dev"
done

# --- fio verify on the raw device, each data path: user copy with VBD calls polled on the
# queue threads (the default), first over a fully allocated image (on tmpfs, so tapdisk maps
# it and the kernel copies reads straight from the image's pages), then, after the first
# blkdiscard punched a hole, through the VBD's reads: with queue threads off their queue's
# CPUs, and free to run on any CPU (the default) over an image opened without O_DIRECT (reads
# and writes complete on the queue thread itself); plain copy (the VBD reads into and writes
# from the tag's own buffer) polled on the queue threads; plain copy with spawned VBD calls
# and queue threads pinned to their queue's CPUs. Requests up to 512 KiB, the largest the
# device takes (the size of a plain copy tag buffer).
img=$(make_raw fio.img 256)
fallocate -l 256M "$img"
site="$SCRATCH/tuning.toml"
for variant in "auto;inline;any;;true" "auto;inline;other;;false" "auto;inline;any;-D;false" \
               "off;inline;any;-D;false" "off;spawn;queue;;false"; do
    IFS=';' read -r copy bridge affinity flags mapped <<<"$variant"
    what="user copy $copy, $bridge bridge, affinity $affinity${flags:+, $flags}, mapped $mapped"
    printf '[tuning]\nublk_bridge = "%s"\nublk_affinity = "%s"\n' "$bridge" "$affinity" > "$site"
    # shellcheck disable=SC2086 # $flags is empty or one flag
    dev=$(TAPDISK_CONFIG=$site tap-ctl create -b ublk $flags -a "aio:$img" \
          -o "ublk.user_copy=$copy,ublk.queues=2,ublk.depth=32" 2>>"$LOG")
    out="$SCRATCH/fio-$copy-$bridge$flags-$mapped.out"
    check "create ($what)" test -b "$dev"
    minor=$(minor_of_device "$dev")
    check "stats say \"mapped\": $mapped" sh -c "tap-ctl stats -p $(pid_of_minor "$minor") -m $minor | grep -q '\"mapped\": $mapped'"
    check "fio --verify=crc32c, zero errors ($what)" sh -c "fio --name=verify --filename='$dev' --direct=1 --ioengine=libaio --iodepth=16 --numjobs=1 --rw=randwrite --bsrange=4k-512k --size=48M --verify=crc32c --verify_fatal=1 --do_verify=1 --output='$out' && grep -q 'err= 0' '$out' && ! grep -qi 'verify:.*bad\|crc32c.*mismatch' '$out'"
    cat "$out" >> "$LOG" 2>/dev/null
    check "discard reaches the image (blkdiscard)" blkdiscard -o 0 -l 1048576 "$dev"
    check "destroy" destroy_dev "$dev"
done

# --- pause holds every queue's requests, resume lets them through (fio verify across it;
# rate-limited so fio is still writing, ~8 s, when the pause comes, however fast the device)
dev=$(create_dev ublk "$img" -o ublk.queues=4)
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
fio --name=pause --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 --numjobs=2 \
    --rw=randwrite --bs=4k --size=16M --offset_increment=16M --rate_iops=500 \
    --verify=crc32c --verify_fatal=1 \
    --output="$SCRATCH/fio-pause.out" >/dev/null 2>&1 &
fio_pid=$!
sleep 3
check "pause under load (4 queues)" tap-ctl pause -p "$pid" -m "$minor"
check "paused VBD lists as paused" sh -c "tap-ctl list -m $minor | grep -q 'state=0x2a\|state=0x20'"
check "fio waits while paused" kill -0 "$fio_pid"
check "unpause" tap-ctl unpause -p "$pid" -m "$minor"
wait "$fio_pid"; rc=$?
cat "$SCRATCH/fio-pause.out" >> "$LOG" 2>/dev/null
check "fio verify passes across pause/unpause (exit $rc)" sh -c "test $rc -eq 0 && grep -q 'err= 0' '$SCRATCH/fio-pause.out'"
check "destroy" destroy_dev "$dev"

# --- destroy refused while the device is held, device keeps working
img=$(make_raw busy.img 64)
dev=$(create_dev ublk "$img")
minor=$(minor_of_device "$dev"); pid=$(pid_of_minor "$minor")
exec 3<"$dev"
expect_status 16 "destroy while a process holds the device open fails with EBUSY (16)" tap-ctl destroy -p "$pid" -m "$minor"
check "device still works after the refused destroy" sh -c "dd if=/dev/urandom of='$SCRATCH/p' bs=64k count=16 2>/dev/null && dd if='$SCRATCH/p' of='$dev' bs=64k oflag=direct 2>/dev/null && cmp -n 1048576 '$SCRATCH/p' '$dev'"
exec 3<&-
mkdir -p "$SCRATCH/busy" && mkfs.ext4 -q -F "$dev" && mount "$dev" "$SCRATCH/busy"
expect_status 16 "destroy while mounted fails with EBUSY (16)" tap-ctl destroy -p "$pid" -m "$minor"
check "mounted file system still writable" sh -c "echo hello > '$SCRATCH/busy/f' && sync && grep -q hello '$SCRATCH/busy/f'"
umount "$SCRATCH/busy"
check "destroy once released" tap-ctl destroy -p "$pid" -m "$minor"

# --- a mapped image truncated behind tapdisk's back: reads past the new end fail with an I/O
# error, tapdisk lives on, reads before it still work, and destroy works
img=$(make_raw shrink.img 16)
fallocate -l 16M "$img"
dd if=/dev/urandom of="$img" bs=1M count=16 conv=notrunc status=none
dev=$(create_dev ublk "$img")
minor=$(minor_of_device "$dev")
pid=$(pid_of_minor "$minor")
check "stats say \"mapped\": true (shrink.img)" sh -c "tap-ctl stats -p $pid -m $minor | grep -q '\"mapped\": true'"
truncate -s 4M "$img"
expect_status 1 "read past the truncated end fails" \
    dd if="$dev" of=/dev/null bs=4k skip=2048 count=1 iflag=direct status=none
check "tapdisk still alive" kill -0 "$pid"
check "read before the truncated end works" \
    sh -c "dd if='$dev' bs=4k count=1 iflag=direct status=none | cmp -n 4096 - '$img'"
check "destroy" destroy_dev "$dev"

# --- compatibility link
img=$(make_raw compat.img 16)
dev=$(create_dev ublk "$img" -o block_device.compat_symlinks=true)
minor=$(minor_of_device "$dev")
check "/dev/xen/blktap-2/tapdev$minor -> $dev" test "$(readlink "/dev/xen/blktap-2/tapdev$minor")" = "$dev"
check "destroy" destroy_dev "$dev"
check "link removed on destroy" test ! -L "/dev/xen/blktap-2/tapdev$minor"

# --- 20 create/destroy cycles, nothing left over
img=$(make_raw cycle.img 16)
bad=0
for i in $(seq 1 20); do
    if ! { dev=$(create_dev ublk "$img") && test -b "$dev" && destroy_dev "$dev" >> "$LOG" 2>&1; }; then
        bad=$((bad + 1))
        echo "cycle $i failed ($dev)" >> "$LOG"
    fi
done
check "20 create/destroy cycles" test "$bad" -eq 0
check "no ublk device left" sh -c "! ls /dev/ublkb* /dev/ublkc* 2>/dev/null | grep -q ."
check "no tapdisk process left" sh -c "! pgrep -x tapdisk"
check "no minor left (tap-ctl list empty)" sh -c "test -z \"\$(tap-ctl list)\""
check "no recovery state left" sh -c "! ls $BLKTAP_CONTROL_DIR/vbd-* 2>/dev/null | grep -q ."
finish
