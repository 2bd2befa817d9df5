//! What an `nbd:` locator names, in the order the C driver tries its forms, plus the
//! spelling the storage manager uses:
//!
//! 1. `unix:SOCKET` (SM's `nbd:unix:SOCKET:exportname=NAME`): a UNIX socket;
//! 2. the path of an existing UNIX socket;
//! 3. `HOST:PORT` (`[ADDRESS]:PORT` for IPv6): TCP;
//! 4. anything else: the id of a socket passed to this process's `nbdclient<pid>` socket
//!    (`vbd/7/xvda`, as xapi's storage migration names it).
//!
//! Forms 1 to 3 may end with `:exportname=NAME` (the export asked for; the default export
//! otherwise).

use std::path::{Path, PathBuf};

/// The suffix that names the export.
const EXPORT_NAME: &str = ":exportname=";

/// Where an `nbd:` image's server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// A UNIX socket to connect to.
    Unix {
        /// The socket.
        socket: PathBuf,
        /// The export asked for.
        export: String,
    },
    /// A TCP address to connect to.
    Tcp {
        /// Host name or address (without brackets).
        host: String,
        /// Port.
        port: u16,
        /// The export asked for.
        export: String,
    },
    /// A socket handed to this process over `nbdclient<pid>` under this id.
    Passed {
        /// The id it was passed with.
        id: String,
    },
}

impl NbdTarget {
    /// Whether the connection can be made again (an address), as opposed to a socket
    /// handed over once.
    pub fn can_reconnect(&self) -> bool {
        !matches!(self, Self::Passed { .. })
    }
}

/// `HOST:PORT` or `[ADDRESS]:PORT`, if `text` is one.
fn host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|port| *port != 0)?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6,
        None if host.contains(':') => return None,
        None => host,
    };
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some((host.to_owned(), port))
}

/// Reads `text` (the locator after `nbd:`); `is_socket` tells whether a path is an
/// existing UNIX socket.
pub fn parse(text: &str, is_socket: impl Fn(&Path) -> bool) -> Result<NbdTarget, String> {
    if text.is_empty() {
        return Err("an empty locator".into());
    }
    let (address, export) = match text.find(EXPORT_NAME) {
        Some(at) => (&text[..at], Some(&text[at + EXPORT_NAME.len()..])),
        None => (text, None),
    };
    let export_name = export.unwrap_or_default().to_owned();
    if let Some(socket) = address.strip_prefix("unix:") {
        if !socket.starts_with('/') {
            return Err(format!("the socket in '{text}' is not an absolute path"));
        }
        return Ok(NbdTarget::Unix {
            socket: PathBuf::from(socket),
            export: export_name,
        });
    }
    if address.starts_with('/') && is_socket(Path::new(address)) {
        return Ok(NbdTarget::Unix {
            socket: PathBuf::from(address),
            export: export_name,
        });
    }
    if let Some((host, port)) = host_port(address) {
        return Ok(NbdTarget::Tcp {
            host,
            port,
            export: export_name,
        });
    }
    if export.is_some() {
        return Err(format!("'{text}' names an export but no socket or address"));
    }
    Ok(NbdTarget::Passed {
        id: text.to_owned(),
    })
}

/// True when `path` is an existing UNIX socket.
pub fn is_unix_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with_socket(text: &str) -> Result<NbdTarget, String> {
        parse(text, |path| {
            path == Path::new("/run/blktap-control/nbd42.0")
        })
    }

    fn unix(socket: &str, export: &str) -> NbdTarget {
        NbdTarget::Unix {
            socket: socket.into(),
            export: export.into(),
        }
    }

    #[test]
    fn every_form() {
        assert_eq!(
            parse_with_socket("unix:/run/sm/nbd/vdi.sock:exportname=vdi-1"),
            Ok(unix("/run/sm/nbd/vdi.sock", "vdi-1"))
        );
        assert_eq!(
            parse_with_socket("unix:/run/x.sock"),
            Ok(unix("/run/x.sock", ""))
        );
        // The export name is the rest, whatever it holds.
        assert_eq!(
            parse_with_socket("unix:/a:b.sock:exportname=x:y"),
            Ok(unix("/a:b.sock", "x:y"))
        );
        assert_eq!(
            parse_with_socket("/run/blktap-control/nbd42.0"),
            Ok(unix("/run/blktap-control/nbd42.0", ""))
        );
        assert_eq!(
            parse_with_socket("10.0.0.1:10809"),
            Ok(NbdTarget::Tcp {
                host: "10.0.0.1".into(),
                port: 10809,
                export: String::new()
            })
        );
        assert_eq!(
            parse_with_socket("[fd00::1]:10809:exportname=disk"),
            Ok(NbdTarget::Tcp {
                host: "fd00::1".into(),
                port: 10809,
                export: "disk".into()
            })
        );
        assert_eq!(
            parse_with_socket("backup.example:10809"),
            Ok(NbdTarget::Tcp {
                host: "backup.example".into(),
                port: 10809,
                export: String::new()
            })
        );
        // xapi's datapath ids, and anything else: a passed socket.
        for id in [
            "vbd/7/xvda",
            "vbd/0b7a4f1c-76c4-4e9b-a5b8-0d8a7f4bd2a9/6f1f6d2e-8d67-4d8e-9d8c-1c1a9b9b9b9b",
            "/run/not-a-socket",
            "host:notaport",
            "host:0",
            "host:99999",
            "fd00::1:10809",
            "a/b:80",
        ] {
            assert_eq!(
                parse_with_socket(id),
                Ok(NbdTarget::Passed { id: id.into() }),
                "{id}"
            );
        }
        assert!(!parse_with_socket("vbd/7/xvda").unwrap().can_reconnect());
        assert!(parse_with_socket("h:1").unwrap().can_reconnect());
    }

    #[test]
    fn malformed() {
        assert!(parse_with_socket("").is_err());
        assert!(parse_with_socket("unix:relative.sock").is_err());
        assert!(parse_with_socket("vbd/7/xvda:exportname=x").is_err());
    }

    #[test]
    fn sockets_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(is_unix_socket(&socket));
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(!is_unix_socket(&file));
        assert!(!is_unix_socket(&dir.path().join("missing")));
    }
}
