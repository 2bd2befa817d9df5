#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: control messages, encryption keys and keyhashes,
# NBD options and requests, what an NBD server sends a client, VHD and qcow2 metadata, CBT
# logs, the VHD core's plans, tapdisk's vhd driver, Xen blkif rings) for SECONDS each (default
# 60; scripts/test.sh uses a short smoke run).
# cargo-fuzz needs nightly-only compiler flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain,
# the only one on these machines, accept them. cargo-fuzz comes from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz: no cargo-fuzz: run scripts/setup.sh" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" 2>&1 | grep -E '^(Done|==[0-9]+==|SUMMARY)|panicked' || true
    # cargo fuzz exits non-zero when it finds a crash; re-check so the script fails too.
    if ls artifacts/"$target"/crash-* >/dev/null 2>&1; then
        echo "fuzz: $target found a crash: see fuzz/artifacts/$target" >&2
        exit 1
    fi
done
