#!/bin/bash
# tests/xen/lib.sh -- helpers for the tests that run in the dom0 of a Xen host (sourced).
#
# scripts/xen-tests.sh boots one Xen host and runs each test there as
# `bash tests/xen/NAME.sh REPO NAME`; REPO holds tests/{xen,vm}/ and target/debug/. On top of
# tests/vm/lib.sh (checks, the "N passed, M failed" line, cleanup, syslog into
# $VM_SHARE/NAME.syslog) and run-in-xen.sh's $XEN_LIB (xen_guest_initrd), this gives: guests
# that run tests/xen/guest-io.sh, hot-plugged disks, waiting for the guests' console lines,
# and a mailbox disk to tell them to stop.
# shellcheck source=tests/vm/lib.sh
. "$1/tests/vm/lib.sh"
# shellcheck disable=SC1091 # written by run-in-xen.sh
. "$XEN_LIB"
XEN_TESTS="$REPO/tests/xen"

# guest_initrd OUT SETTINGS...: an initramfs whose guest runs guest-io.sh with SETTINGS
# (shell assignments, one per argument) in front.
guest_initrd() {
    local out=$1 script; shift
    script=$(mktemp /tmp/guest.XXXXXX)
    printf '%s\n' "$@" > "$script"
    cat "$XEN_TESTS/guest-io.sh" >> "$script"
    xen_guest_initrd "$script" "$out"; local rc=$?
    rm -f "$script"; return $rc
}

# console NAME: the console log of guest NAME so far.
console() { tr -d '\r' 2>/dev/null < "/var/log/xen/console/guest-$1.log"; }

# wait_console NAME REGEX SECONDS: waits until the guest's console has a line matching REGEX
# (grep -E); fails early if the guest already printed GUEST-RC or is gone.
wait_console() {
    local i=0 text
    while [ $i -lt "$3" ]; do
        text=$(console "$1")
        printf '%s\n' "$text" | grep -qE "$2" && return 0
        case $text in *GUEST-RC=*) return 1 ;; esac
        xl domid "$1" >/dev/null 2>&1 || return 1
        sleep 1; i=$((i + 1))
    done
    return 1
}

# last_round NAME: the last "GUEST: round N ok" the guest printed (0 before the first).
last_round() {
    console "$1" | sed -n 's/^GUEST: round \([0-9]*\) ok.*/\1/p' | tail -n1 | grep . || echo 0
}

# wait_rounds NAME N SECONDS: waits until the guest finished N more rounds than now.
wait_rounds() {
    local want i=0
    want=$(( $(last_round "$1") + $2 ))
    while [ "$(last_round "$1")" -lt "$want" ]; do
        i=$((i + 1)); [ $i -gt "$3" ] && return 1
        xl domid "$1" >/dev/null 2>&1 || return 1
        sleep 1
    done
}

# Guests start without disks; once the guest's blkfront is ready (reloaded with the module
# parameters the test wants: the initramfs insmods it, so the kernel command line never
# reaches it), dom0 hot-plugs its disks by writing XenStore nodes the way xenopsd does
# (Device.Vbd.add), with no hotplug script: libxl's hotplug timeout is easily exceeded on an
# emulated, busy host. A disk's back end is dom0's blkback ("vbd": the node names a block
# device's major:minor) or a tapback ("vbd3": the node names the tapdisk's NBD socket, from
# which tapback finds the tapdisk and minor).

# guest_start NAME INITRD: starts guest NAME without disks and waits until its blkfront is
# ready ("GUEST: blkfront ready"); prints its domid. 256 MiB (XEN_GUEST_MEM): blkfront keeps
# a page per grant of every ring slot when the back end offers persistent grants (blkback
# does): (32 segments + 1 indirect page) x 256 slots of an order-3 ring, 33 MiB per disk;
# with three disks a 128 MiB guest ran out of memory before its disks appeared.
guest_start() {
    cat > "/run/xen/guest-$1.cfg" <<CFG
name = "$1"
type = "pv"
kernel = "$XEN_GUEST_KERNEL"
ramdisk = "$2"
cmdline = "console=hvc0 quiet ${XEN_GUEST_CMDLINE:-}"
memory = ${XEN_GUEST_MEM:-256}
vcpus = 1
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
    rm -f "/var/log/xen/console/guest-$1.log"
    xl create "/run/xen/guest-$1.cfg" >> "$LOG" 2>&1 &&
        wait_console "$1" '^GUEST: blkfront ready' "${XEN_BOOT_TIMEOUT:-600}" && xl domid "$1"
}

# vdev_number NAME: the xenbus device id of xvdX (202 << 8 | 16 * index).
vdev_number() {
    local letter=${1#xvd}
    echo $(( (202 << 8) + 16 * ($(printf '%d' "'$letter") - 97) ))
}

# guest_disk DOMID VDEV TYPE TARGET: hot-plugs a disk as VDEV (xvda...). TYPE vbd: TARGET is
# a block device for blkback; TYPE vbd3: TARGET is "PID MINOR" of a tapdisk, for tapback.
# Both ends' nodes are written first without their `state`: the back end's (readable by the
# guest), then the front end's directory, made the guest's own, and its keys (they inherit
# that owner). The two `state` nodes (Initialising) come last, in one transaction: a kernel
# xenbus driver probes a device only once its `state` is Initialising, and its probe fails
# for good when the other end does not exist yet (blkback's and blkfront's alike), so
# neither end may appear before the other (xenopsd writes both in one transaction).
guest_disk() {
    local domid=$1 vdev=$2 type=$3 target=$4 devid fe be extra pid minor
    devid=$(vdev_number "$vdev")
    fe=/local/domain/$domid/device/vbd/$devid
    be=/local/domain/0/backend/$type/$domid/$devid
    case $type in
    vbd) extra="$be/physical-device $(stat -L -c '%t:%T' "$target") $be/params $target" ;;
    vbd3) read -r pid minor <<<"$target"
          extra="$be/params nbd $be/physical-device-path $BLKTAP_CONTROL_DIR/nbd$pid.$minor"
          extra="$extra $be/hotplug-status connected" ;;
    esac
    # shellcheck disable=SC2086 # $extra is key/value pairs
    xenstore-write "$be/frontend" "$fe" "$be/frontend-id" "$domid" "$be/online" 1 \
        "$be/removable" 0 "$be/mode" w "$be/type" phy "$be/dev" "$vdev" \
        "$be/device-type" disk $extra &&
    xenstore-chmod -r "$be" n0 "r$domid" &&
    xenstore-write "$fe" "" && xenstore-chmod "$fe" "n$domid" r0 &&
    xenstore-write "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/virtual-device" "$devid" \
        "$fe/device-type" disk &&
    xenstore-write "$be/state" 1 "$fe/state" 1
}

# guest_wait NAME SECONDS: waits until guest NAME is gone (destroys it after SECONDS),
# copies its console into the log; status 0 if the guest printed GUEST-RC=0.
guest_wait() {
    local i=0
    while xl domid "$1" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt "$2" ]; then
            echo "guest $1 still running after $2 s: destroying it" >> "$LOG"
            xl destroy "$1"; break
        fi
        sleep 1
    done
    i=0; while [ $i -lt 3 ] && ! console "$1" | grep -q '^GUEST-RC='; do sleep 1; i=$((i + 1)); done
    console "$1" | sed "s/^/  $1 | /" >> "$LOG"
    console "$1" | grep -q '^GUEST-RC=0'
}

# xen_diag DOMID: appends to the log what the disks' handshake left in XenStore (the back
# ends and the guest's front ends, states and error nodes) and dom0's recent kernel messages.
xen_diag() {
    {
        echo "== diagnostics: XenStore back ends, domain $1's front ends, error nodes, dmesg"
        xenstore-ls -f /local/domain/0/backend
        xenstore-ls -f "/local/domain/$1/device"
        xenstore-ls -f /local/domain/0/error
        xenstore-ls -f "/local/domain/$1/error"
        dmesg | tail -n 40
    } >> "$LOG" 2>&1
}

# guest_unplug DOMID TYPE: removes the guest's back-end nodes (blkback lets go of the devices).
guest_unplug() { xenstore-rm "/local/domain/0/backend/$2/$1" 2>/dev/null; }

# make_mailbox: a 1 MiB file on a loop device (the guest's MAILBOX disk); prints the device.
make_mailbox() {
    truncate -s 1M "$SCRATCH/mailbox" && losetup -f --show "$SCRATCH/mailbox"
}
# post_stop LOOPDEV: tells the guest to finish.
post_stop() {
    printf 'STOP' | dd of="$1" bs=512 conv=sync,notrunc oflag=direct 2>/dev/null
}

# guest_md5 NAME DISK: the md5 the guest reported for DISK (GUEST-DISK-MD5 lines).
guest_md5() { console "$1" | sed -n "s/^GUEST-DISK-MD5 $2 //p" | tail -n1; }

# dev_md5 DEV MIB: md5 of the first MIB MiB of DEV, read in dom0.
dev_md5() { dd if="$1" bs=1M count="$2" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1; }
