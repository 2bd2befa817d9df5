#!/usr/bin/env bash
# Benchmark of the storage-migration mirror (not a test; numbers depend on the machine).
#
# Two tapdisks as on two hosts: the source serves the guest's disk (a raw image), the
# destination an empty one. In one run, fio's nbd engine writes 4k random blocks at queue
# depth QD to the source's NBD socket
#   plain   without a secondary
#   mirror  with every write mirrored to the destination: a connected socket pair handed
#           over as xapi does (nbdserver<pid>.<minor> on the destination, nbdclient<pid> on
#           the source), then `tap-ctl unpause -2 nbd:<id>`
# and prints IOPS and mean and 99th-percentile completion latency of each, with the
# mirror's cost as ratios. Goal: the mirror costs at most 2x on these latency-bound writes
# (the leaf's and the mirror's writes are issued together, so a mirrored write waits for the
# slower of the two, not their sum). After each mirrored run the script checks
# nbd_mirror_failed is still 0 and removes the mirror with `-2 null`.
#
# Environment: SIZE (default 1G), RUNTIME seconds per run (default 10), QD (default 32),
# ROUNDS (default 1: with more, plain and mirror alternate and the table shows medians),
# WORK_DIR (where both images live, default /tmp), OPEN_FLAGS (extra `tap-ctl create` flags
# for both disks, e.g. -D for buffered I/O; default none: O_DIRECT, as for VM disks).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
QD=${QD:-32}
ROUNDS=${ROUNDS:-1}
OPEN_FLAGS=${OPEN_FLAGS:-}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --bins -q
BIN=$CARGO_TARGET_DIR/release
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

WORK=$(mktemp -d "${WORK_DIR:-/tmp}/bench-mirror.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
export BLKTAP_TAPDISK=$BIN/tapdisk
export TAPDISK_CONFIG=$WORK/tapdisk.toml
: >"$TAPDISK_CONFIG"
VBDS=()
cleanup() {
    for vbd in "${VBDS[@]}"; do
        destroy_vbd "$vbd" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Both images are written in full first, so both sides overwrite allocated blocks: what
# is measured is the mirror, not the destination's filesystem allocating space.
echo "# images: $SIZE raw in $WORK (the source random data, the destination zeros)" >&2
fio --name=fill --filename="$WORK/src.img" --size="$SIZE" --rw=write --bs=1M \
    --refill_buffers --ioengine=psync --end_fsync=1 --output=/dev/null
fio --name=fill --filename="$WORK/dst.img" --size="$SIZE" --rw=write --bs=1M \
    --zero_buffers --ioengine=psync --end_fsync=1 --output=/dev/null

# shellcheck disable=SC2086
read -r SRC_PID SRC_MINOR < <(create_vbd -a "aio:$WORK/src.img" -b none $OPEN_FLAGS)
VBDS+=("$SRC_PID $SRC_MINOR")
# shellcheck disable=SC2086
read -r DST_PID DST_MINOR < <(create_vbd -a "aio:$WORK/dst.img" -b none $OPEN_FLAGS)
VBDS+=("$DST_PID $DST_MINOR")
SRC=(-p "$SRC_PID" -m "$SRC_MINOR")

stat_field() {
    "$BIN/tap-ctl" stats "${SRC[@]}" |
        python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"
}

# run -> prints "iops mean_us p99_us"
run() {
    # fio's nbd engine prints a line on stdout before the JSON document.
    fio --name=guest --ioengine=nbd --uri="nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd$SRC_PID.$SRC_MINOR" \
        --rw=randwrite --bs=4k --iodepth="$QD" --size="$SIZE" --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --output-format=json | sed -n '/^{/,$p' |
        python3 -c '
import json, sys
w = json.load(sys.stdin)["jobs"][0]["write"]
clat = w["clat_ns"]
print("%.0f %.0f %.0f" % (w["iops"], clat["mean"] / 1000, clat["percentile"]["99.000000"] / 1000))'
}

RESULTS=$WORK/results
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
    read -r iops mean p99 < <(run)
    echo "plain $iops $mean $p99" >>"$RESULTS"
    printf 'round %s  plain   %8s IOPS  mean %6s us  p99 %6s us\n' "$round" "$iops" "$mean" "$p99" >&2

    hand_over "$BLKTAP_CONTROL_DIR/nbdserver$DST_PID.$DST_MINOR" \
        "$BLKTAP_CONTROL_DIR/nbdclient$SRC_PID" "bench/$round"
    "$BIN/tap-ctl" pause "${SRC[@]}"
    "$BIN/tap-ctl" unpause "${SRC[@]}" -2 "nbd:bench/$round"
    read -r iops mean p99 < <(run)
    failed=$(stat_field nbd_mirror_failed)
    if [ "$failed" != 0 ]; then
        echo "the mirror failed during round $round (nbd_mirror_failed=$failed)" >&2
        exit 1
    fi
    echo "mirror $iops $mean $p99" >>"$RESULTS"
    printf 'round %s  mirror  %8s IOPS  mean %6s us  p99 %6s us\n' "$round" "$iops" "$mean" "$p99" >&2
    "$BIN/tap-ctl" pause "${SRC[@]}"
    "$BIN/tap-ctl" unpause "${SRC[@]}" -2 null
done

python3 - "$RESULTS" "$QD" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
median = {}
for mode in ("plain", "mirror"):
    runs = sorted((float(i), float(m), float(p)) for k, i, m, p in rows if k == mode)
    median[mode] = runs[(len(runs) - 1) // 2]
(pi, pm, pp), (mi, mm, mp) = median["plain"], median["mirror"]
print()
print(f"| 4k randwrite QD{sys.argv[2]} | IOPS | mean latency | p99 latency |")
print("|---|---|---|---|")
print(f"| plain | {pi/1000:.1f}k | {pm:.0f} us | {pp:.0f} us |")
print(f"| mirror | {mi/1000:.1f}k | {mm:.0f} us | {mp:.0f} us |")
print(f"| mirror cost | {pi/mi:.2f}x fewer | {mm/pm:.2f}x | {mp/pp:.2f}x |")
print()
verdict = "met" if mm / pm <= 2.0 else "NOT met"
print(f"goal (mirror at most 2x the plain mean latency): {verdict}")
EOF
