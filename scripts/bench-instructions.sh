#!/usr/bin/env bash
# Instructions per NBD request, server side only (a benchmark, not a test).
#
# Every server runs under `valgrind --tool=cachegrind`, which counts the instructions the
# server's own threads execute (Ir; the kernel's work is not counted), on a small image
# (raw, or with IMAGE_FORMAT=qcow2 the same random data converted to qcow2 with 64 KiB
# clusters, every cluster allocated; nbdkit's file plugin serves raw only):
#   ours           tapdisk's export, default O_DIRECT open (tap-ctl create -b none; `aio:`
#                  or `qcow2:`)
#   ours-buffered  the same opened without O_DIRECT (tap-ctl create -b none -D)
#   ours-mirror    ours with an active storage-migration mirror (writes only): a second
#                  tapdisk, also under cachegrind, serves an empty image of the same size on
#                  its old-style fd receiver, a connected socket pair is handed over as xapi
#                  does (scripts/bench-lib.sh's hand_over), and the source is unpaused with
#                  `-2 nbd:ID`; both tapdisks are counted: "ours-mirror" is the source (the
#                  guest's server and the NBD client of the mirror), "ours-mirror-dst" the
#                  destination (the mirror's NBD server)
#   qemu-none      qemu-nbd --cache=none --aio=io_uring (O_DIRECT)
#   qemu-wb        qemu-nbd --cache=writeback --aio=threads (page cache)
#   nbdkit         nbdkit's file plugin (page cache)
# fio's nbd engine (not under valgrind) drives a fixed number of 4k random requests at QD32
# over one UNIX-socket connection. Each server and job runs twice, with BASE and with N
# requests, each time on a freshly started server; the table shows
#   (Ir with N requests - Ir with BASE requests) / (N - BASE)
# so start-up, handshake and shutdown cancel out. Instruction counts do not depend on the
# host's load (wall time under valgrind does, and means nothing here).
#
# io_uring under valgrind: valgrind 3.19 knows io_uring_setup/enter/register; tapdisk's
# engine in use is printed (from `tap-ctl stats`) so a fallback would show; it is io_uring.
#
# Counts are stable to about 2% for reads and for page-cache writes. O_DIRECT writes vary
# more between runs (up to about 20% for ours): how many completions the device returns
# together decides how many wake-ups the server's event loop makes. So every server and job
# runs ROUNDS times (default 3) and the table shows the median.
#
# Environment: N (default 20000), BASE (default 2000), SIZE (default 256M), SERVERS (subset
# of "ours ours-buffered ours-mirror qemu-none qemu-wb nbdkit"), JOBS (subset of "randread
# randwrite"), QD (default 32), ROUNDS (default 3), IMAGE_FORMAT (raw, the default, or
# qcow2; results are labelled SERVER-qcow2), QCOW2_IMAGE (with qcow2: filled, the default, or
# fresh: an empty image made anew before every server starts, so reads find holes and writes
# allocate; labelled SERVER-qcow2-fresh), BIN_DIR (take tapdisk and tap-ctl from
# there instead of building them: a copy of an earlier build, for before/after counts),
# KEEP=1 keeps the cachegrind files (for cg_annotate) in KEEP_DIR (default ./cachegrind),
# named SERVER-JOB-COUNT-roundR.out (the mirror's destination: ours-mirror-dst-...).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
BASE=${BASE:-2000}
SIZE=${SIZE:-256M}
SERVERS=${SERVERS:-"ours ours-buffered ours-mirror qemu-none qemu-wb nbdkit"}
JOBS=${JOBS:-"randread randwrite"}
QD=${QD:-32}
ROUNDS=${ROUNDS:-3}
KEEP=${KEEP:-0}
KEEP_DIR=${KEEP_DIR:-$PWD/cachegrind}
IMAGE_FORMAT=${IMAGE_FORMAT:-raw}
QCOW2_IMAGE=${QCOW2_IMAGE:-filled}

case $IMAGE_FORMAT in
raw) DRIVER=aio LABEL= ;;
qcow2) DRIVER=qcow2 LABEL=-qcow2 ;;
*)
    echo "IMAGE_FORMAT must be raw or qcow2, not '$IMAGE_FORMAT'" >&2
    exit 1
    ;;
esac
case $QCOW2_IMAGE in
filled) ;;
fresh) LABEL=$LABEL-fresh ;;
*)
    echo "QCOW2_IMAGE must be filled or fresh, not '$QCOW2_IMAGE'" >&2
    exit 1
    ;;
esac
if [ "$QCOW2_IMAGE" = fresh ] && [ "$IMAGE_FORMAT" != qcow2 ]; then
    echo "QCOW2_IMAGE=fresh needs IMAGE_FORMAT=qcow2" >&2
    exit 1
fi
if [ "$IMAGE_FORMAT" = qcow2 ] && [[ " $SERVERS " == *" nbdkit "* || " $SERVERS " == *" ours-mirror "* ]]; then
    echo "with IMAGE_FORMAT=qcow2, leave nbdkit (raw only) and ours-mirror out of SERVERS" >&2
    exit 1
fi

# shellcheck source=scripts/bench-lib.sh
source scripts/bench-lib.sh
counted_requests "$N" "$BASE"
bench_binaries

# O_DIRECT needs a filesystem on storage: /var/tmp, not a tmpfs /tmp.
WORK=$(mktemp -d "${WORK_DIR:-/var/tmp}/bench-instructions.XXXXXX")
export BLKTAP_CONTROL_DIR=$WORK/ctl
SERVER_PID=
OURS=
MIRROR_DST=
cleanup() {
    stop_server || true
    rm -rf "$WORK"
}
trap cleanup EXIT

IMAGE=$WORK/disk.img
if [ "$QCOW2_IMAGE" = fresh ]; then
    echo "# image: $SIZE qcow2 at $IMAGE, made empty for every server" >&2
else
    echo "# image: $SIZE $IMAGE_FORMAT at $IMAGE (random data)" >&2
    fio --name=fill --filename="$IMAGE" --size="$SIZE" --rw=write --bs=1M --refill_buffers \
        --ioengine=psync --end_fsync=1 --output=/dev/null
fi
if [ "$IMAGE_FORMAT" = qcow2 ] && [ "$QCOW2_IMAGE" = filled ]; then
    qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$IMAGE" "$IMAGE.qcow2"
    mv "$IMAGE.qcow2" "$IMAGE"
    sync "$IMAGE"
fi
if [[ " $SERVERS " == *" ours-mirror "* ]]; then
    # Written in full, so the mirror overwrites allocated blocks as the source does.
    fio --name=fill --filename="$WORK/mirror.img" --size="$SIZE" --rw=write --bs=1M \
        --zero_buffers --ioengine=psync --end_fsync=1 --output=/dev/null
fi

VALGRIND=(valgrind --tool=cachegrind --cache-sim=no --branch-sim=no)
# tap-ctl starts tapdisk through this wrapper; valgrind's own messages go to a log file,
# since tap-ctl reads the daemon's handshake from its output.
cat >"$WORK/tapdisk-under-cachegrind" <<EOF
#!/bin/sh
exec ${VALGRIND[*]} --log-file=$WORK/valgrind.%p.log --cachegrind-out-file=$WORK/cg.%p $BIN/tapdisk "\$@"
EOF
chmod +x "$WORK/tapdisk-under-cachegrind"

SOCK=
CG_FILE=
CG_DST_FILE=
start_server() {
    rm -f "$WORK"/cg.*
    if [ "$QCOW2_IMAGE" = fresh ]; then
        rm -f "$IMAGE"
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMAGE" "$SIZE"
    fi
    CG_DST_FILE=
    case $1 in
    ours | ours-buffered | ours-mirror)
        local direct=()
        [ "$1" = ours-buffered ] && direct=(-D)
        local pid minor
        read -r pid minor < <(BLKTAP_TAPDISK=$WORK/tapdisk-under-cachegrind \
            create_vbd -a "$DRIVER:$IMAGE" -b none "${direct[@]}")
        SOCK=$BLKTAP_CONTROL_DIR/nbd$pid.$minor
        OURS="$pid $minor"
        SERVER_PID=$pid
        CG_FILE=$WORK/cg.$pid
        if [ "$1" = ours-mirror ]; then
            local dst_pid dst_minor
            read -r dst_pid dst_minor < <(BLKTAP_TAPDISK=$WORK/tapdisk-under-cachegrind \
                create_vbd -a "aio:$WORK/mirror.img" -b none)
            MIRROR_DST="$dst_pid $dst_minor"
            CG_DST_FILE=$WORK/cg.$dst_pid
            hand_over "$BLKTAP_CONTROL_DIR/nbdserver$dst_pid.$dst_minor" \
                "$BLKTAP_CONTROL_DIR/nbdclient$pid" bench
            "$BIN/tap-ctl" pause -p "$pid" -m "$minor"
            "$BIN/tap-ctl" unpause -p "$pid" -m "$minor" -2 nbd:bench
        fi
        # The engine tapdisk chose under valgrind (io_uring, or a fallback to pread).
        echo "# $1: tapdisk $("$BIN/tap-ctl" stats -p "$pid" -m "$minor" |
            grep -o '"engine": *"[^"]*"' | head -1 || true)" >&2
        ;;
    qemu-none | qemu-wb)
        local opts=(--cache=none --aio=io_uring)
        [ "$1" = qemu-wb ] && opts=(--cache=writeback --aio=threads)
        SOCK=$WORK/qemu.sock
        "${VALGRIND[@]}" --log-file="$WORK/valgrind.qemu.log" \
            --cachegrind-out-file="$WORK/cg.qemu" \
            qemu-nbd -t -f "$IMAGE_FORMAT" "${opts[@]}" -k "$SOCK" "$IMAGE" &
        SERVER_PID=$!
        CG_FILE=$WORK/cg.qemu
        ;;
    nbdkit)
        SOCK=$WORK/nbdkit.sock
        "${VALGRIND[@]}" --log-file="$WORK/valgrind.nbdkit.log" \
            --cachegrind-out-file="$WORK/cg.nbdkit" \
            nbdkit -f -U "$SOCK" file "file=$IMAGE" &
        SERVER_PID=$!
        CG_FILE=$WORK/cg.nbdkit
        ;;
    esac
    for _ in $(seq 600); do [ -S "$SOCK" ] && return 0; sleep 0.1; done
    echo "server $1 did not come up" >&2
    return 1
}

# Stops the server and waits until valgrind has written its counts.
stop_server() {
    if [ -n "$OURS" ]; then
        if [ -n "$MIRROR_DST" ]; then
            local failed
            failed=$("$BIN/tap-ctl" stats -p "${OURS% *}" -m "${OURS#* }" |
                python3 -c 'import json, sys; print(json.load(sys.stdin)["nbd_mirror_failed"])')
            [ "$failed" = 0 ] || echo "the mirror failed (nbd_mirror_failed=$failed)" >&2
        fi
        destroy_vbd "$OURS" || true
        OURS=
        if [ -n "$MIRROR_DST" ]; then
            local dst_pid=${MIRROR_DST% *}
            destroy_vbd "$MIRROR_DST" || true
            MIRROR_DST=
            for _ in $(seq 600); do kill -0 "$dst_pid" 2>/dev/null || break; sleep 0.1; done
        fi
    elif [ -n "$SERVER_PID" ]; then
        # fio connects twice (size probe, then the job): qemu-nbd runs with -t and both
        # peers are stopped by SIGTERM, on which they exit cleanly.
        kill "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ]; then
        for _ in $(seq 600); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    rm -f "$WORK"/*.sock
}

# cg_total FILE -> the total Ir a cachegrind file counts
cg_total() {
    sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$1"
}

# measure SERVER JOB COUNT -> prints the server's total Ir (for ours-mirror: the source's,
# then the destination's)
measure() {
    start_server "$1"
    # fio's nbd engine prints a line on stdout before its JSON; only the count matters here.
    fio --name="$2" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$2" --bs=4k \
        --iodepth="$QD" --size="$SIZE" --number_ios="$3" --output=/dev/null
    stop_server
    if [ "$KEEP" = 1 ]; then
        mkdir -p "$KEEP_DIR"
        cp "$CG_FILE" "$KEEP_DIR/$1$LABEL-$2-$3-round$round.out"
        if [ -n "$CG_DST_FILE" ]; then
            cp "$CG_DST_FILE" "$KEEP_DIR/$1-dst-$2-$3-round$round.out"
        fi
    fi
    echo "$(cg_total "$CG_FILE") ${CG_DST_FILE:+$(cg_total "$CG_DST_FILE")}"
}

RESULTS=$WORK/results
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
for server in $SERVERS; do
    for job in $JOBS; do
        # Reads never reach the mirror.
        [ "$server" = ours-mirror ] && [ "$job" != randwrite ] && continue
        read -r base base_dst < <(measure "$server" "$job" "$BASE")
        read -r full full_dst < <(measure "$server" "$job" "$N")
        names=("$server")
        [ -n "$base_dst" ] && names+=("$server-dst")
        bases=("$base" "$base_dst")
        fulls=("$full" "$full_dst")
        for i in "${!names[@]}"; do
            per=$(((fulls[i] - bases[i]) / (N - BASE)))
            echo "${names[i]}$LABEL $job $per" >>"$RESULTS"
            printf 'round %s  %-16s %-10s %8s instructions/request  (Ir %s with %s, %s with %s)\n' \
                "$round" "${names[i]}$LABEL" "$job" "$per" "${bases[i]}" "$BASE" "${fulls[i]}" "$N" >&2
        done
    done
done
done

python3 - "$RESULTS" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
runs = {}
for s, j, v in rows:
    runs.setdefault((s, j), []).append(int(v))
# The median round (the lower middle one with an even count).
data = {key: sorted(v)[(len(v) - 1) // 2] for key, v in runs.items()}
servers = list(dict.fromkeys(r[0] for r in rows))
jobs = list(dict.fromkeys(r[1] for r in rows))
print()
print("| 4k QD32, instructions per request | " + " | ".join(servers) + " |")
print("|---|" + "---|" * len(servers))
for job in jobs:
    cells = [f"{data[(s, job)]:,}" if (s, job) in data else "-" for s in servers]
    print(f"| {job} | " + " | ".join(cells) + " |")
EOF
