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
# Usage: scripts/package.sh       Output: the .deb files' paths on stdout, one a line
# (target/debian/blktap-rs_VERSION-1_ARCH.deb, or under $CARGO_TARGET_DIR); progress and
# lintian's findings on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "package: cargo build --release" >&2
cargo build --release --workspace --locked --quiet
# The package's library paths name x86_64-linux-gnu (crates/tap-ctl/Cargo.toml), the one
# target the workspace builds for (deny.toml).
multiarch=x86_64-linux-gnu
echo "package: staging libblktapctl" >&2
stage=target/package-stage
rm -rf "$stage"
DESTDIR=$stage LIBDIR=/usr/lib/$multiarch scripts/install-libblktapctl.sh \
    "${CARGO_TARGET_DIR:-target}/release/libblktapctl_c.so" >&2
# cargo-deb strips what cargo built, not staged files: strip the library as dh_strip would.
strip --remove-section=.comment --remove-section=.note --strip-unneeded \
    "$stage/usr/lib/$multiarch/libblktapctl.so.0.1.1"
echo "package: cargo deb" >&2
deb=$(cargo deb -p tap-ctl --no-build --locked --quiet)
# cargo-deb writes no shlibs control file, which a package shipping a shared library needs
# (programs linked against libblktapctl.so.0 then depend on this package): add it.
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -R "$deb" "$unpacked"
version=$(dpkg-deb -f "$deb" Version)
echo "libblktapctl 0 blktap-rs (>= ${version%-*})" >"$unpacked/DEBIAN/shlibs"
dpkg-deb --root-owner-group -Zxz -b "$unpacked" "$deb" >/dev/null
echo "package: lintian $deb" >&2
lintian --fail-on error "$deb" >&2 ||
    { echo "package: lintian found errors" >&2; exit 1; }
echo "$deb"
