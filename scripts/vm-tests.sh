#!/usr/bin/env bash
# Runs the kernel-device tests (tests/vm/*.sh) inside a VM whose kernel has ublk_drv and nbd,
# through ../shared/vm/run-in-vm.sh (one boot per test script). Needs the binaries built
# (scripts/setup.sh does it) in ${CARGO_TARGET_DIR:-target}/debug (or .../release).
#
# The guest sees this machine's / read-only, except /tmp (fresh) and the shared folder
# $VM_SHARE. So the binaries and the test scripts are copied into a private shared folder and
# that copy is what the guest runs, wherever the checkout and the target dir are.
#
# Usage: scripts/vm-tests.sh [NAME...]   (default: every tests/vm/*.sh but lib.sh)
# Knobs: RUN_IN_VM (default ../shared/vm/run-in-vm.sh), VM_TIMEOUT per boot (default 900 s),
# BLKTAP_PROFILE (debug or release: which build's binaries the guest runs).
# Output: each test's checks and its "N passed, M failed" line; logs stay in the shared
# folder, whose path is printed. Exit status: non-zero when any test failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$PWD
run_in_vm=${RUN_IN_VM:-$repo/../shared/vm/run-in-vm.sh}
target=${CARGO_TARGET_DIR:-$repo/target}
bin="$target/${BLKTAP_PROFILE:-debug}"

if [ ! -x "$run_in_vm" ] && [ ! -f "$run_in_vm" ]; then
    echo "vm-tests: $run_in_vm not found" >&2
    exit 2
fi
for b in tap-ctl tapdisk vhd-util cbt-util; do
    [ -x "$bin/$b" ] || { echo "vm-tests: $bin/$b missing (run scripts/setup.sh)" >&2; exit 2; }
done
vm_dir=${VM_DIR:-/var/cache/blktap-vm}
if [ ! -f "$vm_dir/initrd.gz" ]; then
    echo "vm-tests: setting the VM up (once)"
    bash "$run_in_vm" setup || { echo "vm-tests: VM setup failed" >&2; exit 2; }
fi

share=$(mktemp -d /tmp/blktap-vm.XXXXXX)
export VM_SHARE=$share
mkdir -p "$share/repo/target/debug" "$share/repo/tests/vm"
cp "$bin/tap-ctl" "$bin/tapdisk" "$bin/vhd-util" "$bin/cbt-util" "$share/repo/target/debug/"
cp tests/vm/*.sh "$share/repo/tests/vm/"
cp scripts/bench-ublk.sh "$share/repo/tests/vm/" 2>/dev/null || true

if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=()
    for t in tests/vm/*.sh; do
        [ "$(basename "$t")" = lib.sh ] || tests+=("$(basename "${t%.sh}")")
    done
fi

status=0
for name in "${tests[@]}"; do
    name=${name%.sh}; name=$(basename "$name")
    echo "== vm test $name"
    start=$SECONDS
    bash "$run_in_vm" run "$share/repo/tests/vm/$name.sh" "$share/repo" "$name" 2>&1 |
        tr -d '\r' |
        sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' -e 's/^.*Booting from ROM\.*//' |
        grep -v -e '^\[ *[0-9.]*\]' -e '^reboot: ' -e '^ *$' -e 'iPXE' -e '^Press Ctrl-B' \
            -e '^SeaBIOS'
    rc=${PIPESTATUS[0]}
    echo "== vm test $name: exit $rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
done
rm -rf "$share/repo"
echo "vm-tests: logs in $share"
exit $status
