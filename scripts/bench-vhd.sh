#!/usr/bin/env bash
# Benchmark of the vhd driver against qemu-nbd -f vpc on the same dynamic VHD files (not a
# test; numbers depend on the machine and on what else runs on it).
#
# Jobs, each 4k with fio's nbd engine at queue depth 32:
#   randread        random reads of a fully allocated dynamic VHD (every block written once
#                   sequentially beforehand, so the batmap marks them full)
#   randwrite       random writes into that allocated VHD (data + no metadata)
#   randwrite-alloc random writes into an empty 64 GiB dynamic VHD: most writes allocate a
#                   block (footer, bitmap, BAT updates); every server gets its own fresh file
# Servers:
#   ours            tapdisk via tap-ctl create -a vhd:... -b none -D (buffered, like qemu below)
#   ours-direct     the same with O_DIRECT (tapdisk's default)
#   qemu            qemu-nbd -f vpc --cache=writeback (its default)
#   qemu-direct     qemu-nbd -f vpc --cache=none --aio=native
# and a table of IOPS with the ratios ours/qemu and ours-direct/qemu-direct.
#
# Environment: SIZE_MB of the allocated image (default 1024), RUNTIME seconds per job
# (default 10), SERVERS and JOBS (subsets of the lists above).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MB=${SIZE_MB:-1024}
RUNTIME=${RUNTIME:-10}
SERVERS=${SERVERS:-"ours ours-direct qemu qemu-direct"}
JOBS=${JOBS:-"randread randwrite randwrite-alloc"}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --bins -q
BIN=$CARGO_TARGET_DIR/release
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

WORK=$(mktemp -d /tmp/bench-vhd.XXXXXX)
export BLKTAP_CONTROL_DIR=$WORK/ctl
export BLKTAP_TAPDISK=$BIN/tapdisk
QEMU_PID=
OURS=
SOCK=
cleanup() {
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

start_server() { # SERVER FILE
    case $1 in
    ours | ours-direct)
        local flags=(-b none)
        [ "$1" = ours ] && flags+=(-D)
        OURS=$(create_vbd -a "vhd:$2" "${flags[@]}")
        SOCK=$BLKTAP_CONTROL_DIR/nbd${OURS% *}.${OURS#* }
        ;;
    qemu | qemu-direct)
        local cache=(--cache=writeback)
        [ "$1" = qemu-direct ] && cache=(--cache=none --aio=native)
        SOCK=$WORK/qemu.sock
        qemu-nbd -f vpc "${cache[@]}" -t -e 16 -k "$SOCK" "$2" &
        QEMU_PID=$!
        ;;
    esac
    for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
    echo "server $1 did not come up" >&2
    return 1
}

stop_server() {
    if [ -n "$OURS" ]; then
        destroy_vbd "$OURS" || true
        OURS=
    fi
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
        QEMU_PID=
    fi
    rm -f "$WORK/qemu.sock"
}

# fio_iops JOBNAME FIO-ARGS... -> prints IOPS
fio_iops() {
    local name=$1
    shift
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --bs=4k --iodepth=32 \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json "$@" |
        sed -n '/^{/,$p' |
        python3 -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print("%.0f" % side["iops"])'
}

FULL=$WORK/full.vhd
echo "# preparing a fully allocated ${SIZE_MB} MiB dynamic VHD" >&2
"$BIN/vhd-util" create -n "$FULL" -s "$SIZE_MB"
start_server ours-direct "$FULL"
fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=write --bs=1M \
    --iodepth=8 --refill_buffers --output=/dev/null
stop_server
"$BIN/vhd-util" check -n "$FULL" >&2

RESULTS=$WORK/results
: >"$RESULTS"
for server in $SERVERS; do
    for job in $JOBS; do
        case $job in
        randread | randwrite)
            cat "$FULL" >/dev/null # same page-cache state for everyone
            file=$FULL
            ;;
        randwrite-alloc)
            file=$WORK/empty-$server.vhd
            "$BIN/vhd-util" create -n "$file" -s 65536
            ;;
        esac
        sync # the previous server's writes reach the disk before this one is measured
        start_server "$server" "$file"
        case $job in
        randread) iops=$(fio_iops "$job" --rw=randread) ;;
        randwrite) iops=$(fio_iops "$job" --rw=randwrite) ;;
        randwrite-alloc) iops=$(fio_iops "$job" --rw=randwrite) ;;
        esac
        stop_server
        [ "$job" = randwrite-alloc ] && rm -f "$file"
        echo "$server $job $iops" >>"$RESULTS"
        printf '%-12s %-16s %10s IOPS\n' "$server" "$job" "$iops" >&2
    done
done

python3 - "$RESULTS" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
iops = {(s, j): float(v) for s, j, v in rows}
servers = list(dict.fromkeys(r[0] for r in rows))
jobs = list(dict.fromkeys(r[1] for r in rows))
pairs = [("ours", "qemu"), ("ours-direct", "qemu-direct")]
pairs = [p for p in pairs if p[0] in servers and p[1] in servers]
print()
print("| job (4k, QD32) | " + " | ".join(servers) + " | " +
      " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
print("|---|" + "---|" * (len(servers) + len(pairs)))
for job in jobs:
    cells = [f"{iops[(s, job)] / 1000:.1f}k" if (s, job) in iops else "-" for s in servers]
    ratios = []
    for a, b in pairs:
        if (a, job) in iops and (b, job) in iops and iops[(b, job)] > 0:
            ratios.append(f"{iops[(a, job)] / iops[(b, job)]:.2f}x")
        else:
            ratios.append("-")
    print(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
EOF
