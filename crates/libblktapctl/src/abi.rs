//! The exported C functions, declared for C programs in `include/blktap/tap-ctl.h`: the only
//! `unsafe` code of the crate.
//!
//! What the `unsafe` blocks rely on is the header's contract with the caller: a pointer
//! argument is NULL (where the header allows it) or points to what its type says, valid for
//! the call (strings NUL-terminated, buffers of the size given, `tapdisk_message_t` of
//! [`MESSAGE_SIZE`] bytes, list heads the library initialised or the caller did); memory
//! handed back comes from `malloc` and list rows are this module's [`TapList`]. NULL is
//! refused with `-EINVAL` wherever a value is needed (the C library would crash there).
//!
//! Every entry point runs its work inside `entry`: a panic is caught and reported as
//! `-EIO`, never unwound into C; every error becomes its negative errno, and, while
//! `tap_ctl_debug` is non-zero, a line on stderr saying what failed. Nothing is printed
//! otherwise.

// The functions' safety contract is the C header's, described above once for all.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, CStr, OsStr};
use std::io::Write as _;
use std::mem::offset_of;
use std::os::fd::{BorrowedFd, IntoRawFd as _};
use std::os::unix::ffi::OsStrExt as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use blktapctl::list::ListRow;
use blktapctl::{Blkif, Error, Result};
use libc::{pid_t, size_t, ssize_t, timeval, FILE};
use tapdisk_proto::MESSAGE_SIZE;

use crate::calls::{self, minor_of, pid_of, OpenArgs};
use crate::rawio::{deadline_in, read_full, write_full};
use crate::settings;

/// `tap_ctl_debug`: non-zero makes failing calls say why on stderr (the C library's debug
/// switch, which printed its protocol trace).
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static tap_ctl_debug: AtomicI32 = AtomicI32::new(0);

/// `tapdisk_message_t`, seen as its bytes.
pub type RawMessage = [u8; MESSAGE_SIZE];

/// `struct list_head`.
#[repr(C)]
#[derive(Debug)]
pub struct ListHead {
    next: *mut ListHead,
    prev: *mut ListHead,
}

/// `tap_list_t`: one row of `tap_ctl_list`, `malloc`ed, its strings too.
#[repr(C)]
#[derive(Debug)]
pub struct TapList {
    pid: pid_t,
    minor: c_int,
    state: c_int,
    driver: *mut c_char,
    path: *mut c_char,
    entry: ListHead,
}

/// The negative errno of `error`, said on stderr when `tap_ctl_debug` is set.
fn report(name: &str, error: &Error) -> c_int {
    if tap_ctl_debug.load(Ordering::Relaxed) != 0 {
        let _ = writeln!(std::io::stderr(), "{name}: {error}");
    }
    -error.errno()
}

/// Runs `call`: its value, or the negative errno of its error or of a panic.
fn entry(name: &str, call: impl FnOnce() -> Result<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => report(name, &error),
        Err(_) => report(name, &Error::new(libc::EIO, "internal error (panic)")),
    }
}

fn null(what: &str) -> Error {
    Error::new(libc::EINVAL, format!("{what} is NULL"))
}

/// The C string at `ptr` as bytes; `None` for NULL.
unsafe fn opt_bytes<'a>(ptr: *const c_char) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL string arguments are NUL-terminated and valid for the call (module
    // contract).
    Some(unsafe { CStr::from_ptr(ptr) }.to_bytes())
}

/// The C string at `ptr` as a path; `None` for NULL.
unsafe fn opt_path(ptr: *const c_char) -> Option<PathBuf> {
    // SAFETY: forwarded contract of this function's caller.
    unsafe { opt_bytes(ptr) }.map(|bytes| PathBuf::from(OsStr::from_bytes(bytes)))
}

/// The C string at `ptr` as text; `None` for NULL, `EINVAL` if it is not UTF-8.
unsafe fn opt_str<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>> {
    // SAFETY: forwarded contract of this function's caller.
    match unsafe { opt_bytes(ptr) } {
        None => Ok(None),
        Some(bytes) => std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::new(libc::EINVAL, format!("{what} is not UTF-8"))),
    }
}

/// [`opt_str`], NULL refused.
unsafe fn req_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    // SAFETY: forwarded contract of this function's caller.
    unsafe { opt_str(ptr, what) }?.ok_or_else(|| null(what))
}

/// A `malloc`ed NUL-terminated copy of `bytes` (which hold no NUL).
fn malloc_string(bytes: &[u8]) -> Result<*mut c_char> {
    // SAFETY: malloc has no precondition; NULL is checked below.
    let ptr = unsafe { libc::malloc(bytes.len() + 1) }.cast::<u8>();
    if ptr.is_null() {
        return Err(Error::new(libc::ENOMEM, "allocating a string"));
    }
    // SAFETY: `ptr` is a fresh allocation of `bytes.len() + 1` bytes, apart from `bytes`.
    unsafe {
        ptr.copy_from_nonoverlapping(bytes.as_ptr(), bytes.len());
        ptr.add(bytes.len()).write(0);
    }
    Ok(ptr.cast())
}

fn malloc_path(path: &Path) -> Result<*mut c_char> {
    malloc_string(path.as_os_str().as_bytes())
}

/// Stores `value` through `out`, which the caller checked is not NULL.
unsafe fn put<T>(out: *mut T, value: T) {
    // SAFETY: non-NULL out-parameters point to writable storage of their type (module
    // contract); the callers of `put` checked for NULL.
    unsafe { out.write(value) }
}

/// The timeout `tv` gives: `None` for NULL (no limit).
unsafe fn timeout_of(tv: *const timeval) -> Result<Option<Duration>> {
    if tv.is_null() {
        return Ok(None);
    }
    // SAFETY: a non-NULL timeval points to one (module contract).
    let tv = unsafe { tv.read() };
    let secs = u64::try_from(tv.tv_sec);
    let micros = u32::try_from(tv.tv_usec).ok().filter(|us| *us < 1_000_000);
    match (secs, micros) {
        (Ok(secs), Some(micros)) => Ok(Some(Duration::new(secs, micros * 1000))),
        _ => Err(Error::new(
            libc::EINVAL,
            format!("invalid timeout {}.{:06} s", tv.tv_sec, tv.tv_usec),
        )),
    }
}

/// The caller's descriptor `fd`, borrowed for the call.
unsafe fn borrow_fd<'a>(fd: c_int) -> Result<BorrowedFd<'a>> {
    if fd < 0 {
        return Err(Error::new(libc::EBADF, format!("invalid descriptor {fd}")));
    }
    // SAFETY: a non-negative descriptor argument is open for the call (module contract).
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The message at `message`, `EINVAL` for NULL.
unsafe fn message_of<'a>(message: *mut RawMessage) -> Result<&'a mut RawMessage> {
    // SAFETY: a non-NULL message points to a whole tapdisk_message_t, not aliased during
    // the call (module contract).
    unsafe { message.as_mut() }.ok_or_else(|| null("message"))
}

// ---- lists ----------------------------------------------------------------------------

/// Makes `head` an empty list.
unsafe fn init_head(head: *mut ListHead) {
    // SAFETY: `head` is a valid list head (callers' contract).
    unsafe {
        (*head).next = head;
        (*head).prev = head;
    }
}

/// A `malloc`ed row for `row`, not linked yet.
fn new_row(row: &ListRow) -> Result<*mut TapList> {
    let text = |value: &Option<String>| match value {
        Some(text) => malloc_string(text.as_bytes()),
        None => Ok(std::ptr::null_mut()),
    };
    let driver = text(&row.driver)?;
    let path = text(&row.path).inspect_err(|_| {
        // SAFETY: `driver` came from malloc (or is NULL) and is not used again.
        unsafe { libc::free(driver.cast()) }
    })?;
    // SAFETY: malloc has no precondition; NULL is checked below.
    let node = unsafe { libc::malloc(std::mem::size_of::<TapList>()) }.cast::<TapList>();
    if node.is_null() {
        // SAFETY: both came from malloc (or are NULL) and are not used again.
        unsafe {
            libc::free(driver.cast());
            libc::free(path.cast());
        }
        return Err(Error::new(libc::ENOMEM, "allocating a list row"));
    }
    let number = |value: Option<u32>| value.and_then(|v| c_int::try_from(v).ok()).unwrap_or(-1);
    // SAFETY: `node` is a fresh allocation of one TapList (malloc aligns for any type).
    unsafe {
        node.write(TapList {
            pid: number(row.pid),
            minor: number(row.minor),
            state: row.state.unwrap_or(-1),
            driver,
            path,
            entry: ListHead {
                next: std::ptr::null_mut(),
                prev: std::ptr::null_mut(),
            },
        });
    }
    Ok(node)
}

/// Makes `head` the list of `rows`, in order (on failure: empty).
unsafe fn fill_list(head: *mut ListHead, rows: &[ListRow]) -> Result<()> {
    // SAFETY: `head` is a valid list head (caller checked NULL).
    unsafe { init_head(head) };
    for row in rows {
        let node = match new_row(row) {
            Ok(node) => node,
            Err(error) => {
                // SAFETY: `head` holds only rows made by `new_row`.
                unsafe { free_list(head) };
                return Err(error);
            }
        };
        // SAFETY: `node` is a fresh row and `head` a well-formed list: link it last.
        unsafe {
            let entry = &raw mut (*node).entry;
            (*entry).next = head;
            (*entry).prev = (*head).prev;
            (*(*head).prev).next = entry;
            (*head).prev = entry;
        }
    }
    Ok(())
}

/// Frees every row of `head` (made by `fill_list`) and leaves it empty; a NULL or zeroed
/// head is left alone.
unsafe fn free_list(head: *mut ListHead) {
    if head.is_null() {
        return;
    }
    // SAFETY: `head` is a list head the library filled or the caller initialised.
    let mut cursor = unsafe { (*head).next };
    while !cursor.is_null() && cursor != head {
        // SAFETY: every entry but the head is the `entry` field of a TapList from
        // `new_row`, whose strings and itself came from malloc; each is freed once.
        unsafe {
            let next = (*cursor).next;
            let node = cursor
                .byte_sub(offset_of!(TapList, entry))
                .cast::<TapList>();
            libc::free((*node).driver.cast());
            libc::free((*node).path.cast());
            libc::free(node.cast());
            cursor = next;
        }
    }
    // SAFETY: as above.
    unsafe { init_head(head) };
}

// ---- versions and checks ----------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_version(major: *mut c_int, minor: *mut c_int) {
    if !major.is_null() {
        // SAFETY: checked non-NULL.
        unsafe { put(major, 1) };
    }
    if !minor.is_null() {
        // SAFETY: checked non-NULL.
        unsafe { put(minor, 1) };
    }
}

#[no_mangle]
pub extern "C" fn tap_ctl_kernel_version(_major: *mut c_int, _minor: *mut c_int) -> c_int {
    entry("tap_ctl_kernel_version", || {
        Err(Error::new(
            libc::ENOSYS,
            "this blktap stack has no kernel module",
        ))
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_check_blktap(_message: *mut *const c_char) -> c_int {
    0
}

#[no_mangle]
pub extern "C" fn tap_ctl_check_version(_message: *mut *const c_char) -> c_int {
    0
}

#[no_mangle]
pub extern "C" fn tap_ctl_blk_major() -> c_int {
    entry("tap_ctl_blk_major", || {
        Err(Error::new(
            libc::ENOSYS,
            "this blktap stack has no kernel block device, hence no device major",
        ))
    })
}

// ---- messages --------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_connect(path: *const c_char, socket: *mut c_int) -> c_int {
    entry("tap_ctl_connect", || {
        if socket.is_null() {
            return Err(null("socket"));
        }
        // SAFETY: checked non-NULL.
        unsafe { put(socket, -1) };
        // SAFETY: module contract.
        let path = unsafe { opt_bytes(path) }.ok_or_else(|| null("path"))?;
        let stream = calls::connect(Path::new(OsStr::from_bytes(path)))?;
        // SAFETY: checked non-NULL.
        unsafe { put(socket, stream.into_raw_fd()) };
        Ok(0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_connect_id(id: c_int, socket: *mut c_int) -> c_int {
    entry("tap_ctl_connect_id", || {
        if socket.is_null() {
            return Err(null("socket"));
        }
        // SAFETY: checked non-NULL.
        unsafe { put(socket, -1) };
        let stream = calls::connect(&calls::socket_name(pid_of(id)?))?;
        // SAFETY: checked non-NULL.
        unsafe { put(socket, stream.into_raw_fd()) };
        Ok(0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_read_raw(
    fd: c_int,
    buf: *mut libc::c_void,
    size: size_t,
    timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_read_raw", || {
        if size == 0 {
            return Ok(0);
        }
        if buf.is_null() {
            return Err(null("buffer"));
        }
        // SAFETY: module contract (descriptor open, buffer of `size` writable bytes).
        let (fd, timeout, buf) = unsafe {
            (
                borrow_fd(fd)?,
                timeout_of(timeout)?,
                std::slice::from_raw_parts_mut(buf.cast::<u8>(), size),
            )
        };
        read_full(fd, buf, deadline_in(timeout)).map(|()| 0)
    })
}

/// Runs `op` on the caller's descriptor and message, by the deadline `timeout` sets.
unsafe fn on_message(
    name: &str,
    fd: c_int,
    message: *mut RawMessage,
    timeout: *mut timeval,
    op: impl FnOnce(BorrowedFd<'_>, &mut RawMessage, Option<Instant>) -> Result<()>,
) -> c_int {
    entry(name, || {
        // SAFETY: forwarded contract of this function's caller.
        let (fd, message, timeout) =
            unsafe { (borrow_fd(fd)?, message_of(message)?, timeout_of(timeout)?) };
        op(fd, message, deadline_in(timeout)).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_read_message(
    fd: c_int,
    message: *mut RawMessage,
    timeout: *mut timeval,
) -> c_int {
    // SAFETY: module contract.
    unsafe {
        on_message(
            "tap_ctl_read_message",
            fd,
            message,
            timeout,
            |fd, message, deadline| read_full(fd, message, deadline),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_write_message(
    fd: c_int,
    message: *mut RawMessage,
    timeout: *mut timeval,
) -> c_int {
    // SAFETY: module contract.
    unsafe {
        on_message(
            "tap_ctl_write_message",
            fd,
            message,
            timeout,
            |fd, message, deadline| write_full(fd, message, deadline),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_send_and_receive(
    fd: c_int,
    message: *mut RawMessage,
    timeout: *mut timeval,
) -> c_int {
    // SAFETY: module contract.
    unsafe {
        on_message(
            "tap_ctl_send_and_receive",
            fd,
            message,
            timeout,
            |fd, message, deadline| calls::send_and_receive(fd, message, &[], deadline),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_connect_send_and_receive(
    id: c_int,
    message: *mut RawMessage,
    timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_connect_send_and_receive", || {
        // SAFETY: module contract.
        let (message, timeout) = unsafe { (message_of(message)?, timeout_of(timeout)?) };
        calls::exchange(pid_of(id)?, message, &[], deadline_in(timeout)).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_connect_send_receive_ex(
    id: c_int,
    message: *mut RawMessage,
    logpath: *const c_char,
    key_size: u8,
    encryption_key: *const u8,
    timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_connect_send_receive_ex", || {
        // SAFETY: module contract (the key has `key_size` bytes when not NULL).
        let (message, timeout, logpath, key) = unsafe {
            (
                message_of(message)?,
                timeout_of(timeout)?,
                opt_str(logpath, "log path")?,
                (!encryption_key.is_null())
                    .then(|| std::slice::from_raw_parts(encryption_key, key_size.into())),
            )
        };
        let trailer = calls::trailer(message, logpath, key)?;
        calls::exchange(pid_of(id)?, message, &trailer, deadline_in(timeout)).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_socket_name(id: c_int) -> *mut c_char {
    let mut name = std::ptr::null_mut();
    entry("tap_ctl_socket_name", || {
        name = malloc_path(&calls::socket_name(pid_of(id)?))?;
        Ok(0)
    });
    name
}

// ---- lists -------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_list(list: *mut ListHead) -> c_int {
    entry("tap_ctl_list", || {
        if list.is_null() {
            return Err(null("list"));
        }
        // SAFETY: checked non-NULL; the caller's head, written before anything can fail.
        unsafe { init_head(list) };
        let rows = calls::list()?;
        // SAFETY: as above.
        unsafe { fill_list(list, &rows) }.map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_list_pid(pid: pid_t, list: *mut ListHead) -> c_int {
    entry("tap_ctl_list_pid", || {
        if list.is_null() {
            return Err(null("list"));
        }
        // SAFETY: checked non-NULL.
        unsafe { init_head(list) };
        let rows = calls::list_pid(pid_of(pid)?)?;
        // SAFETY: as above.
        unsafe { fill_list(list, &rows) }.map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_list_free(list: *mut ListHead) {
    // Freeing cannot panic; no catch needed.
    // SAFETY: module contract: a head tap_ctl_list filled, or one the caller initialised.
    unsafe { free_list(list) }
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_find_minor(driver: *const c_char, path: *const c_char) -> c_int {
    entry("tap_ctl_find_minor", || {
        // SAFETY: module contract.
        let (driver, path) = unsafe { (opt_str(driver, "type")?, opt_str(path, "path")?) };
        let minor = calls::find_minor(driver, path)?;
        c_int::try_from(minor).map_err(|_| Error::new(libc::ERANGE, format!("minor {minor}")))
    })
}

#[no_mangle]
pub unsafe extern "C" fn parse_params(
    params: *const c_char,
    driver: *mut *mut c_char,
    path: *mut *mut c_char,
) -> c_int {
    entry("parse_params", || {
        if driver.is_null() || path.is_null() {
            return Err(null("an out-parameter"));
        }
        // SAFETY: module contract.
        let params = unsafe { req_str(params, "params") }?;
        let (kind, location) = calls::parse_params(params)?;
        let kind = malloc_string(kind.as_bytes())?;
        let location = malloc_string(location.as_bytes()).inspect_err(|_| {
            // SAFETY: from malloc, not used again.
            unsafe { libc::free(kind.cast()) }
        })?;
        // SAFETY: checked non-NULL.
        unsafe {
            put(driver, kind);
            put(path, location);
        }
        Ok(0)
    })
}

/// The arguments of an OPEN from C: `strings` are params, secondary and log path.
unsafe fn open_args<'a>(
    strings: (*const c_char, *const c_char, *const c_char),
    flags: c_int,
    prt_minor: c_int,
    timeout: c_int,
    key: Option<secret::Key>,
) -> Result<OpenArgs<'a>> {
    let (params, secondary, logpath) = strings;
    // SAFETY: forwarded contract of this function's caller.
    unsafe {
        Ok(OpenArgs {
            params: req_str(params, "params")?,
            flags: u32::from_ne_bytes(flags.to_ne_bytes()),
            prt_minor,
            secondary: opt_str(secondary, "secondary")?,
            timeout,
            logpath: opt_str(logpath, "log path")?,
            key,
        })
    }
}

// ---- minors, tapdisks, VBDs ------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_allocate(minor: *mut c_int, devname: *mut *mut c_char) -> c_int {
    entry("tap_ctl_allocate", || {
        if minor.is_null() || devname.is_null() {
            return Err(null("an out-parameter"));
        }
        // SAFETY: checked non-NULL.
        unsafe { put(minor, -1) };
        let (allocated, marker) = calls::allocate()?;
        let name = malloc_path(&marker);
        let number = c_int::try_from(allocated);
        match (name, number) {
            (Ok(name), Ok(number)) => {
                // SAFETY: checked non-NULL.
                unsafe {
                    put(minor, number);
                    put(devname, name);
                }
                Ok(0)
            }
            (name, _) => {
                if let Ok(name) = name {
                    // SAFETY: from malloc, not used again.
                    unsafe { libc::free(name.cast()) };
                }
                let _ = calls::free(allocated);
                Err(Error::new(libc::ENOMEM, "returning the allocated minor"))
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_free(minor: c_int) -> c_int {
    entry("tap_ctl_free", || calls::free(minor_of(minor)?).map(|()| 0))
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_create(
    params: *const c_char,
    devname: *mut *mut c_char,
    flags: c_int,
    prt_minor: c_int,
    secondary: *mut c_char,
    timeout: c_int,
    logpath: *const c_char,
) -> c_int {
    entry("tap_ctl_create", || {
        if devname.is_null() {
            return Err(null("devname"));
        }
        let strings = (params, secondary.cast_const(), logpath);
        // SAFETY: module contract.
        let args = unsafe { open_args(strings, flags, prt_minor, timeout, None) }?;
        let device = calls::create(args)?;
        let name = malloc_path(&device)?;
        // SAFETY: checked non-NULL.
        unsafe { put(devname, name) };
        Ok(0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_destroy(
    id: c_int,
    minor: c_int,
    _force: c_int,
    timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_destroy", || {
        // SAFETY: module contract.
        let timeout = unsafe { timeout_of(timeout) }?;
        calls::destroy(pid_of(id)?, minor_of(minor)?, timeout).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_spawn() -> c_int {
    entry("tap_ctl_spawn", || {
        let pid = calls::spawn()?;
        c_int::try_from(pid).map_err(|_| Error::new(libc::ERANGE, format!("pid {pid}")))
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_get_pid(id: c_int) -> pid_t {
    entry("tap_ctl_get_pid", || {
        let pid = calls::get_pid(pid_of(id)?)?;
        pid_t::try_from(pid).map_err(|_| Error::new(libc::ERANGE, format!("pid {pid}")))
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_attach(id: c_int, minor: c_int) -> c_int {
    entry("tap_ctl_attach", || {
        calls::attach(pid_of(id)?, minor_of(minor)?).map(|()| 0)
    })
}

#[no_mangle]
pub extern "C" fn tap_ctl_detach(id: c_int, minor: c_int) -> c_int {
    entry("tap_ctl_detach", || {
        calls::detach(pid_of(id)?, minor_of(minor)?).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_open(
    id: c_int,
    minor: c_int,
    params: *const c_char,
    flags: c_int,
    prt_minor: c_int,
    secondary: *const c_char,
    timeout: c_int,
    logpath: *const c_char,
    key_size: u8,
    encryption_key: *mut u8,
) -> c_int {
    // The key is the library's to free, whatever happens next (as in the C library): copied
    // into locked memory, then wiped and freed.
    let key = (!encryption_key.is_null()).then(|| {
        // SAFETY: a non-NULL key has `key_size` bytes and came from malloc (header).
        unsafe {
            let bytes = std::slice::from_raw_parts_mut(encryption_key, key_size.into());
            let key = secret::Key::from_slice(bytes);
            bytes.fill(0);
            std::hint::black_box(&bytes);
            libc::free(encryption_key.cast());
            key
        }
    });
    entry("tap_ctl_open", || {
        let key = key
            .transpose()
            .map_err(|e| Error::new(libc::EINVAL, format!("encryption key: {e}")))?;
        let strings = (params, secondary, logpath);
        // SAFETY: module contract.
        let args = unsafe { open_args(strings, flags, prt_minor, timeout, key) }?;
        calls::open(pid_of(id)?, minor_of(minor)?, args).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_close(
    id: c_int,
    minor: c_int,
    force: c_int,
    timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_close", || {
        // SAFETY: module contract.
        let timeout = unsafe { timeout_of(timeout) }?;
        calls::close(pid_of(id)?, minor_of(minor)?, force != 0, timeout).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_pause(id: c_int, minor: c_int, timeout: *mut timeval) -> c_int {
    entry("tap_ctl_pause", || {
        // SAFETY: module contract.
        let timeout = unsafe { timeout_of(timeout) }?;
        calls::pause(pid_of(id)?, minor_of(minor)?, timeout).map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_unpause(
    id: c_int,
    minor: c_int,
    params: *const c_char,
    flags: c_int,
    secondary: *mut c_char,
    logpath: *const c_char,
) -> c_int {
    entry("tap_ctl_unpause", || {
        // SAFETY: module contract.
        let (params, secondary, logpath) = unsafe {
            (
                opt_str(params, "params")?,
                opt_str(secondary, "secondary")?,
                opt_str(logpath, "log path")?,
            )
        };
        let flags = u32::from_ne_bytes(flags.to_ne_bytes());
        calls::unpause(
            pid_of(id)?,
            minor_of(minor)?,
            params,
            flags,
            secondary,
            logpath,
        )
        .map(|()| 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_stats(
    pid: pid_t,
    minor: c_int,
    buf: *mut c_char,
    size: size_t,
) -> ssize_t {
    let status = entry("tap_ctl_stats", || {
        if buf.is_null() || size == 0 {
            return Err(Error::new(libc::EINVAL, "no room for the statistics"));
        }
        let text = calls::stats(pid_of(pid)?, minor)?;
        let len = text.len().min(size - 1);
        // SAFETY: `buf` has `size` writable bytes (module contract); `len < size`.
        unsafe {
            buf.cast::<u8>()
                .copy_from_nonoverlapping(text.as_ptr(), len);
            buf.add(len).write(0);
        }
        Ok(0)
    });
    ssize_t::try_from(status).unwrap_or(-ssize_t::try_from(libc::EIO).unwrap_or(5))
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_stats_fwrite(pid: pid_t, minor: c_int, out: *mut FILE) -> c_int {
    entry("tap_ctl_stats_fwrite", || {
        if out.is_null() {
            return Err(null("stream"));
        }
        let mut text = calls::stats(pid_of(pid)?, minor)?.into_bytes();
        text.push(b'\n');
        // SAFETY: `out` is an open stdio stream (module contract); `text` is readable.
        let written = unsafe { libc::fwrite(text.as_ptr().cast(), 1, text.len(), out) };
        if written != text.len() {
            return Err(Error::new(libc::EIO, "writing the statistics"));
        }
        Ok(0)
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tap_ctl_connect_xenblkif(
    pid: pid_t,
    domid: u16,
    devid: c_int,
    poll_duration: c_int,
    poll_idle_threshold: c_int,
    grefs: *const u32,
    order: c_int,
    port: u32,
    proto: c_int,
    pool: *const c_char,
    minor: c_int,
) -> c_int {
    entry("tap_ctl_connect_xenblkif", || {
        if grefs.is_null() {
            return Err(null("grefs"));
        }
        // The ring's grant references: one per page, 1 << order of them (at most GREF_COUNT).
        let order = u32::try_from(order)
            .ok()
            .filter(|order| *order <= tapdisk_proto::MAX_BLKIF_ORDER)
            .ok_or_else(|| {
                Error::new(libc::EINVAL, format!("ring order {order} is out of range"))
            })?;
        let pages = 1usize << order;
        let mut gref = [0u32; tapdisk_proto::GREF_COUNT];
        // SAFETY: grefs is non-NULL and, by the function's contract (as in the C library),
        // points at 1 << order grant references; order was checked against the array's size.
        gref[..pages].copy_from_slice(unsafe { std::slice::from_raw_parts(grefs, pages) });
        let number = |value: c_int, what: &str| {
            u32::try_from(value)
                .map_err(|_| Error::new(libc::EINVAL, format!("{what} {value} is negative")))
        };
        // SAFETY: a non-NULL pool is a NUL-terminated string (module contract).
        let pool = unsafe { opt_str(pool, "pool") }?.unwrap_or_default();
        let blkif = Blkif {
            domid: u32::from(domid),
            devid: number(devid, "devid")?,
            gref,
            order,
            proto: number(proto, "proto")?,
            pool: pool.to_owned(),
            port,
            poll_duration: number(poll_duration, "poll_duration")?,
            poll_idle_threshold: number(poll_idle_threshold, "poll_idle_threshold")?,
        };
        calls::connect_xenblkif(pid_of(pid)?, minor_of(minor)?, &blkif)?;
        Ok(0)
    })
}

/// The timeout is not used: the request has the library's usual deadline.
#[no_mangle]
pub extern "C" fn tap_ctl_disconnect_xenblkif(
    pid: pid_t,
    domid: u16,
    devid: c_int,
    _timeout: *mut timeval,
) -> c_int {
    entry("tap_ctl_disconnect_xenblkif", || {
        let devid = u32::try_from(devid)
            .map_err(|_| Error::new(libc::EINVAL, format!("devid {devid} is negative")))?;
        calls::disconnect_xenblkif(pid_of(pid)?, u32::from(domid), devid)?;
        Ok(0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_info(
    pid: pid_t,
    sectors: *mut c_ulonglong,
    sector_size: *mut c_uint,
    info: *mut c_uint,
    minor: c_int,
) -> c_int {
    entry("tap_ctl_info", || {
        if sectors.is_null() || sector_size.is_null() || info.is_null() {
            return Err(null("an out-parameter"));
        }
        let image = calls::info(pid_of(pid)?, minor_of(minor)?)?;
        // SAFETY: checked non-NULL.
        unsafe {
            put(sectors, image.sectors);
            put(sector_size, image.sector_size);
            put(info, image.info);
        }
        Ok(0)
    })
}

// ---- blktap-rs extensions --------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_set_control_dir(dir: *const c_char) -> c_int {
    // SAFETY: module contract.
    let dir = unsafe { opt_path(dir) };
    settings::set_control_dir(dir);
    0
}

#[no_mangle]
pub unsafe extern "C" fn tap_ctl_set_tapdisk(path: *const c_char) -> c_int {
    // SAFETY: module contract.
    let path = unsafe { opt_path(path) };
    settings::set_tapdisk(path);
    0
}
