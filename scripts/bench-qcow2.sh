#!/usr/bin/env bash
# Benchmark of the qcow2 driver against qemu-nbd (not a test; numbers depend on the machine).
#
# fio's nbd engine runs 4k random reads and 4k random writes at QD32 against:
#   ours      tapdisk's export of the image (tap-ctl create -a qcow2:IMAGE -b none)
#   qemu-nbd  qemu-nbd -f qcow2 (--aio=$QEMU_AIO, default io_uring)
# on two images of SIZE (default 4G, 64 KiB clusters):
#   filled    every cluster allocated (written with random data first): the mapped path
#   fresh     just created, recreated before every server: random writes allocate clusters
#             (the allocation path), random reads find nothing allocated
# each in two cache modes:
#   cache     page cache: ours with -D (no O_DIRECT), qemu-nbd --cache=writeback
#   direct    O_DIRECT: ours by default, qemu-nbd --cache=none
# and prints a table of IOPS with ours / qemu-nbd. Goals: reads at least 1.5x, allocating
# writes (fresh randwrite) at least 2x.
#
# Environment: SIZE, RUNTIME seconds per job (default 10), MODES (subset of "cache direct"),
# IMAGES (subset of "filled fresh"), SERVERS (subset of "ours qemu-nbd"), QD (default 32),
# WORK_DIR (where the images live, default /tmp). A smoke run: SIZE=256M RUNTIME=2.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-4G}
RUNTIME=${RUNTIME:-10}
MODES=${MODES:-"cache direct"}
IMAGES=${IMAGES:-"filled fresh"}
SERVERS=${SERVERS:-"ours qemu-nbd"}
QD=${QD:-32}
QEMU_AIO=${QEMU_AIO:-io_uring}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --bins -q
BIN=$CARGO_TARGET_DIR/release
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

WORK=$(mktemp -d "${WORK_DIR:-/tmp}/bench-qcow2.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
SERVER_PID=
OURS=
cleanup() {
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

FILLED=$WORK/filled.qcow2
if [[ " $IMAGES " == *" filled "* ]]; then
    echo "# filled image: $SIZE of random data converted to qcow2 at $FILLED" >&2
    fio --name=fill --filename="$WORK/fill.raw" --size="$SIZE" --rw=write --bs=1M \
        --refill_buffers --ioengine=psync --output=/dev/null
    qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$WORK/fill.raw" "$FILLED"
    rm -f "$WORK/fill.raw"
fi

# image_for KIND -> path of the image the next server gets
image_for() {
    case $1 in
    filled) echo "$FILLED" ;;
    fresh)
        rm -f "$WORK/fresh.qcow2"
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/fresh.qcow2" "$SIZE"
        echo "$WORK/fresh.qcow2"
        ;;
    esac
}

SOCK=
start_server() { # SERVER MODE IMAGE
    sync # the previous server's writes reach the disk before this one is measured
    case $1 in
    ours)
        local flags=()
        [ "$2" = cache ] && flags=(-D)
        OURS=$(create_vbd -a "qcow2:$3" -b none "${flags[@]}")
        SOCK=$BLKTAP_CONTROL_DIR/nbd${OURS% *}.${OURS#* }
        ;;
    qemu-nbd)
        local cache=writeback
        [ "$2" = direct ] && cache=none
        SOCK=$WORK/qemu.sock
        qemu-nbd -f qcow2 --aio="$QEMU_AIO" --cache=$cache -t -e 16 -k "$SOCK" "$3" &
        SERVER_PID=$!
        ;;
    esac
    for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
    echo "server $1 did not come up" >&2
    return 1
}

stop_server() {
    if [ -n "$OURS" ]; then
        destroy_vbd "$OURS" || true
        OURS=
    fi
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    rm -f "$WORK"/*.sock
}

# run_job JOB -> prints IOPS
run_job() {
    # fio's nbd engine prints a line on stdout before the JSON document.
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$1" --bs=4k \
        --iodepth="$QD" --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --output-format=json | sed -n '/^{/,$p' |
        python3 -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print("%.0f" % side["iops"])'
}

RESULTS=$WORK/results
: >"$RESULTS"
for mode in $MODES; do
    for kind in $IMAGES; do
        for server in $SERVERS; do
            # Writes change the image: every job of a fresh image starts from a new one.
            for job in randread randwrite; do
                image=$(image_for "$kind")
                start_server "$server" "$mode" "$image"
                iops=$(run_job "$job")
                stop_server
                echo "$mode $kind $job $server $iops" >>"$RESULTS"
                printf '%-6s %-6s %-9s %-8s %10s IOPS\n' "$mode" "$kind" "$job" "$server" "$iops" >&2
            done
        done
    done
done

python3 - "$RESULTS" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
data = {(m, k, j, s): float(i) for m, k, j, s, i in rows}
keys = list(dict.fromkeys((m, k, j) for m, k, j, _, _ in rows))
print()
print("| cache | image | job | ours | qemu-nbd | ours / qemu-nbd | goal |")
print("|---|---|---|---|---|---|---|")
for m, k, j in keys:
    ours, qemu = data.get((m, k, j, "ours")), data.get((m, k, j, "qemu-nbd"))
    ratio = f"{ours / qemu:.2f}x" if ours and qemu else "-"
    goal = "1.5x" if j == "randread" else ("2x" if k == "fresh" else "-")
    cell = lambda v: "-" if v is None else f"{v / 1000:.1f}k"
    print(f"| {m} | {k} | {j} | {cell(ours)} | {cell(qemu)} | {ratio} | {goal} |")
EOF
