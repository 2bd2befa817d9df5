//! The FUSE + loop block device: the disk exported as a single file through FUSE and attached
//! to a loop device, for kernels without ublk. Not built yet.

use std::io;

use super::{BlockDevice, BlockDeviceContext};

/// True when `/dev/fuse` exists.
pub fn available() -> bool {
    std::path::Path::new("/dev/fuse").exists()
}

/// Starts the FUSE export and its loop device.
pub async fn start(context: BlockDeviceContext) -> io::Result<Box<dyn BlockDevice>> {
    tracing::error!(
        minor = context.minor,
        "the FUSE block device is not built yet"
    );
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
