//! Sockets handed to this tapdisk for `nbd:` images: the `<ctl dir>/nbdclient<pid>` socket
//! and what it keeps.
//!
//! xapi's storage migration connects to the destination, then hands the connected socket
//! to the source tapdisk: it connects to `nbdclient<pid>`, sends one message whose data is a
//! text id (the datapath, `vbd/<domid>/<device>`) and whose `SCM_RIGHTS` carry the socket,
//! and closes. An `nbd:<id>` image opened later takes the socket by that id. As the C
//! tapdisk does: one connection carries one (id, socket); ids are compared on their first
//! [`ID_COMPARED`] bytes; at most [`MAX_PASSED`] sockets are kept (a new one under an id
//! already kept replaces it, one more beyond that is closed and logged); an image takes its
//! socket out, and gives it back under the same id when closed, so a pause and unpause
//! (SM's snapshots during a migration) finds it again. Unlike the C driver, what is given
//! back is the live, negotiated connection, so the next open needs no new handshake.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nbd::client::Client;
use nbd::handover::{self, ReceivedStream};

use crate::iobuf::IoBuf;

/// Sockets kept at most (the C stack's `N_PASSED_FDS`).
pub const MAX_PASSED: usize = 10;
/// Bytes of an id that count when ids are compared (the C stack keeps 40 with the NUL).
pub const ID_COMPARED: usize = 39;
/// How long a helper may take to send its message.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A kept socket.
#[derive(Debug)]
pub enum PassedSocket {
    /// As received: not negotiated yet.
    Fresh(ReceivedStream),
    /// Given back by a closed image: negotiated and ready.
    Live(Client<IoBuf>),
}

/// True when two ids are the same for the C stack (`strncmp(a, b, 39)`).
pub fn same_id(a: &str, b: &str) -> bool {
    let cut = |id: &str| id.as_bytes()[..id.len().min(ID_COMPARED)].to_vec();
    cut(a) == cut(b)
}

/// The sockets this process keeps, by id.
#[derive(Debug, Default)]
pub struct PassedSockets {
    kept: Mutex<Vec<(String, PassedSocket)>>,
}

impl PassedSockets {
    fn kept(&self) -> MutexGuard<'_, Vec<(String, PassedSocket)>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `socket` under `id`, replacing (and closing) one kept under the same id. When
    /// [`MAX_PASSED`] others are kept already, `socket` is closed and `false` returned.
    pub fn keep(&self, id: &str, socket: PassedSocket) -> bool {
        let mut kept = self.kept();
        if let Some(slot) = kept.iter_mut().find(|(kept_id, _)| same_id(kept_id, id)) {
            tracing::info!(id, "a socket passed under this id replaces the one kept");
            *slot = (id.to_owned(), socket);
            return true;
        }
        if kept.len() >= MAX_PASSED {
            tracing::error!(
                id,
                "{MAX_PASSED} passed sockets are kept already: closing the new one"
            );
            return false;
        }
        kept.push((id.to_owned(), socket));
        true
    }

    /// Takes the socket kept under `id` out.
    pub fn take(&self, id: &str) -> Option<PassedSocket> {
        let mut kept = self.kept();
        let at = kept.iter().position(|(kept_id, _)| same_id(kept_id, id))?;
        Some(kept.remove(at).1)
    }

    /// The ids kept, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.kept().iter().map(|(id, _)| id.clone()).collect()
    }

    /// Receives sockets on `listener` (the `nbdclient<pid>` socket) until the task is
    /// dropped: one helper at a time, each within 10 s.
    pub async fn receive(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let helper = match listener.accept().await {
                Ok((helper, _)) => helper,
                Err(error) => {
                    tracing::warn!(%error, "nbdclient: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let received =
                tokio::time::timeout(RECEIVE_TIMEOUT, handover::receive_stream(&helper)).await;
            drop(helper);
            match received {
                Ok(Ok((id, stream))) => {
                    tracing::info!(%id, "nbdclient: received a socket");
                    self.keep(&id, PassedSocket::Fresh(stream));
                }
                Ok(Err(error)) => tracing::warn!(%error, "nbdclient: hand-over failed"),
                Err(_) => {
                    tracing::warn!("nbdclient: the helper sent nothing within {RECEIVE_TIMEOUT:?}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> PassedSocket {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        PassedSocket::Fresh(ReceivedStream::Unix(
            tokio::net::UnixStream::from_std(a).unwrap(),
        ))
    }

    #[test]
    fn ids_compare_on_39_bytes() {
        assert!(same_id("vbd/7/xvda", "vbd/7/xvda"));
        assert!(!same_id("vbd/7/xvda", "vbd/7/xvdb"));
        assert!(!same_id("vbd/7/xvda", "vbd/7/xvda2"));
        let long = "vbd/0b7a4f1c-76c4-4e9b-a5b8-0d8a7f4bd2a9/6f1f6d2e";
        let other = "vbd/0b7a4f1c-76c4-4e9b-a5b8-0d8a7f4bd2a9/ffffffff";
        assert!(same_id(long, other), "two disks of one VM collide, as in C");
        assert!(same_id(long, &long[..39]));
        assert!(!same_id(long, &long[..38]));
    }

    #[tokio::test]
    async fn keeps_ten_replaces_by_id_and_takes_out() {
        let sockets = PassedSockets::default();
        for i in 0..MAX_PASSED {
            assert!(sockets.keep(&format!("vbd/{i}/xvda"), stream()));
        }
        assert!(!sockets.keep("vbd/99/xvda", stream()));
        assert!(sockets.keep("vbd/3/xvda", stream()), "same id: replaced");
        assert_eq!(sockets.ids().len(), MAX_PASSED);
        assert!(sockets.take("vbd/3/xvda").is_some());
        assert!(sockets.take("vbd/3/xvda").is_none());
        assert!(sockets.keep("vbd/99/xvda", stream()));
        assert_eq!(
            sockets.ids().last().map(String::as_str),
            Some("vbd/99/xvda")
        );
    }

    #[tokio::test]
    async fn receives_sockets_as_xapi_sends_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbdclient1");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let sockets = Arc::new(PassedSockets::default());
        let receiver = tokio::spawn(Arc::clone(&sockets).receive(listener));
        let send = |id: &'static str| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
                let helper = std::os::unix::net::UnixStream::connect(&path).unwrap();
                handover::send_stream(&helper, id, std::os::fd::AsFd::as_fd(&ours)).unwrap();
            })
        };
        send("vbd/7/xvda").await.unwrap();
        send("vbd/7/xvdb").await.unwrap();
        // A helper that connects and sends nothing holds nobody up for long.
        let idle = std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(idle);
        for _ in 0..200 {
            if sockets.ids().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sockets.ids(), ["vbd/7/xvda", "vbd/7/xvdb"]);
        assert!(matches!(
            sockets.take("vbd/7/xvdb"),
            Some(PassedSocket::Fresh(ReceivedStream::Unix(_)))
        ));
        receiver.abort();
    }
}
