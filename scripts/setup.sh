#!/usr/bin/env bash
# Installs what building and testing blktap-rs needs on a fresh Debian machine (as root):
# the test peers (fio, libnbd-bin with nbdinfo/nbdcopy/nbdfuse, nbdkit, libvhdi-utils),
# nbd-client (the VM tests attach /dev/nbd0 to tapdisk's NBD socket), lvm2 (vhd-util scan -l
# runs its vgs and lvs; the VM tests build LVHD volume groups), libclang-dev (libublk's
# -sys crate runs bindgen at build time), valgrind and pkg-config (libblktapctl's C client
# test builds against the installed .pc and runs under valgrind), shellcheck
# (scripts/lint.sh), the Debian package's tools (scripts/package.sh: dpkg-dev for
# cargo-deb's dpkg-shlibdeps, lintian; man-db, with which tests/package/install.sh reads the
# installed manual pages), the cargo tools cargo-fuzz (scripts/fuzz.sh), cargo-deny
# (scripts/lint.sh) and cargo-deb (scripts/package.sh), built from crates.io (a few minutes
# the first time), then builds every binary. qemu-utils (qemu-img,
# qemu-io, qemu-nbd) is preinstalled here; it is installed only when missing, so the newer
# preinstalled one is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in fio:fio nbdinfo:libnbd-bin nbdkit:nbdkit vhdiinfo:libvhdi-utils \
            mkfs.ext4:e2fsprogs losetup:mount lsblk:util-linux cmp:diffutils \
            fusermount3:fuse3 qemu-img:qemu-utils nbd-client:nbd-client \
            shellcheck:shellcheck lvm:lvm2 valgrind:valgrind pkg-config:pkgconf \
            dpkg-shlibdeps:dpkg-dev lintian:lintian man:man-db; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

for tool in cargo-fuzz@0.13 cargo-deny@0.20 cargo-deb@3.8; do
    if ! command -v "${tool%@*}" >/dev/null 2>&1; then
        echo "setup: installing $tool (cargo install)"
        cargo install --locked --quiet "$tool"
    fi
done

echo "setup: building"
cargo build --workspace --bins --quiet
