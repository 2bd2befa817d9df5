//! Logging: to syslog (the `/dev/log` socket) when daemonised, to stderr with `-D`.
//!
//! Lines reach syslog as `<PRI>tapdisk[PID]: message` with facility `daemon`, so they show
//! up in the journal under the `tapdisk` identifier. If `/dev/log` is missing, lines are
//! dropped rather than blocking or failing the daemon.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// syslog facility `LOG_DAEMON`.
const FACILITY_DAEMON: u8 = 3 << 3;

fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Sends formatted lines to the local syslog socket.
#[derive(Debug, Clone)]
struct Syslog {
    socket: Option<Arc<UnixDatagram>>,
    ident: Arc<str>,
}

/// One log line being formatted; sent when dropped.
struct SyslogLine {
    syslog: Syslog,
    priority: u8,
    buf: Vec<u8>,
}

impl Write for SyslogLine {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let Some(socket) = &self.syslog.socket else {
            return;
        };
        let text = String::from_utf8_lossy(&self.buf);
        let line = format!(
            "<{}>{}: {}",
            self.priority,
            self.syslog.ident,
            text.trim_end()
        );
        // Logging must never fail the daemon: a full or absent syslog drops the line.
        let _ = socket.send(line.as_bytes());
    }
}

impl Syslog {
    fn line(&self, severity: u8) -> SyslogLine {
        SyslogLine {
            syslog: self.clone(),
            priority: FACILITY_DAEMON | severity,
            buf: Vec::new(),
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;

    fn make_writer(&'a self) -> Self::Writer {
        self.line(severity(&Level::INFO))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        self.line(severity(meta.level()))
    }
}

/// The filter for `directives` (checked by the configuration; `info` should they not parse).
fn filter(directives: &str) -> EnvFilter {
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr (foreground mode), what `directives` (a tracing filter) lets through.
pub fn init_stderr(directives: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Logs to syslog as `tapdisk[pid]`, what `directives` (a tracing filter) lets through.
pub fn init_syslog(pid: u32, directives: &str) {
    let socket = UnixDatagram::unbound().ok().and_then(|socket| {
        socket.connect("/dev/log").ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(Arc::new(socket))
    });
    let syslog = Syslog {
        socket,
        ident: Arc::from(format!("tapdisk[{pid}]")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(syslog)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_level(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_syslog_as_the_c_tapdisk_names_them() {
        let (ours, journal) = UnixDatagram::pair().unwrap();
        let syslog = Syslog {
            socket: Some(Arc::new(ours)),
            ident: Arc::from("tapdisk[4242]"),
        };
        let mut line = syslog.line(severity(&Level::WARN));
        line.write_all(b"vbd 0: request timed out\n").unwrap();
        drop(line);
        let mut buf = [0u8; 128];
        let len = journal.recv(&mut buf).unwrap();
        // Facility daemon (3) and severity warning (4): 3 * 8 + 4.
        assert_eq!(&buf[..len], b"<28>tapdisk[4242]: vbd 0: request timed out");
    }
}
