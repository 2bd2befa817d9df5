#!/usr/bin/env bash
# Runs every check and test: the static checks of scripts/lint.sh (formatting, clippy, rustdoc,
# the shell scripts' lint, MSRV, cargo-deny), unit tests, and the end-to-end tests that drive
# the real tap-ctl/tapdisk/vhd-util binaries against qemu-img, qemu-io, fio, nbdinfo.
# Run as root (the tests create loop devices and FUSE mounts). Installs what is missing.
# Last, the kernel-device tests that need ublk_drv and nbd run in a VM (scripts/vm-tests.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

echo "== static checks (scripts/lint.sh)"
./scripts/lint.sh
echo "== cargo test"
# Every target first: the C ABI test (crates/libblktapctl/tests/c_abi.rs) needs the cdylib,
# which `cargo test` alone does not always build.
cargo build --workspace
cargo test --workspace 2>&1 | tee /tmp/blktap-cargo-test.log
echo "== fuzz smoke run"
./scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
echo "== VM tests (ublk, recovery, kernel NBD client)"
./scripts/vm-tests.sh
