#!/usr/bin/env bash
# System calls per NBD request, server side only (a benchmark, not a test): tapdisk runs
# under `strace -c -f` (every thread counted; started with -D so that tap-ctl's spawn sees
# tapdisk itself), fio's nbd engine (not traced) drives 4k random requests at QD32 over one
# UNIX-socket connection on a raw image of random data, opened O_DIRECT (the default) or,
# with FLAGS=-D, buffered. As in bench-instructions.sh, each job runs twice on a fresh
# tapdisk, with BASE and with N requests, and the table shows per system call
#   (calls with N requests - calls with BASE requests) / (N - BASE)
# so start-up and shutdown cancel out. strace slows every system call, which changes how
# many requests arrive together: compare before and after under the same conditions.
#
# Environment: N (default 20000), BASE (default 2000), SIZE (default 256M), JOBS (subset of
# "randread randwrite"), FLAGS (tap-ctl create flags, e.g. -D), BIN_DIR (take tapdisk and
# tap-ctl from there instead of building them, e.g. a copy of an earlier build).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
BASE=${BASE:-2000}
SIZE=${SIZE:-256M}
JOBS=${JOBS:-"randread randwrite"}
read -r -a FLAGS <<<"${FLAGS:-}"
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
counted_requests "$N" "$BASE"
bench_binaries

# O_DIRECT needs a filesystem on storage: /var/tmp, not a tmpfs /tmp.
WORK=$(mktemp -d "${WORK_DIR:-/var/tmp}/bench-syscalls.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
OURS=
cleanup() {
    [ -n "$OURS" ] && destroy_vbd "$OURS" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

IMAGE=$WORK/disk.img
fio --name=fill --filename="$IMAGE" --size="$SIZE" --rw=write --bs=1M --refill_buffers \
    --ioengine=psync --end_fsync=1 --output=/dev/null
cat >"$WORK/tapdisk-under-strace" <<W
#!/bin/sh
exec strace -D -c -f -o $WORK/strace.\$\$ $BIN/tapdisk "\$@"
W
chmod +x "$WORK/tapdisk-under-strace"

# measure JOB COUNT -> strace's summary for one tapdisk serving COUNT requests
measure() {
    rm -f "$WORK"/strace.*
    local pid minor
    read -r pid minor < <(BLKTAP_TAPDISK=$WORK/tapdisk-under-strace \
        create_vbd -a "aio:$IMAGE" -b none "${FLAGS[@]}")
    OURS="$pid $minor"
    # fio's nbd engine prints a line on stdout before its JSON; only the count matters.
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd$pid.$minor" \
        --rw="$1" --bs=4k --iodepth=32 --size="$SIZE" --number_ios="$2" --output=/dev/null >/dev/null
    destroy_vbd "$OURS"
    OURS=
    # strace writes its summary when the last traced thread has gone.
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    for _ in $(seq 100); do [ -s "$WORK/strace.$pid" ] && break; sleep 0.1; done
    sleep 0.5
    cat "$WORK"/strace.*
}

for job in $JOBS; do
    measure "$job" "$BASE" >"$WORK/base.txt"
    measure "$job" "$N" >"$WORK/full.txt"
    echo
    echo "4k $job QD32 ${FLAGS[*]:-O_DIRECT}, system calls per request (strace -c -f, tapdisk)"
    python3 - "$WORK/base.txt" "$WORK/full.txt" "$N" "$BASE" <<'PY'
import sys
def calls(path):
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall
    table = {}
    for line in open(path):
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            table[fields[-1]] = int(fields[3])
    return table
base, full = calls(sys.argv[1]), calls(sys.argv[2])
extra = int(sys.argv[3]) - int(sys.argv[4])
per = {name: (count - base.get(name, 0)) / extra for name, count in full.items()}
for name in sorted(per, key=lambda n: -per[n]):
    if abs(per[name]) >= 0.005:
        print(f"{name:20s} {per[name]:.3f}")
print(f"{'all':20s} {sum(per.values()):.3f}")
PY
done
