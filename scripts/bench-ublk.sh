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
# (user copy with mapped reads off, `tuning.mapped_reads = false` in tapdisk's configuration,
# with and without O_DIRECT on the image (-D)), or the driver copying out of the tag's buffer
# (plain copy, `tap-ctl create -o ublk.user_copy=off`).
#
# Then the production case: the image on storage. The guest has no disk of its own; its
# shared folder is a 9p mount of a directory on the host's disk, so a file there is an image
# on storage reached through the guest's kernel (mapped reads never apply: not tmpfs). Loop
# with direct I/O against tapdisk's default (O_DIRECT on the image, user copy), 4k random
# reads and 4k random writes at QD32, every round running loop first.
#
# On the host: scripts/bench-ublk.sh   (builds tap-ctl and tapdisk in release mode first)
# In the guest (run by scripts/vm-tests.sh): bench-ublk.sh REPO NAME
# Knobs: BENCH_SECONDS per run (default 20), BENCH_MIB image size (default 256),
# BENCH_ROUNDS (default 3: every round runs loop and then every variant, and the table shows
# each one's median; the emulated CPU shares a busy host, so single runs move by +-10%).
# They are read in the guest, so set them by editing this file (the guest gets no host
# environment).
if [ -z "${1:-}" ]; then
    cd "$(dirname "$0")/.." || exit 2
    cargo build --release --quiet -p tapdisk -p tap-ctl --bins || exit 2
    VM_TIMEOUT=${VM_TIMEOUT:-1800} BLKTAP_PROFILE=release exec scripts/vm-tests.sh bench-ublk
fi
. "$1/tests/vm/lib.sh"
seconds=${BENCH_SECONDS:-20}
mib=${BENCH_MIB:-256}
img=$(make_raw bench.img "$mib")
dd if=/dev/urandom of="$img" bs=1M count="$mib" conv=notrunc 2>/dev/null

# iops DEVICE [RW]: fio 4k RW (default randread) QD32 on DEVICE, prints the IOPS.
iops() {
    local rw=${2:-randread}
    fio --name=bench --filename="$1" --direct=1 --ioengine=libaio --iodepth=32 --rw="$rw" \
        --bs=4k --time_based --runtime="$seconds" --ramp_time=2 --size="${mib}M" \
        --output-format=json --output="$SCRATCH/fio.json" >> "$LOG" 2>&1 || return 1
    python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(int(job["read"]["iops"] + job["write"]["iops"]))' "$SCRATCH/fio.json"
}

rounds=${BENCH_ROUNDS:-3}
# Variants: "name;[tuning] line of tapdisk's configuration;tap-ctl create flags". The first
# is the default configuration.
variants=(
    "default (user copy, mapped reads);;"
    "user copy, mapped reads, affinity other;ublk_affinity = \"other\";"
    "user copy, mapped reads off;mapped_reads = false;"
    "user copy, mapped reads off, -D;mapped_reads = false;-D"
    "plain copy (reads land in the tag buffer);;-o ublk.user_copy=off"
    "user copy, spawn bridge;ublk_bridge = \"spawn\";"
)
site="$SCRATCH/tapdisk.toml"
# Results, one line per run: "round name iops" (name "loop" or the variant's index).
runs="$SCRATCH/runs"
: > "$runs"
for round in $(seq "$rounds"); do
    loop=$(losetup -f --show --direct-io=on "$img")
    loop_dio=$(cat "/sys/block/${loop#/dev/}/loop/dio" 2>/dev/null)
    result=$(iops "$loop")
    losetup -d "$loop"
    check "round $round: loop device ($loop, dio=$loop_dio): $result IOPS" test -n "$result"
    echo "$round loop ${result:-0}" >> "$runs"
    for i in "${!variants[@]}"; do
        IFS=';' read -r name tuning flags <<<"${variants[$i]}"
        printf '[tuning]\n%s\n' "$tuning" > "$site"
        # shellcheck disable=SC2086 # word splitting of the flags is wanted
        dev=$(TAPDISK_CONFIG="$site" tap-ctl create -b ublk $flags -a "aio:$img" 2>>"$LOG")
        result=$(iops "$dev")
        minor=$(minor_of_device "$dev")
        tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor" >> "$LOG" 2>&1
        check "round $round: ublk $name ($dev): $result IOPS" test -n "$result"
        echo "$round $i ${result:-0}" >> "$runs"
    done
done

# The image on storage (the shared folder, 9p onto the host's disk): loop (direct I/O) and
# tapdisk's default, random reads and random writes.
disk_img="$SHARE/bench-disk.img"
dd if=/dev/urandom of="$disk_img" bs=1M count="$mib" 2>/dev/null
disk_runs="$SCRATCH/disk-runs"
: > "$disk_runs"
for round in $(seq "$rounds"); do
    for rw in randread randwrite; do
        loop=$(losetup -f --show --direct-io=on "$disk_img")
        disk_dio=$(cat "/sys/block/${loop#/dev/}/loop/dio" 2>/dev/null)
        result=$(iops "$loop" "$rw")
        losetup -d "$loop"
        check "round $round: storage, loop (dio=$disk_dio) $rw: $result IOPS" test -n "$result"
        echo "$round loop-$rw ${result:-0}" >> "$disk_runs"
        : > "$site"
        dev=$(TAPDISK_CONFIG="$site" tap-ctl create -b ublk -a "aio:$disk_img" 2>>"$LOG")
        result=$(iops "$dev" "$rw")
        minor=$(minor_of_device "$dev")
        tap-ctl destroy -p "$(pid_of_minor "$minor")" -m "$minor" >> "$LOG" 2>&1
        check "round $round: storage, ublk default $rw: $result IOPS" test -n "$result"
        echo "$round ublk-$rw ${result:-0}" >> "$disk_runs"
    done
done
rm -f "$disk_img"

# table RUNS NAME...: medians per device, against loop, and each round against its loop.
table() {
    python3 - "$@" <<'PY'
import statistics, sys
runs = [line.split() for line in open(sys.argv[1])]
names = sys.argv[2:]
keys = list(dict.fromkeys(r[1] for r in runs))
print("%-50s %10s %8s   %s" % ("device", "IOPS", "vs-loop", "each round vs its loop"))
for key, name in zip(keys, names):
    values = [int(r[2]) for r in runs if r[1] == key]
    median = statistics.median(values)
    loop_key = "loop" + key[key.index("-"):] if "-" in key else "loop"
    loop_rounds = {r[0]: int(r[2]) or 1 for r in runs if r[1] == loop_key}
    loop = statistics.median(loop_rounds.values()) or 1
    paired = [int(r[2]) / loop_rounds[r[0]] for r in runs if r[1] == key]
    print("%-50s %10d %8.2f   %s" % (name, median, median / loop, " ".join("%.2f" % p for p in paired)))
PY
}

echo
echo "fio randread 4k QD32, ${seconds}s per run, ${mib} MiB raw file on tmpfs, $(nproc) vCPUs," \
    "median of $rounds rounds (emulated CPU: compare ratios only)"
names=("loop (direct-io=$loop_dio)")
for variant in "${variants[@]}"; do names+=("ublk ${variant%%;*}"); done
table "$runs" "${names[@]}"
echo
echo "fio 4k QD32, ${seconds}s per run, ${mib} MiB raw file on storage (9p onto the host's disk)," \
    "median of $rounds rounds"
table "$disk_runs" "loop (direct-io=$disk_dio) randread" "ublk default randread" \
    "loop (direct-io=$disk_dio) randwrite" "ublk default randwrite"
echo
finish
