#!/usr/bin/env bash
# Runs every check and test: the static checks of scripts/lint.sh (formatting, clippy, rustdoc,
# the shell scripts' lint, MSRV, cargo-deny), unit tests, and the end-to-end tests that drive
# the real tap-ctl/tapdisk/vhd-util binaries against qemu-img, qemu-io, fio, nbdinfo.
# Run as root (the tests create loop devices and FUSE mounts). Installs what is missing.
# Then the Debian package is built (scripts/package.sh: release build, cargo-deb, lintian) and
# installed into a fresh root, used and purged (tests/package/install.sh).
# Last, the kernel-device tests that need ublk_drv and nbd run in a VM (scripts/vm-tests.sh),
# and the Xen tests (PV guests on our disks) in one boot of a Xen host (scripts/xen-tests.sh;
# BLKTAP_XEN_TESTS=0 skips them).
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
echo "== Debian package (scripts/package.sh), installed into a fresh root and purged"
debs=$(./scripts/package.sh)
# shellcheck disable=SC2086 # one path per line, no spaces (target/debian/*.deb)
./tests/package/install.sh $debs
echo "== fuzz smoke run"
./scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
echo "== VM tests (ublk, recovery, kernel NBD client)"
./scripts/vm-tests.sh
# The Xen tests boot an emulated Xen host once for both (10-17 minutes on a 2-CPU machine);
# BLKTAP_XEN_TESTS=0 skips them.
if [ "${BLKTAP_XEN_TESTS:-1}" = 1 ]; then
    echo "== Xen tests (PV guests on phy: and vbd3 disks, one Xen boot)"
    VM_TIMEOUT=${XEN_TESTS_TIMEOUT:-1800} ./scripts/xen-tests.sh
else
    echo "== Xen tests skipped (BLKTAP_XEN_TESTS=0)"
fi
