#!/usr/bin/env bash
# Benchmark: the ublk device (tapdisk, aio driver) against the kernel loop device on the same
# raw file, fio 4k random reads at queue depth 32, inside the VM (ublk needs its kernel).
# The VM's CPU is emulated, so only the ratios mean something.
#
# Like with like: the image lives in the guest's /tmp, a tmpfs, where the page cache *is* the
# storage. The loop device runs with direct I/O: it copies the tmpfs pages straight into the
# request. So does tapdisk by default (user copy with mapped reads: its pwrite of
# /dev/ublkcN names the image's mapped pages as the source). The other variants show the
# paths without that: a pread into tapdisk's buffer, then a second copy into the request
# (user copy with TAPDISK_MAPPED_READS=off, with and without O_DIRECT on the image (-D)), or
# the driver copying out of the tag's buffer (plain copy).
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
loop_dio=$(cat "/sys/block/${loop#/dev/}/loop/dio" 2>/dev/null)
loop_iops=$(iops "$loop")
losetup -d "$loop"
check "loop device ($loop, dio=$loop_dio): $loop_iops IOPS" test -n "$loop_iops"

# Variants: "name;environment;tap-ctl create flags". The first is the default configuration.
variants=(
    "default (user copy, mapped reads);;"
    "user copy, mapped reads off;TAPDISK_MAPPED_READS=off;"
    "user copy, mapped reads off, -D;TAPDISK_MAPPED_READS=off;-D"
    "plain copy (reads land in the tag buffer);TAPDISK_UBLK_USER_COPY=off;"
    "plain copy, -D;TAPDISK_UBLK_USER_COPY=off;-D"
    "plain copy, 1 queue;TAPDISK_UBLK_USER_COPY=off TAPDISK_UBLK_QUEUES=1;"
    "user copy, spawn bridge;TAPDISK_UBLK_BRIDGE=spawn;"
)
results=()
for variant in "${variants[@]}"; do
    IFS=';' read -r name environment flags <<<"$variant"
    # shellcheck disable=SC2086 # word splitting of the variables is wanted
    dev=$(env $environment tap-ctl create -b ublk $flags -a "aio:$img" 2>>"$LOG")
    result=$(iops "$dev")
    minor=$(minor_of_device "$dev")
    tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor" >> "$LOG" 2>&1
    check "ublk $name ($dev): $result IOPS" test -n "$result"
    results+=("${result:-0}")
done

ratio() { python3 -c "import sys; print('%.2f' % (int(sys.argv[1]) / max(1, int(sys.argv[2]))))" "$1" "$2"; }
echo
echo "fio randread 4k QD32, ${seconds}s, ${mib} MiB raw file on tmpfs, $(nproc) vCPUs (emulated CPU: compare ratios only)"
printf '%-44s %10s %8s\n' device IOPS vs-loop
printf '%-44s %10s %8s\n' "loop (direct-io=$loop_dio)" "$loop_iops" 1.00
for i in "${!variants[@]}"; do
    printf '%-44s %10s %8s\n' "ublk ${variants[$i]%%;*}" "${results[$i]}" \
        "$(ratio "${results[$i]}" "${loop_iops:-1}")"
done
echo
finish
