#!/usr/bin/env bash
# Benchmark: the ublk device (tapdisk, aio driver) against the kernel loop device on the same
# raw file, fio 4k random reads at queue depth 32, inside the VM (ublk needs its kernel).
# The VM's CPU is emulated, so only the ratios mean something.
#
# On the host: scripts/bench-ublk.sh   (builds tap-ctl and tapdisk in release mode first)
# In the guest (run by scripts/vm-tests.sh): bench-ublk.sh REPO NAME
# Knobs: BENCH_SECONDS per run (default 20), BENCH_MIB image size (default 256); they are
# read in the guest, so set them by editing this file (the guest gets no host environment).
if [ -z "${1:-}" ]; then
    cd "$(dirname "$0")/.." || exit 2
    cargo build --release --quiet -p tapdisk -p tap-ctl --bins || exit 2
    BLKTAP_PROFILE=release exec scripts/vm-tests.sh bench-ublk
fi
. "$1/tests/vm/lib.sh"
seconds=${BENCH_SECONDS:-20}
mib=${BENCH_MIB:-256}
img=$(make_raw bench.img "$mib")
dd if=/dev/urandom of="$img" bs=1M count="$mib" conv=notrunc 2>/dev/null

# iops DEVICE: fio 4k randread QD32 on DEVICE, prints the IOPS.
iops() {
    fio --name=bench --filename="$1" --direct=1 --ioengine=libaio --iodepth=32 --rw=randread \
        --bs=4k --time_based --runtime="$seconds" --ramp_time=2 --size="${mib}M" \
        --output-format=json --output="$SCRATCH/fio.json" >> "$LOG" 2>&1 || return 1
    python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' \
        "$SCRATCH/fio.json"
}

loop=$(losetup -f --show --direct-io=on "$img")
loop_iops=$(iops "$loop")
losetup -d "$loop"
check "loop device ($loop): $loop_iops IOPS" test -n "$loop_iops"

# Variants: data copy mode x how queue threads reach tapdisk's runtime.
variants="user-copy,inline:auto:inline plain-copy,inline:off:inline user-copy,spawn:auto:spawn plain-copy,spawn:off:spawn"
declare -A results
for variant in $variants; do
    name=${variant%%:*}
    rest=${variant#*:}
    dev=$(TAPDISK_UBLK_USER_COPY=${rest%%:*} TAPDISK_UBLK_BRIDGE=${rest#*:} \
          tap-ctl create -b ublk -a "aio:$img" 2>>"$LOG")
    results[$name]=$(iops "$dev")
    minor=$(minor_of_device "$dev")
    tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor" >> "$LOG" 2>&1
    check "ublk $name ($dev): ${results[$name]} IOPS" test -n "${results[$name]}"
done

ratio() { python3 -c "import sys; print('%.2f' % (int(sys.argv[1]) / max(1, int(sys.argv[2]))))" "$1" "$2"; }
echo
echo "fio randread 4k QD32, ${seconds}s, ${mib} MiB raw file (emulated CPU: compare ratios only)"
printf '%-34s %10s %10s\n' device IOPS vs-loop
printf '%-34s %10s %10s\n' "loop (direct-io)" "$loop_iops" 1.00
for variant in $variants; do
    name=${variant%%:*}
    printf '%-34s %10s %10s\n' "ublk tapdisk ($name)" "${results[$name]:-0}" \
        "$(ratio "${results[$name]:-0}" "${loop_iops:-1}")"
done
echo
finish
