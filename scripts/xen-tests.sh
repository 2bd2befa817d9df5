#!/usr/bin/env bash
# Runs the Xen tests (tests/xen/*.sh but lib.sh and guest-*.sh) in the dom0 of a throw-away
# Xen host, through ../shared/vm/run-in-xen.sh (one boot per test script; each boot starts
# the PV guests its script needs). Needs the binaries built (scripts/setup.sh does it) in
# ${CARGO_TARGET_DIR:-target}/debug (or .../release).
#
# As in scripts/vm-tests.sh, dom0 sees this machine's / read-only except /tmp, /run and the
# shared folder $VM_SHARE, so the binaries and scripts are copied into a private shared
# folder and dom0 runs that copy.
#
# Usage: scripts/xen-tests.sh [NAME...]   (default: every tests/xen/*.sh but the helpers
# lib.sh and guest-*.sh; bench-xen runs scripts/bench-xen.sh the same way)
# Knobs: RUN_IN_XEN (default ../shared/vm/run-in-xen.sh), VM_TIMEOUT per boot (default 1800 s),
# BLKTAP_PROFILE (debug or release).
# Output: each test's checks and its "N passed, M failed" line; logs (dom0's and the guests'
# consoles, tapdisk's syslog) stay in the shared folder, whose path is printed. Exit status:
# non-zero when any test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
run_in_xen=${RUN_IN_XEN:-$repo/../shared/vm/run-in-xen.sh}
target=${CARGO_TARGET_DIR:-$repo/target}
bin="$target/${BLKTAP_PROFILE:-debug}"

if [ ! -f "$run_in_xen" ]; then
    echo "xen-tests: $run_in_xen not found" >&2
    exit 2
fi
bins="tap-ctl tapdisk vhd-util"
[ -x "$bin/tapback" ] && bins="$bins tapback"
for b in $bins; do
    [ -x "$bin/$b" ] || { echo "xen-tests: $bin/$b missing (run scripts/setup.sh)" >&2; exit 2; }
done

share=$(mktemp -d /tmp/blktap-xen.XXXXXX)
export VM_SHARE=$share VM_TIMEOUT=${VM_TIMEOUT:-1800}
mkdir -p "$share/repo/target/debug" "$share/repo/tests/xen" "$share/repo/tests/vm"
for b in $bins; do cp "$bin/$b" "$share/repo/target/debug/"; done
cp tests/xen/*.sh "$share/repo/tests/xen/"
cp tests/vm/lib.sh "$share/repo/tests/vm/"
cp scripts/bench-xen.sh "$share/repo/tests/xen/" 2>/dev/null || true

if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=()
    for t in tests/xen/*.sh; do
        case "$(basename "$t")" in lib.sh|guest-*.sh) ;; *) tests+=("$(basename "${t%.sh}")") ;; esac
    done
fi

status=0
for name in "${tests[@]}"; do
    name=${name%.sh}; name=$(basename "$name")
    echo "== xen test $name"
    start=$SECONDS
    script="$share/repo/tests/xen/$name.sh"
    [ -f "$script" ] || script="$share/repo/tests/xen/$name"
    bash "$run_in_xen" run "$script" "$share/repo" "$name" 2>&1 |
        tr -d '\r' |
        sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' |
        grep -v -e '^\[ *[0-9.]*\]' -e '^(XEN)' -e '^ *$' -e '^reboot: '
    rc=${PIPESTATUS[0]}
    echo "== xen test $name: exit $rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
done
rm -rf "$share/repo"
echo "xen-tests: logs in $share"
exit $status
