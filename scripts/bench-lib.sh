# shellcheck shell=bash
# Helpers the benchmark scripts share (sourced, not run). The caller sets BIN (the directory
# of the built tap-ctl; bench_binaries does) and exports BLKTAP_CONTROL_DIR; BLKTAP_TAPDISK,
# if set, chooses the tapdisk that tap-ctl starts (e.g. a wrapper running it under valgrind).

# bench_binaries: sets BIN to $BIN_DIR if given (an earlier build, to compare against), else
# builds tapdisk and tap-ctl in release mode and sets BIN to their directory.
bench_binaries() {
    if [ -n "${BIN_DIR:-}" ]; then
        BIN=$BIN_DIR
    else
        export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
        cargo build --release -q -p tapdisk -p tap-ctl --bins
        BIN=$CARGO_TARGET_DIR/release
    fi
}

# counted_requests N BASE: the per-request scripts measure N and BASE requests and divide the
# difference; N must be the larger.
counted_requests() {
    if [ "$1" -le "$2" ]; then
        echo "N ($1) must be larger than BASE ($2)" >&2
        exit 1
    fi
}

# create_vbd TAP-CTL-CREATE-ARGS... -> prints "pid minor" of the new VBD (one new tapdisk).
create_vbd() {
    local marker minor pid
    marker=$("$BIN/tap-ctl" create "$@")
    minor=${marker##*tapdisk-}
    pid=$("$BIN/tap-ctl" list -m "$minor" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
    echo "$pid $minor"
}

# destroy_vbd "pid minor": closes the VBD and ends its tapdisk.
destroy_vbd() {
    local pid minor
    read -r pid minor <<<"$1"
    "$BIN/tap-ctl" destroy -p "$pid" -m "$minor"
}

# hand_over RECEIVER CLIENT ID: what xapi does to start a storage-migration mirror. A
# connected socket pair: one end to RECEIVER (the destination's fd receiver,
# nbdserver<pid>.<minor>), the other to CLIENT (the source's nbdclient<pid>), each with the
# text ID. The source then takes its end with `tap-ctl unpause ... -2 nbd:ID`.
hand_over() {
    python3 - "$1" "$2" "$3" <<'EOF'
import socket, sys
destination, source, ident = sys.argv[1:4]
ends = socket.socketpair()
for receiver, end in zip((destination, source), ends):
    helper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    helper.connect(receiver)
    socket.send_fds(helper, [ident.encode()], [end.fileno()])
    helper.close()
EOF
}
