#!/usr/bin/env bash
# The fast, unprivileged test tier: every unit test (libraries and binaries) and the
# integration tests that need neither root nor a test peer nor a VM (protocol fixtures and
# properties, the VHD model and corruption tests, the NBD server over in-process sockets,
# the control library against fake tapdisks, the tap-ctl, vhd-util and cbt-util command
# lines). Run it as any user while developing; scripts/test.sh (root, peers, VM) runs all of
# this and more.
#
# A new integration test that needs nothing but the built tree belongs in the list below.
set -euo pipefail
cd "$(dirname "$0")/.."

pure_tests=(
    properties wire_fixtures                        # tapdisk-proto
    chain_model crash_and_corruption planner_model  # vhd
    raw_protocol extended_headers                   # nbd
    ipc list_create                                 # blktapctl
    binary                                          # tap-ctl
    cli                                             # vhd-util, cbt-util
)
args=(--workspace --lib --bins)
for name in "${pure_tests[@]}"; do
    args+=(--test "$name")
done
cargo test "${args[@]}" "$@"
