//! Shared test helpers: an in-memory [`Export`] (a `Vec<u8>` behind a mutex) and a
//! harness that runs an [`NbdServer`] on a UNIX socket in a temporary directory.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd::proto::{STATE_HOLE, STATE_ZERO};
use nbd::{Export, ExportInfo, Extent, NbdServer, ServerConfig, WriteZeroesFlags};

/// Granularity of the in-memory export's block status answers.
pub const MAP_BLOCK: u64 = 64 * 1024;

/// A RAM disk with every optional feature; optionally read-only, optionally stalling
/// reads at one offset until released.
pub struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub info: ExportInfo,
    pub flushes: AtomicUsize,
    /// Reads at this offset wait until the notify fires.
    pub stall_read_at: Option<u64>,
    pub release: tokio::sync::Notify,
}

impl MemExport {
    pub fn new(size: usize) -> Self {
        let mut info = ExportInfo::new(size as u64);
        info.can_flush = true;
        info.can_trim = true;
        info.can_write_zeroes = true;
        info.can_fast_zero = true;
        info.can_cache = true;
        info.can_multi_conn = true;
        info.description = Some("in-memory test disk".into());
        Self {
            data: Mutex::new(vec![0; size]),
            info,
            flushes: AtomicUsize::new(0),
            stall_read_at: None,
            release: tokio::sync::Notify::new(),
        }
    }

    pub fn with_info(mut self, edit: impl FnOnce(&mut ExportInfo)) -> Self {
        edit(&mut self.info);
        self
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.info.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(to_usize(offset)..to_usize(end)),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }
}

impl Export for MemExport {
    type Buffer = Vec<u8>;

    fn buffer(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        if self.stall_read_at == Some(offset) {
            self.release.notified().await;
        }
        let range = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[range]);
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let range = self.range(offset, data.len() as u64)?;
        self.data.lock().unwrap()[range].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let range = self.range(offset, len)?;
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: WriteZeroesFlags,
    ) -> io::Result<()> {
        let range = self.range(offset, len)?;
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let range = self.range(offset, len)?;
        let data = self.data.lock().unwrap();
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = range.start as u64;
        let end = range.end as u64;
        while pos < end {
            let next = ((pos / MAP_BLOCK) + 1) * MAP_BLOCK;
            let stop = next.min(end);
            let zero = data[to_usize(pos)..to_usize(stop)].iter().all(|&b| b == 0);
            let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += stop - pos,
                _ => extents.push(Extent {
                    length: stop - pos,
                    flags,
                }),
            }
            pos = stop;
        }
        Ok(extents)
    }
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).expect("test sizes fit in usize")
}

/// A server on a UNIX socket in its own temporary directory, on its own runtime.
pub struct Harness {
    pub runtime: tokio::runtime::Runtime,
    pub server: Option<NbdServer>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Harness {
    pub fn start<E: Export>(export: Arc<E>, config: ServerConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = runtime.block_on(async {
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            NbdServer::start(listener, export, config)
        });
        Self {
            runtime,
            server: Some(server),
            dir,
            socket,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn connections(&self) -> usize {
        self.server.as_ref().unwrap().connections()
    }

    pub fn stop(mut self) {
        let server = self.server.take().unwrap();
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), server.shutdown())
                .await
                .expect("shutdown finished in time");
        });
    }
}

/// Whether an external tool is installed; prints a skip message when not.
pub fn have_tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("SKIP: {name} is not installed");
    }
    found
}

/// Run a command with a timeout in `dir` (so tools' scratch files stay in the test's
/// temporary directory), returning (success, stdout, stderr).
pub fn run_in(dir: &Path, program: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new("timeout");
    cmd.current_dir(dir).arg("120").arg(program).args(args);
    let output = cmd.output().expect("spawn command");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}
