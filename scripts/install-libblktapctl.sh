#!/usr/bin/env bash
# Installs libblktapctl.so (the C interface of the control library) as the C stack installs
# it: $LIBDIR/libblktapctl.so.0.1.1 (soname libblktapctl.so.0, libtool version-info 1:1:1)
# with the links libblktapctl.so.0 and libblktapctl.so, the header
# $INCLUDEDIR/blktap/tap-ctl.h and $LIBDIR/pkgconfig/libblktapctl.pc
# (`pkg-config --cflags` gives -I$INCLUDEDIR/blktap, so `#include <tap-ctl.h>` works as with
# the C stack, and so does <blktap/tap-ctl.h>).
#
#   [DESTDIR=/tmp/stage] [PREFIX=/usr] [LIBDIR=$PREFIX/lib] [INCLUDEDIR=$PREFIX/include] \
#       scripts/install-libblktapctl.sh [BUILT_LIBRARY]
#
# BUILT_LIBRARY defaults to target/release/libblktapctl_c.so, built first when missing
# (`cargo build --release -p libblktapctl`). DESTDIR stages the files for packaging; the
# .pc file names the final paths (without DESTDIR).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr}
LIBDIR=${LIBDIR:-$PREFIX/lib}
INCLUDEDIR=${INCLUDEDIR:-$PREFIX/include}
DESTDIR=${DESTDIR:-}
built=${1:-target/release/libblktapctl_c.so}
if [ ! -f "$built" ]; then
    if [ $# -gt 0 ]; then
        echo "install-libblktapctl: $built does not exist" >&2
        exit 2
    fi
    cargo build --release --quiet -p libblktapctl
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
real=libblktapctl.so.0.1.1

install -d "$DESTDIR$LIBDIR/pkgconfig" "$DESTDIR$INCLUDEDIR/blktap"
install -m 0755 "$built" "$DESTDIR$LIBDIR/$real"
ln -sfn "$real" "$DESTDIR$LIBDIR/libblktapctl.so.0"
ln -sfn libblktapctl.so.0 "$DESTDIR$LIBDIR/libblktapctl.so"
install -m 0644 crates/libblktapctl/include/blktap/tap-ctl.h "$DESTDIR$INCLUDEDIR/blktap/tap-ctl.h"
sed -e "s|@PREFIX@|$PREFIX|" -e "s|@LIBDIR@|$LIBDIR|" -e "s|@INCLUDEDIR@|$INCLUDEDIR|" \
    -e "s|@VERSION@|$version|" crates/libblktapctl/libblktapctl.pc.in \
    > "$DESTDIR$LIBDIR/pkgconfig/libblktapctl.pc"
chmod 0644 "$DESTDIR$LIBDIR/pkgconfig/libblktapctl.pc"
echo "install-libblktapctl: $DESTDIR$LIBDIR/$real, $DESTDIR$INCLUDEDIR/blktap/tap-ctl.h, $DESTDIR$LIBDIR/pkgconfig/libblktapctl.pc"
