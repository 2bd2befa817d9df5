#!/usr/bin/env bash
# Builds the Debian package blktap-rs with one command: the release build of the workspace,
# then cargo-deb packs it (`--no-build`: nothing is compiled twice; the package's contents,
# dependencies and relations are in crates/tap-ctl/Cargo.toml, [package.metadata.deb]), then
# lintian checks the .deb (an error fails the build). scripts/setup.sh installs cargo-deb and
# lintian; scripts/test.sh runs this, then tests/package/install.sh on the result.
#
# Why cargo-deb rather than dpkg-buildpackage: Debian's Rust route (debhelper + dh-cargo)
# builds only against crates packaged by Debian, and many of ours (libublk, fuser, rustls'
# versions) are not; cargo-deb builds from Cargo.lock like every other build here, is kept
# up to date on crates.io, and still produces a policy-conformant binary package (shlibdeps
# Depends, compressed manual pages, conffiles, maintainer scripts) that lintian accepts.
#
# Usage: scripts/package.sh       Output: the .deb's path on the last line
# (target/debian/blktap-rs_VERSION-1_ARCH.deb, or under $CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "package: cargo build --release" >&2
cargo build --release --workspace --locked --quiet
echo "package: cargo deb" >&2
deb=$(cargo deb -p tap-ctl --no-build --locked --quiet)
echo "package: lintian $deb" >&2
lintian --fail-on error "$deb" >&2 ||
    { echo "package: lintian found errors" >&2; exit 1; }
echo "$deb"
