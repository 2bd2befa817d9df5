//! Gives the shared library the C library's soname, `libblktapctl.so.0` (libtool
//! version-info 1:1:1: file `libblktapctl.so.0.1.1`), so programs linked against either run
//! with either.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libblktapctl.so.0");
}
