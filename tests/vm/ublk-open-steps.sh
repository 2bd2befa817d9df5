#!/bin/bash
# What a VBD gets when a toolstack (SM, libxl) drives the separate steps: without -b, no
# kernel device (the site default for opens, as the v4 C stack); with -b and -o on an open of
# a tapdisk that is already running, a device with the settings asked for; a site file that
# says otherwise is followed.
. "$1/tests/vm/lib.sh"

# Built-in defaults: allocate, spawn, attach, open without -b: no device. Then -b and -o on
# an open of the same tapdisk (the driver gives a device at most one queue per CPU: ask for
# one, fewer than the default two).
img=$(make_raw steps.img 16)
minor=$(tap-ctl allocate | sed 's/.*tapdisk-//')
pid=$(tap-ctl spawn)
check "attach" tap-ctl attach -p "$pid" -m "$minor"
check "open without -b" tap-ctl open -p "$pid" -m "$minor" -a "aio:$img"
check "no /dev/ublkb$minor for an open without -b" test ! -e "/dev/ublkb$minor"
check "stats show no block device" sh -c "! tap-ctl stats -p $pid -m $minor | grep -q blockdev"
check "close" tap-ctl close -p "$pid" -m "$minor"
check "open -b ublk -o ublk.queues=1,ublk.depth=16 on the running tapdisk" \
    tap-ctl open -p "$pid" -m "$minor" -a "aio:$img" -b ublk -o ublk.queues=1,ublk.depth=16
check "/dev/ublkb$minor has 1 queue" \
    test "$(find "/sys/block/ublkb$minor/mq" -mindepth 1 -maxdepth 1 -type d | wc -l)" -eq 1
check "/dev/ublkb$minor has depth 16" test "$(cat "/sys/block/ublkb$minor/mq/0/nr_tags")" -eq 16
check "destroy" tap-ctl destroy -p "$pid" -m "$minor"

# A site file whose default for opens is ublk: the same open without -b gets a device.
printf '[block_device]\nopen = "ublk"\n' > "$TAPDISK_CONFIG"
minor=$(tap-ctl allocate | sed 's/.*tapdisk-//')
pid=$(tap-ctl spawn)
check "attach (site: open = ublk)" tap-ctl attach -p "$pid" -m "$minor"
check "open without -b" tap-ctl open -p "$pid" -m "$minor" -a "aio:$img"
check "/dev/ublkb$minor exists" test -b "/dev/ublkb$minor"
check "stats show it" sh -c "tap-ctl stats -p $pid -m $minor | grep -q '\"blockdev\": \"/dev/ublkb$minor\"'"
check "destroy" tap-ctl destroy -p "$pid" -m "$minor"
finish
