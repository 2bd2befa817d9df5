#!/usr/bin/env bash
# Benchmark of NBD servers on one raw image (not a test; numbers depend on the machine).
#
# In one run, fio's nbd engine runs
#   4k random read QD32, 4k random write QD32, 1M sequential read QD8
# against two like-for-like groups of servers.
# Page cache (one raw file, read into the page cache first):
#   ours      tapdisk's export (tap-ctl create -b none -D: buffered I/O, like the peers below;
#             ENGINE picks the engine, default auto = io_uring when available)
#   ours-nogather  the same with `tuning.nbd_gather = false` in tapdisk's configuration
#             (each reply sent when ready; not in the default SERVERS: for measuring what
#             gathering replies does)
#   qemu-threads, qemu-uring  qemu-nbd --aio=threads / --aio=io_uring, --cache=writeback
#   nbdkit    file plugin (page cache; cache=default)
# O_DIRECT (a second copy of the image, so neither group warms the other's cache):
#   ours-direct         tapdisk's export with its default O_DIRECT (tap-ctl create -b none)
#   qemu-direct-uring   qemu-nbd --cache=none --aio=io_uring
#   qemu-direct-native  qemu-nbd --cache=none --aio=native
# and prints a table of IOPS and bandwidth with two ratios: ours against the fastest
# page-cache peer, ours-direct against the fastest O_DIRECT peer. In parentheses the CPU fio
# itself used (usr + sys, % of one CPU): near 100% the client, not the server, is the limit.
#
# Environment: SIZE (default 1G), RUNTIME seconds per job (default 10), SERVERS (subset of
# "ours ours-nogather qemu-threads qemu-uring nbdkit ours-direct qemu-direct-uring
# qemu-direct-native"), JOBS (subset of "randread randwrite seqread", each optionally with a
# "xN" suffix, e.g. randread-x4, for N fio jobs, each on its own connection: the scaling
# rows), QD (queue depth of the 4k jobs, default 32), ENGINE (tapdisk's io.engine: auto,
# io_uring or pread; default auto),
# ROUNDS (default 1): with more, every server runs every job once per round (rounds one
# after the other, so a burst of load elsewhere on the host hits one round of every server
# rather than all rounds of one) and the table shows the median of each.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
SERVERS=${SERVERS:-"ours qemu-threads qemu-uring nbdkit ours-direct qemu-direct-uring qemu-direct-native"}
JOBS=${JOBS:-"randread randwrite seqread"}
ROUNDS=${ROUNDS:-1}
QD=${QD:-32}
ENGINE=${ENGINE:-auto}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release --bins -q
BIN=$CARGO_TARGET_DIR/release
# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh

# WORK_DIR: where the image lives (default /tmp; /dev/shm keeps it in memory, off the
# filesystem write path every server otherwise shares).
WORK=$(mktemp -d "${WORK_DIR:-/tmp}/bench-nbd.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
SERVER_PID=
cleanup() {
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

IMAGE=$WORK/disk.img
echo "# image: $SIZE raw at $IMAGE (random data, then read into the page cache)" >&2
fio --name=fill --filename="$IMAGE" --size="$SIZE" --rw=write --bs=1M --refill_buffers \
    --ioengine=psync --end_fsync=1 --output=/dev/null
cat "$IMAGE" >/dev/null
# The O_DIRECT servers read and write their own copy.
DIRECT_IMAGE=$WORK/disk-direct.img
cp "$IMAGE" "$DIRECT_IMAGE"
sync

SOCK=
start_server() {
    sync # the previous server's writes reach the disk before this one is measured
    case $1 in
    ours | ours-nogather | ours-direct)
        gather=true
        [ "$1" = ours-nogather ] && gather=false
        printf '[io]\nengine = "%s"\n[tuning]\nnbd_gather = %s\n' "$ENGINE" "$gather" \
            > "$WORK/tapdisk.toml"
        if [ "$1" = ours-direct ]; then
            open=(-a "aio:$DIRECT_IMAGE")
        else
            open=(-a "aio:$IMAGE" -D)
        fi
        local pid minor
        read -r pid minor < <(TAPDISK_CONFIG=$WORK/tapdisk.toml create_vbd "${open[@]}" -b none)
        SOCK=$BLKTAP_CONTROL_DIR/nbd$pid.$minor
        OURS="$pid $minor"
        ;;
    qemu-threads | qemu-uring)
        aio=threads
        [ "$1" = qemu-uring ] && aio=io_uring
        SOCK=$WORK/qemu.sock
        qemu-nbd -f raw --aio=$aio --cache=writeback -t -e 16 -k "$SOCK" "$IMAGE" &
        SERVER_PID=$!
        ;;
    qemu-direct-uring | qemu-direct-native)
        aio=${1#qemu-direct-}
        [ "$aio" = uring ] && aio=io_uring
        SOCK=$WORK/qemu.sock
        qemu-nbd -f raw --aio="$aio" --cache=none -t -e 16 -k "$SOCK" "$DIRECT_IMAGE" &
        SERVER_PID=$!
        ;;
    nbdkit)
        SOCK=$WORK/nbdkit.sock
        nbdkit -f -U "$SOCK" file "file=$IMAGE" &
        SERVER_PID=$!
        ;;
    esac
    for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
    echo "server $1 did not come up" >&2
    return 1
}

stop_server() {
    if [ -n "${OURS:-}" ]; then
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

# run_job JOB[-xN] -> prints "iops bw_MiBps fio_cpu" (N jobs: their sum, CPU of all)
run_job() {
    local numjobs=1
    case $1 in *-x*) numjobs=${1##*-x} ;; esac
    case ${1%-x*} in
    randread) args="--rw=randread --bs=4k --iodepth=$QD" ;;
    randwrite) args="--rw=randwrite --bs=4k --iodepth=$QD" ;;
    seqread) args="--rw=read --bs=1M --iodepth=8" ;;
    esac
    # fio's nbd engine prints a line on stdout before the JSON document.
    # shellcheck disable=SC2086
    fio --name="$1" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" $args \
        --numjobs="$numjobs" --group_reporting --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --output-format=json | sed -n '/^{/,$p' |
        python3 -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print("%.0f %.1f %.0f" % (side["iops"], side["bw_bytes"] / 2**20, job["usr_cpu"] + job["sys_cpu"]))'
}

RESULTS=$WORK/results
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
    for server in $SERVERS; do
        start_server "$server"
        for job in $JOBS; do
            read -r iops bw fio_cpu < <(run_job "$job")
            echo "$server $job $iops $bw $fio_cpu" >>"$RESULTS"
            printf 'round %s  %-13s %-10s %10s IOPS %9s MiB/s   fio CPU %3s%%\n' "$round" \
                "$server" "$job" "$iops" "$bw" "$fio_cpu" >&2
        done
        stop_server
    done
done

python3 - "$RESULTS" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
runs = {}
for s, j, i, b, c in rows:
    runs.setdefault((s, j), []).append((float(i), float(b), int(c)))
# The median round of each server and job (by IOPS; bandwidth and fio CPU of that round).
data, fio_cpu = {}, {}
for key, results in runs.items():
    middle = sorted(results)[(len(results) - 1) // 2]
    data[key] = middle[:2]
    fio_cpu[key] = middle[2]
servers = list(dict.fromkeys(r[0] for r in rows))
jobs = list(dict.fromkeys(r[1] for r in rows))
# Like for like: ours against the page-cache peers, ours-direct against the O_DIRECT peers.
# With no peer of a group in the run, ours is compared with its own variants.
direct_peers = [s for s in servers if s.startswith("qemu-direct")]
cache_peers = [s for s in servers if not s.startswith("ours") and s not in direct_peers]
groups = []
if "ours" in servers:
    peers = cache_peers or [s for s in servers if s.startswith("ours-") and s != "ours-direct"]
    groups.append(("ours", peers, "fastest page-cache peer" if cache_peers else " / ".join(peers) or "-"))
if "ours-direct" in servers:
    groups.append(("ours-direct", direct_peers, "fastest O_DIRECT peer"))
print()
print("| job | " + " | ".join(servers) + "".join(f" | {o} / {a}" for o, _, a in groups) + " |")
print("|---|" + "---|" * (len(servers) + len(groups)))
for job in jobs:
    unit = 1 if job.startswith("seqread") else 0
    cells = []
    for s in servers:
        v = data.get((s, job))
        cells.append("-" if v is None else (f"{v[1]:.0f} MiB/s" if unit else f"{v[0]/1000:.1f}k IOPS")
                     + f" ({fio_cpu[(s, job)]}%)")
    for ours, peers, _ in groups:
        present = [data[(p, job)][unit] for p in peers if (p, job) in data]
        ratio = "-"
        if (ours, job) in data and present:
            ratio = f"{data[(ours, job)][unit] / max(present):.2f}x"
        cells.append(ratio)
    print(f"| {job} | " + " | ".join(cells) + " |")
EOF
