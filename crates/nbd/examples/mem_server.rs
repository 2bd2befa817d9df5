//! Serve a RAM disk over NBD on a UNIX socket, for manual testing and benchmarks:
//! `cargo run --release -p nbd --example mem_server -- /tmp/nbd.sock 256` (size in MiB),
//! then e.g. `nbdinfo nbd+unix:///?socket=/tmp/nbd.sock`. Stops on Ctrl-C.

use std::io;
use std::sync::{Arc, RwLock};

use nbd::{Export, ExportInfo, NbdServer, ServerConfig};

struct RamDisk {
    data: RwLock<Vec<u8>>,
}

impl RamDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(22))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        Ok(start..end)
    }
}

impl Export for RamDisk {
    type Buffer = Vec<u8>;

    fn buffer(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    fn info(&self) -> ExportInfo {
        let size = self.data.read().unwrap_or_else(|e| e.into_inner()).len();
        let mut info = ExportInfo::new(u64::try_from(size).unwrap_or(0));
        info.can_flush = true;
        info.can_multi_conn = true;
        info.description = Some("mem_server example RAM disk".into());
        info
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let range = self.range(offset, buf.len())?;
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let source = data
            .get(range)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        buf.copy_from_slice(source);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let range = self.range(offset, data.len())?;
        let mut disk = self.data.write().unwrap_or_else(|e| e.into_inner());
        disk.get_mut(range)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?
            .copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().unwrap_or_else(|| "/tmp/nbd-mem.sock".into());
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let disk = Arc::new(RamDisk {
        data: RwLock::new(vec![0; mib << 20]),
    });
    let server = NbdServer::start(listener, disk, ServerConfig::default());
    println!("serving {mib} MiB at nbd+unix:///?socket={socket}");
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
