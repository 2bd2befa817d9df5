#!/bin/bash
# tests/vm/lib.sh -- helpers for the tests that run inside the VM (sourced, never run).
#
# A test is started by scripts/vm-tests.sh as `run-in-vm.sh run tests/vm/NAME.sh REPO NAME`, where
# REPO holds tests/vm/ and target/debug/{tap-ctl,tapdisk,vhd-util,cbt-util} (scripts/vm-tests.sh
# copies them into the VM's shared folder, so REPO is visible in the guest even when the
# checkout is not).
# The test prints one line per check ("ok - ..." or "FAIL - ...") and ends with the line
# "N passed, M failed"; it exits non-zero when any check failed. Scratch files live in the
# guest's /tmp (RAM); tapdisk's syslog goes to $VM_SHARE/NAME.syslog for post-mortems.

set -u
REPO=${1:?usage: $0 REPO}
BIN=${BIN:-$REPO/target/debug}
export PATH="$BIN:$PATH"
export BLKTAP_TAPDISK="$BIN/tapdisk"
export BLKTAP_CONTROL_DIR=/run/blktap-control
TEST_NAME=${2:-vmtest}
SHARE=${VM_SHARE:-$PWD}
SCRATCH=$(mktemp -d /tmp/vmtest.XXXXXX)
# tapdisk's site configuration: built-in defaults (never the host's /etc/blktap/tapdisk.toml,
# which the guest sees); a test that wants other settings writes its own file.
export TAPDISK_CONFIG=$SCRATCH/tapdisk.toml
: > "$TAPDISK_CONFIG"
LOG="$SHARE/$TEST_NAME.log"
: > "$LOG"
PASSED=0
FAILED=0

ok() { PASSED=$((PASSED + 1)); echo "ok - $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $*"; }

# check DESCRIPTION COMMAND...: runs COMMAND (output to the log), records the result and
# returns COMMAND's status (so `if check ...` branches on the command, not on the record).
check() {
    local what=$1 rc; shift
    echo "== $what: $*" >> "$LOG"
    "$@" >> "$LOG" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then ok "$what"; else fail "$what (see $TEST_NAME.log)"; fi
    return "$rc"
}

# expect_status N DESCRIPTION COMMAND...: COMMAND must exit with status N.
expect_status() {
    local want=$1 what=$2; shift 2
    echo "== $what: $*" >> "$LOG"
    "$@" >> "$LOG" 2>&1
    local got=$?
    if [ "$got" -eq "$want" ]; then ok "$what"; else fail "$what (exit $got, expected $want)"; fi
}

finish() {
    cleanup_all
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
    exit $?
}

# Destroys every VBD still listed and kills leftover tapdisks (end of test, best effort).
cleanup_all() {
    local line pid minor
    tap-ctl list 2>/dev/null | while read -r line; do
        pid=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$line")
        minor=$(sed -n 's/.*minor=\([0-9]*\).*/\1/p' <<<"$line")
        [ -n "$pid" ] && [ -n "$minor" ] && tap-ctl destroy -p "$pid" -m "$minor" >> "$LOG" 2>&1
    done
    pkill_ours
    rm -rf "$SCRATCH"
}

# Kills tapdisks started from our binary (by pid, found through /proc/*/exe).
pkill_ours() {
    local exe pid
    for exe in /proc/[0-9]*/exe; do
        pid=${exe#/proc/}; pid=${pid%/exe}
        [ "$(readlink "$exe" 2>/dev/null)" = "$BLKTAP_TAPDISK" ] && kill -9 "$pid" 2>/dev/null
    done
    return 0
}

# pid_of_minor MINOR: the tapdisk pid serving MINOR (from tap-ctl list).
pid_of_minor() {
    tap-ctl list -m "$1" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n1
}

# minor_of_device /dev/ublkbN -> N
minor_of_device() { echo "${1##*[!0-9]}"; }

# make_raw NAME MIB: a zero-filled raw image in the scratch directory; prints its path.
make_raw() {
    local path="$SCRATCH/$1"
    truncate -s "${2}M" "$path" && echo "$path"
}

# lvm_setup: real LVM without udev (the guest runs none): LVM makes its own /dev nodes and
# must not wait for udev, looks only at loop devices, and keeps no metadata backups (they
# would go to the read-only root). LVM_SYSTEM_DIR is exported, so it also reaches the
# lvs/vgs that vhd-util runs.
lvm_setup() {
    modprobe dm_mod 2>/dev/null
    mkdir -p /run/lvm /run/lock/lvm
    export LVM_SYSTEM_DIR="$SCRATCH/lvm"
    mkdir -p "$LVM_SYSTEM_DIR"
    cat > "$LVM_SYSTEM_DIR/lvm.conf" <<'EOF'
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 filter = [ "a|^/dev/loop|", "r|.*|" ] }
backup { backup = 0 archive = 0 }
EOF
    export LVM_SUPPRESS_FD_WARNINGS=1
}

# Starts a syslog receiver so tapdisk's messages land in $SHARE/$TEST_NAME.syslog.
start_syslog() {
    rm -f /dev/log
    busybox syslogd -n -O "$SHARE/$TEST_NAME.syslog" &
    for _ in $(seq 50); do [ -S /dev/log ] && return 0; sleep 0.1; done
    echo "warning: no syslogd" >&2
}

modprobe ublk_drv 2>/dev/null
modprobe nbd 2>/dev/null
modprobe loop 2>/dev/null
mkdir -p "$BLKTAP_CONTROL_DIR"
start_syslog
