#!/bin/bash
# bench-xen.sh -- the guest's I/O on our vbd3 back-end (tapdisk's blkif frontend, connected by
# our tapback) against the same image on "phy:" through loop + blkback, in one Xen boot.
#
# Run it with `scripts/xen-tests.sh bench-xen` (it runs in dom0 like a test). The image is a
# 256 MiB raw file on dom0's tmpfs; the guest (busybox only) times with dd and direct I/O:
# 1 MiB sequential writes and reads (MiB/s) and 4 KiB writes and reads one at a time (IOPS,
# queue depth 1), on xvda (vbd3) and xvdb (loop + blkback), ROUNDS times, alternating which
# goes first. The emulated CPU makes absolute numbers meaningless: read the ratios.
# Knobs (environment): ROUNDS (default 2), MIB (sequential size, default 64), OPS (4 KiB
# requests, default 2048).
# shellcheck source=tests/xen/lib.sh
. "$1/tests/xen/lib.sh"
ROUNDS=${ROUNDS:-2} MIB=${MIB:-64} OPS=${OPS:-2048}

img="$SCRATCH/bench.img"
dd if=/dev/urandom of="$img" bs=1M count=256 2>/dev/null
tap-ctl create -b none -a "aio:$img" >> "$LOG" 2>&1
vbd=$(tap-ctl list | sed -n 's/.*pid=\([0-9]*\).*minor=\([0-9]*\).*/\1 \2/p' | head -n1)
loop=$(losetup -f --show "$img")
tapback 2>> "$SHARE/tapback.log" &
tapback_pid=$!

cat > "$SCRATCH/guest.sh" <<G
{ rmmod xen_blkfront && insmod /mods/xen-blkfront.ko max_ring_page_order=3; } || exit 1
echo "GUEST: blkfront ready"
{ xen_wait_dev /dev/xvda 300 && xen_wait_dev /dev/xvdb 300; } || exit 1
now() { cut -d' ' -f1 /proc/uptime; }
run() { # DISK JOB
    t0=\$(now)
    case \$2 in
    seqwrite) dd if=/dev/zero of=/dev/\$1 bs=1M count=$MIB oflag=direct 2>/dev/null ;;
    seqread) dd if=/dev/\$1 of=/dev/null bs=1M count=$MIB iflag=direct 2>/dev/null ;;
    4kwrite) dd if=/dev/zero of=/dev/\$1 bs=4k count=$OPS oflag=direct 2>/dev/null ;;
    4kread) dd if=/dev/\$1 of=/dev/null bs=4k count=$OPS iflag=direct 2>/dev/null ;;
    esac
    echo "BENCH \$1 \$2 \$t0 \$(now)"
}
r=0
while [ \$r -lt $ROUNDS ]; do
    if [ \$((r % 2)) = 0 ]; then order="xvda xvdb"; else order="xvdb xvda"; fi
    for job in seqwrite seqread 4kwrite 4kread; do for d in \$order; do run \$d \$job; done; done
    r=\$((r + 1))
done
G
xen_guest_initrd "$SCRATCH/guest.sh" /run/bench.cpio.gz
domid=$(guest_start bench /run/bench.cpio.gz)
guest_disk "$domid" xvda vbd3 "$vbd" && guest_disk "$domid" xvdb vbd "$loop"
check "benchmark guest ran" guest_wait bench 1500
guest_unplug "$domid" vbd

echo "Xen guest I/O, our vbd3 back-end (xvda) vs loop + blkback (xvdb), same 256 MiB raw image"
echo "on dom0 tmpfs; $ROUNDS rounds; emulated CPU: ratios only. $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "| job | vbd3 | loop + blkback | vbd3 / blkback |"
echo "|---|---:|---:|---:|"
console bench | awk -v mib="$MIB" -v ops="$OPS" '
    /^BENCH / { t = $5 - $4; if (t <= 0) t = 0.01; sum[$2 " " $3] += t; n[$2 " " $3]++ }
    END {
        split("seqwrite seqread 4kwrite 4kread", jobs, " ")
        for (i = 1; i <= 4; i++) {
            j = jobs[i]; a = sum["xvda " j] / n["xvda " j]; b = sum["xvdb " j] / n["xvdb " j]
            unit = (j ~ /^seq/) ? "MiB/s" : "IOPS"; amount = (j ~ /^seq/) ? mib : ops
            printf "| %s (%s) | %.1f | %.1f | %.2f |\n", j, unit, amount / a, amount / b, b / a
        }
    }'
kill "$tapback_pid" 2>/dev/null
tap-ctl destroy -p "${vbd% *}" -m "${vbd#* }" >> "$LOG" 2>&1
losetup -d "$loop"
finish
