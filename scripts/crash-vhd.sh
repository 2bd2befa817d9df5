#!/usr/bin/env bash
# Long run of the vhd crash test (crates/tapdisk/tests/vhd_crash.rs): tapdisk is killed with
# SIGKILL while a client streams random writes, discards and flushes over NBD; after every
# kill `vhd-util check` must pass and every write acknowledged before a completed flush must
# read back. CI runs 50 iterations; this script runs more, once per I/O engine.
#
# Usage: scripts/crash-vhd.sh [ITERATIONS]   (default 500 per engine)
# Environment: ENGINES (default "io_uring pread"), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

ITERATIONS=${1:-500}
ENGINES=${ENGINES:-"io_uring pread"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --workspace --bins -q
for engine in $ENGINES; do
    echo "# $ITERATIONS crash iterations with the $engine engine" >&2
    TAPDISK_TEST_ENGINE=$engine VHD_CRASH_ITERATIONS=$ITERATIONS \
        cargo test -q -p tapdisk --test vhd_crash -- --nocapture
done
echo "# all crash iterations passed" >&2
