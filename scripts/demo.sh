#!/usr/bin/env bash
# The built-in demo: make a raw disk image with data, serve it with tap-ctl + tapdisk,
# show the VBD and its NBD socket, read and write it over NBD, and tear it all down.
# Run as root from a fresh checkout: it installs and builds what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

BIN=$PWD/target/debug
WORK=$(mktemp -d /tmp/blktap-demo.XXXXXX)
export BLKTAP_CONTROL_DIR=${BLKTAP_CONTROL_DIR:-$WORK/control}
export BLKTAP_BLOCK_DEVICE=${BLKTAP_BLOCK_DEVICE:-none}   # NBD only until a block device frontend is built
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

step "A 64 MiB raw image with a pattern in its first MiB"
run qemu-img create -q -f raw "$WORK/disk.img" 64M
run qemu-io -q -f raw -c "write -P 0x42 0 1M" "$WORK/disk.img"

step "tap-ctl create: allocate a minor, spawn tapdisk, attach, open"
MARKER=$(run "$BIN/tap-ctl" create -a "aio:$WORK/disk.img")
echo "$MARKER"
MINOR=${MARKER##*tapdisk-}

step "tap-ctl list (the form toolstacks parse)"
LINE=$(run "$BIN/tap-ctl" list -m "$MINOR")
echo "$LINE"
PID=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$LINE")
SOCK=$BLKTAP_CONTROL_DIR/nbd$PID.$MINOR
URI="nbd+unix:///?socket=$SOCK"

step "The VBD's NBD socket"
run ls -l "$SOCK"
run nbdinfo "$URI"

step "Read it back over NBD and compare with the file"
run qemu-io -f raw -r -c "read -P 0x42 0 1M" "$URI"
run qemu-img compare -f raw -F raw "$WORK/disk.img" "$URI"

step "Write over NBD, read the change from the file itself"
run qemu-io -f raw -c "write -P 0x99 8M 64k" -c flush "$URI"
run qemu-io -f raw -r -c "read -P 0x99 8M 64k" "$WORK/disk.img"

step "Pause and unpause (what a toolstack does around a snapshot)"
run "$BIN/tap-ctl" pause -p "$PID" -m "$MINOR"
run "$BIN/tap-ctl" list -m "$MINOR"
run "$BIN/tap-ctl" unpause -p "$PID" -m "$MINOR"

step "Statistics"
run "$BIN/tap-ctl" stats -p "$PID" -m "$MINOR"

step "tap-ctl destroy: close, detach (tapdisk exits), free"
run "$BIN/tap-ctl" destroy -p "$PID" -m "$MINOR"
run "$BIN/tap-ctl" list
echo "remaining files in $BLKTAP_CONTROL_DIR:"; find "$BLKTAP_CONTROL_DIR" -type f -o -type s
echo
echo "demo finished"
