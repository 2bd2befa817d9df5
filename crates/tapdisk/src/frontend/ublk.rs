//! The ublk block device (`/dev/ublkbN`). Not built yet.

use std::io;

use super::{BlockDevice, BlockDeviceContext};

/// True when the kernel offers ublk (`/dev/ublk-control`).
pub fn available() -> bool {
    std::path::Path::new("/dev/ublk-control").exists()
}

/// Adds and starts a ublk device serving the VBD.
pub async fn start(context: BlockDeviceContext) -> io::Result<Box<dyn BlockDevice>> {
    tracing::error!(
        minor = context.minor,
        "the ublk block device is not built yet"
    );
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
