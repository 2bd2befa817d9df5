//! Loop devices through their ioctls (`linux/loop.h`): take a free device from
//! `/dev/loop-control`, bind a file to it with `LOOP_CONFIGURE` (Linux 5.8 and later), unbind
//! it with `LOOP_CLR_FD`, and read the kernel's view of a device from sysfs.
//!
//! The ioctl calls are the only `unsafe` code of the FUSE frontend; each one passes a file
//! descriptor owned by the caller and, where the ioctl takes a pointer, a pointer to a
//! `#[repr(C)]` value that lives across the call.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::error::FuseError;

/// `LOOP_CTL_GET_FREE`: returns the index of a free loop device, creating one if needed.
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
/// `LOOP_CLR_FD`: unbinds the backing file (at last close if others hold the device).
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
/// `LOOP_CONFIGURE`: binds a file and sets flags and block size in one step.
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;

/// `LO_FLAGS_READ_ONLY`.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_DIRECT_IO`.
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// How often attaching retries when another process takes the free device first.
const ATTACH_ATTEMPTS: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// A loop device bound to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `N` of `/dev/loopN`.
    pub index: u32,
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// True when the kernel accepted direct I/O on the backing file.
    pub direct_io: bool,
}

/// What to bind.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Ask for direct I/O on the backing file (no page cache in between).
    pub direct_io: bool,
    /// Logical block size of the device.
    pub block_size: u32,
}

/// `/dev/loopN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{index}"))
}

/// Asks `/dev/loop-control` for a free device index.
fn free_index() -> Result<u32, FuseError> {
    const CONTROL: &str = "/dev/loop-control";
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(CONTROL)
        .map_err(|e| FuseError::io("opening", CONTROL, e))?;
    // SAFETY: `control` is an open descriptor for the call's duration; LOOP_CTL_GET_FREE
    // takes no argument and returns an index or -1.
    let index = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if index < 0 {
        return Err(FuseError::io(
            "LOOP_CTL_GET_FREE on",
            CONTROL,
            io::Error::last_os_error(),
        ));
    }
    u32::try_from(index).map_err(|_| {
        FuseError::io(
            "LOOP_CTL_GET_FREE on",
            CONTROL,
            io::Error::from_raw_os_error(libc::EOVERFLOW),
        )
    })
}

/// Copies `name` into a NUL-terminated fixed array, truncated to fit.
fn file_name_field(name: &Path) -> [u8; 64] {
    let mut field = [0u8; 64];
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
    let len = bytes.len().min(field.len() - 1);
    field[..len].copy_from_slice(&bytes[..len]);
    field
}

fn configure(device: &File, backing: RawFd, name: &Path, flags: u32, block_size: u32) -> i32 {
    let config = LoopConfig {
        fd: u32::try_from(backing).unwrap_or(u32::MAX),
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name_field(name),
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `device` is an open loop device, `config` is a fully initialised
    // `struct loop_config` that outlives the call, and the kernel only reads it.
    unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_CONFIGURE,
            std::ptr::from_ref(&config),
        )
    }
}

/// Binds `backing` (opened by the caller, named `name` in the loop's metadata) to a free loop
/// device. If the kernel refuses direct I/O on the file, binds it without and says so in
/// [`LoopDevice::direct_io`].
pub fn attach(
    backing: &File,
    name: &Path,
    options: AttachOptions,
) -> Result<LoopDevice, FuseError> {
    let mut flags = if options.read_only {
        LO_FLAGS_READ_ONLY
    } else {
        0
    };
    if options.direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    let mut last_error = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..ATTACH_ATTEMPTS {
        let index = free_index()?;
        let path = device_path(index);
        let device = match OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(device) => device,
            // Removed by someone else between GET_FREE and open: take another.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last_error = e;
                continue;
            }
            Err(e) => return Err(FuseError::io("opening", path, e)),
        };
        let mut result = configure(
            &device,
            backing.as_raw_fd(),
            name,
            flags,
            options.block_size,
        );
        let mut error = io::Error::last_os_error();
        if result < 0
            && error.raw_os_error() == Some(libc::EINVAL)
            && flags & LO_FLAGS_DIRECT_IO != 0
        {
            tracing::warn!(
                "{}: the kernel refused direct I/O on {} ({error}); using buffered I/O",
                path.display(),
                name.display()
            );
            flags &= !LO_FLAGS_DIRECT_IO;
            result = configure(
                &device,
                backing.as_raw_fd(),
                name,
                flags,
                options.block_size,
            );
            error = io::Error::last_os_error();
        }
        if result == 0 {
            let direct_io = read_sysfs(index, "loop/dio").is_ok_and(|v| v.trim() == "1");
            return Ok(LoopDevice {
                index,
                path,
                direct_io,
            });
        }
        // EBUSY: another process bound this free device first; try the next one.
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(FuseError::io("LOOP_CONFIGURE", path, error));
        }
        last_error = error;
    }
    Err(FuseError::io(
        "finding a free loop device through",
        "/dev/loop-control",
        last_error,
    ))
}

/// Unbinds the loop device open as `device`. The kernel detaches at once when `device` is
/// its only opener, else at the last close.
pub fn clear(device: &File) -> io::Result<()> {
    // SAFETY: `device` is an open loop device descriptor; LOOP_CLR_FD takes no argument.
    let result = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `/sys/block/loopN/<name>`.
pub fn read_sysfs(index: u32, name: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/sys/block/loop{index}/{name}"))
}

/// The file bound to `/dev/loopN`, or `None` when the device is unbound.
pub fn backing_file(index: u32) -> Option<PathBuf> {
    read_sysfs(index, "loop/backing_file")
        .ok()
        .map(|text| PathBuf::from(text.trim_end_matches('\n')))
        .filter(|path| !path.as_os_str().is_empty())
}

/// Every bound loop device and its backing file.
pub fn bound_devices() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let index = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            Some((index, backing_file(index)?))
        })
        .collect();
    found.sort();
    found
}
