#!/usr/bin/env bash
# Benchmark of changed-block tracking (not a test; numbers depend on the machine): what the
# CBT log costs writes. Goal: 4k random writes at QD32 at most 5% slower with a log than
# without.
#
# In one run, on the same raw image (random data, held in the page cache), fio's nbd engine
# runs 4k random writes at queue depth QD against tapdisk's export opened
#   plain   tap-ctl create -b none -D           (no log)
#   cbt     tap-ctl create -b none -D -C LOG    (a fresh log, as after a snapshot)
# alternately, ROUNDS times, and prints each round's IOPS and the ratio cbt / plain, then
# the medians. A fresh log starts empty, so the first write to each 64 KiB block writes its
# mark into the log file; fio's ramp time (RAMP seconds, not counted) covers most of those
# first writes on the default 1 GiB image (16384 blocks), so the figure is the steady state:
# a block already marked costs no system call.
#
# Environment: SIZE (default 1G), RUNTIME seconds per run (default 20), RAMP (default 2),
# ROUNDS (default 3), QD (default 32), WORK_DIR (default /tmp; /dev/shm keeps the image and
# the log in memory), ENGINE (tapdisk's io.engine: auto, io_uring, pread; default auto).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-20}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
QD=${QD:-32}
ENGINE=${ENGINE:-auto}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --bins -q
BIN=$CARGO_TARGET_DIR/release

WORK=$(mktemp -d "${WORK_DIR:-/tmp}/bench-cbt.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
export TAPDISK_CONFIG=$WORK/tapdisk.toml
printf '[io]\nengine = "%s"\n' "$ENGINE" >"$TAPDISK_CONFIG"
OURS=
cleanup() {
    if [ -n "$OURS" ]; then
        # shellcheck disable=SC2086
        set -- $OURS
        "$BIN/tap-ctl" destroy -p "$1" -m "$2" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

IMAGE=$WORK/disk.img
LOG=$WORK/disk.cbtlog
echo "# image: $SIZE raw at $IMAGE (random data, then read into the page cache)" >&2
fio --name=fill --filename="$IMAGE" --size="$SIZE" --rw=write --bs=1M --refill_buffers \
    --ioengine=psync --end_fsync=1 --output=/dev/null
cat "$IMAGE" >/dev/null
BYTES=$(stat -c %s "$IMAGE")

# run VARIANT -> prints the IOPS of one fio run against a fresh tapdisk
run() {
    local extra=()
    if [ "$1" = cbt ]; then
        "$BIN/cbt-util" create -n "$LOG" -s "$BYTES"
        extra=(-C "$LOG")
    fi
    local marker minor pid
    marker=$("$BIN/tap-ctl" create -a "aio:$IMAGE" -b none -D "${extra[@]}")
    minor=${marker##*tapdisk-}
    pid=$("$BIN/tap-ctl" list -m "$minor" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
    OURS="$pid $minor"
    # fio's nbd engine prints a line on stdout before the JSON document.
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd$pid.$minor" \
        --rw=randwrite --bs=4k --iodepth="$QD" --size="$SIZE" --time_based \
        --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json |
        sed -n '/^{/,$p' |
        python3 -c 'import json, sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["write"]["iops"])'
    "$BIN/tap-ctl" destroy -p "$pid" -m "$minor"
    OURS=
    if [ "$1" = cbt ]; then
        echo "#   log after the run: $("$BIN/cbt-util" extents -n "$LOG" | grep -c '"dirty"') dirty extents" >&2
    fi
}

RESULTS=$WORK/results
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
    plain=$(run plain)
    cbt=$(run cbt)
    echo "$round $plain $cbt" >>"$RESULTS"
    printf 'round %s  plain %8s IOPS  cbt %8s IOPS\n' "$round" "$plain" "$cbt" >&2
done

python3 - "$RESULTS" "$QD" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print()
print(f"4k random writes, QD{sys.argv[2]}")
print("| round | plain (IOPS) | cbt (IOPS) | cbt / plain |")
print("|---|---:|---:|---:|")
for r, p, c in rows:
    print(f"| {r} | {int(p)} | {int(c)} | {int(c) / int(p):.3f} |")
plain = statistics.median(int(r[1]) for r in rows)
cbt = statistics.median(int(r[2]) for r in rows)
ratio = cbt / plain
verdict = "met" if ratio >= 0.95 else "NOT met"
print(f"| median | {plain:.0f} | {cbt:.0f} | {ratio:.3f} |")
print(f"\ngoal (cbt at least 0.95 of plain): {verdict}")
EOF
