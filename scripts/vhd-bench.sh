#!/usr/bin/env bash
# Benchmark: `vhd-util coalesce` and `vhd-util copy` throughput against
# `qemu-img convert` on the same data. Not a test; prints MB/s per step.
#
# usage: scripts/vhd-bench.sh [SIZE_MB]   (default 1024; needs qemu-img)
set -euo pipefail

size_mb=${1:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-vhd-bench}
cargo build --quiet --release -p vhd-util --manifest-path "$root/Cargo.toml"
vu="$CARGO_TARGET_DIR/release/vhd-util"
command -v qemu-img >/dev/null || { echo "qemu-img not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

now() { date +%s.%N; }
rate() { # label start end bytes
    awk -v l="$1" -v s="$2" -v e="$3" -v b="$4" \
        'BEGIN { t = e - s; printf "%-34s %7.2f s  %8.1f MB/s\n", l, t, b / 1048576 / t }'
}
drop() { sync; }

# Source data: 3/4 of the disk written with incompressible bytes, 1/4 zero.
data_mb=$((size_mb * 3 / 4))
head -c $((data_mb << 20)) /dev/urandom > data.bin
truncate -s $((size_mb << 20)) data.bin
bytes=$((data_mb << 20))

qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on data.bin q.vhd

# Our tapdisk-format base image holding the same data.
"$vu" copy -n q.vhd -N base.vhd

# copy: vhd-util copy vs qemu-img convert vpc -> vpc
drop; s=$(now); "$vu" copy -n base.vhd -N copy.vhd; e=$(now)
rate "vhd-util copy" "$s" "$e" "$bytes"
drop; s=$(now); qemu-img convert -f vpc -O vpc -o subformat=dynamic,force_size=on q.vhd qcopy.vhd; e=$(now)
rate "qemu-img convert vpc->vpc" "$s" "$e" "$bytes"

# coalesce: child fully holding the data, merged into an empty parent.
"$vu" create -n parent.vhd -s "$size_mb"
"$vu" snapshot -n child.vhd -p parent.vhd -e
cp base.vhd src.vhd
"$vu" modify -n child.vhd -p src.vhd
"$vu" fill -n child.vhd            # copy-up: child now holds every block
"$vu" modify -n child.vhd -p parent.vhd
drop; s=$(now); "$vu" coalesce -n child.vhd >/dev/null; e=$(now)
rate "vhd-util coalesce" "$s" "$e" "$((size_mb << 20))"
drop; s=$(now); qemu-img convert -f vpc -O vpc -o subformat=dynamic,force_size=on qcopy.vhd qcopy2.vhd; e=$(now)
rate "qemu-img convert (same data)" "$s" "$e" "$bytes"
qemu-img compare -q -f raw -F vpc data.bin parent.vhd && echo "coalesced parent matches the source data"
