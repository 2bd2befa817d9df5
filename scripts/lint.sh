#!/usr/bin/env bash
# Static checks; none needs root or runs our code: formatting and clippy over the workspace
# and the fuzz targets (fuzz/ is a workspace of its own), rustdoc without warnings, shellcheck
# over the shell scripts, the declared MSRV against the locked dependencies, and cargo-deny
# (licenses, duplicate crate versions, sources). scripts/test.sh runs it first;
# scripts/setup.sh installs shellcheck and cargo-deny.
#
# MSRV: these machines have one Rust toolchain, so no older compiler builds the tree here.
# What is checked is what can be checked offline: clippy's incompatible_msrv lint (part of
# the clippy run) refuses standard-library items stabilised after the workspace's
# rust-version, and every locked package (build and dev dependencies included) must declare
# a rust-version no newer than ours (resolver 3 picks such versions when the lock changes).
# Language features stabilised after it are not machine-checked.
#
# cargo-deny's advisories check needs the RustSec database, fetched from GitHub, which these
# machines cannot reach; run `cargo deny check advisories` where it can.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check (workspace, fuzz targets)"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

echo "== cargo clippy (workspace, fuzz targets)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The test-only crash-injection build of vhd-util (its abort-at-every-write tests use it).
cargo clippy -p vhd-util --all-targets --features crash-injection --quiet -- -D warnings
# Checking the fuzz targets needs no nightly flags; sharing target/ reuses the workspace's
# dependencies.
cargo clippy --manifest-path fuzz/Cargo.toml --target-dir target --bins --quiet -- -D warnings

echo "== cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

echo "== shellcheck"
shellcheck .ci/run scripts/*.sh tests/vm/*.sh tests/xen/*.sh tests/package/*.sh \
    packaging/bash-completion packaging/debian/postinst packaging/debian/postrm

echo "== MSRV: locked dependencies"
metadata=$(mktemp)
trap 'rm -f "$metadata"' EXIT
cargo metadata --format-version 1 --locked >"$metadata"
python3 - "$metadata" <<'EOF'
import json, sys

def version(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

with open(sys.argv[1]) as file:
    meta = json.load(file)
members = set(meta["workspace_members"])
ours = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
if len(ours) != 1 or None in ours:
    sys.exit(f"workspace members declare rust-version {sorted(map(str, ours))}: want one")
msrv = ours.pop()
locked = {node["id"] for node in meta["resolve"]["nodes"]}
newer = sorted(
    f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
    for p in meta["packages"]
    if p["id"] in locked and p["rust_version"] and version(p["rust_version"]) > version(msrv)
)
if newer:
    sys.exit(f"rust-version is {msrv}, but Cargo.lock holds:\n  " + "\n  ".join(newer))
print(f"rust-version {msrv}: none of the {len(locked)} locked packages declares a newer one")
EOF

echo "== cargo deny (licenses, bans, sources)"
cargo deny --locked check licenses bans sources
