//! `libblktapctl.so`: the C interface of the control library, the functions of the C
//! stack's `tap-ctl.h` (our own declaration of them is `include/blktap/tap-ctl.h`) with the
//! C library's signatures, return conventions (0 or a negative errno) and memory ownership
//! (strings and list rows from `malloc`, freed by the caller with `free` or
//! `tap_ctl_list_free`). libxl calls `tap_ctl_find_minor`, `tap_ctl_create` and
//! `tap_ctl_destroy`; tapback `tap_ctl_list_pid`, `tap_ctl_info` and the Xen ring calls.
//!
//! * [`abi`] is the boundary: the exported functions, the only `unsafe` code of the crate
//!   (C strings and out-parameters, the `tap_list_t` rows, borrowed descriptors, `FILE *`).
//!   Every entry point catches panics and turns every failure into a negative errno.
//! * [`calls`] does the work in safe Rust over the `blktapctl` crate: no second
//!   implementation of the control protocol.
//! * [`settings`] holds the control directory and the tapdisk binary (fixed defaults, or
//!   what the program sets through the blktap-rs extensions; no environment is read).
//! * [`rawio`] moves whole messages over a caller's descriptor within a deadline (the
//!   `tap_ctl_read_raw` family).

pub mod abi;
pub mod calls;
pub mod rawio;
pub mod settings;
