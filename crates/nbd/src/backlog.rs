//! How much a UNIX-socket client has not read yet: the signal for holding replies back.
//!
//! Linux reports, for a UNIX stream socket, the memory of the messages we sent that the
//! peer has not consumed (`SIOCOUTQ`, counted in buffer size, not payload bytes). While a
//! client still has several replies to read, sending it one more message per reply only
//! costs it more: every message is a buffer its `recv` must free. The transmission loop
//! therefore gathers replies while the backlog is deep and sends them as one message.
//!
//! The probe also tells when the client has read more: Linux signals a UNIX socket
//! writable each time the peer frees a message it has read and the backlog is then under a
//! quarter of the send buffer (52 KiB by default; a deeper backlog is signalled once it
//! drains below that, at the latest when it is empty), so a held reply waits for the
//! client's reading, never for a timer.
//!
//! The `unsafe` blocks of this crate live here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

use futures_util::FutureExt;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A handle for asking how much the peer of a UNIX stream socket has left unread.
#[derive(Debug)]
pub(crate) struct PeerBacklog {
    /// A duplicate of the socket's descriptor, for the ioctl.
    socket: OwnedFd,
    /// Another duplicate, registered for write readiness only, made the first time a
    /// caller waits ([`Self::watch`]): until then the peer's reads cost it nothing extra
    /// (every registration is one more callback each time it frees a message). `None`: it
    /// could not be registered.
    reads: OnceLock<Option<AsyncFd<OwnedFd>>>,
}

impl PeerBacklog {
    /// Probes `socket` (a connected UNIX stream socket) through a duplicate of its
    /// descriptor, so the probe stays valid however the stream itself is wrapped.
    pub(crate) fn of(socket: &impl AsFd) -> io::Result<Self> {
        Ok(Self {
            socket: socket.as_fd().try_clone_to_owned()?,
            reads: OnceLock::new(),
        })
    }

    /// Makes sure [`Self::read_more`] can tell when the peer reads (registering with the
    /// tokio runtime the first time; must then be called within one). False if it cannot:
    /// then nothing should wait for the peer.
    pub(crate) fn watch(&self) -> bool {
        self.reads
            .get_or_init(|| {
                let duplicate = self.socket.try_clone().ok()?;
                // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is
                // dropped, and the `AsyncFd` owns it, so the descriptor outlives the
                // registration.
                unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE) }
                    .inspect_err(|error| tracing::debug!(%error, "cannot watch the client's reads"))
                    .ok()
            })
            .is_some()
    }

    /// Buffer memory of sent messages the peer has not read. Also arms [`Self::read_more`]
    /// (once watched): it completes on the first read by the peer after this call.
    pub(crate) fn unread(&self) -> io::Result<usize> {
        if let Some(Some(reads)) = self.reads.get() {
            if let Some(Ok(mut ready)) = reads.writable().now_or_never() {
                ready.clear_ready();
            }
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) stores one `c_int` through its argument,
        // which points at `queued`, alive and writable for the whole call; the descriptor
        // is owned by `self` and so open.
        let rc = unsafe {
            libc::ioctl(
                self.socket.as_raw_fd(),
                libc::TIOCOUTQ,
                std::ptr::addr_of_mut!(queued),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(queued).unwrap_or(0))
    }

    /// Completes once the peer has read a message since the last [`Self::unread`]. It may
    /// also complete without such a read (the first time, for the socket's writability when
    /// the watch began), so the caller looks at [`Self::unread`] again rather than assume.
    /// Without a watch ([`Self::watch`] false or not called) it completes at once.
    pub(crate) async fn read_more(&self) {
        let Some(Some(reads)) = self.reads.get() else {
            return;
        };
        if let Ok(mut ready) = reads.writable().await {
            // Consumed: the next call waits for a newer signal.
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[tokio::test]
    async fn unread_grows_with_sent_messages_and_drops_when_read() {
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let backlog = PeerBacklog::of(&ours).unwrap();
        assert_eq!(backlog.unread().unwrap(), 0);
        ours.write_all(&[7u8; 4096]).unwrap();
        let one = backlog.unread().unwrap();
        assert!(
            one >= 4096,
            "one message counts at least its payload: {one}"
        );
        ours.write_all(&[7u8; 4096]).unwrap();
        assert!(backlog.unread().unwrap() > one);
        let mut sink = [0u8; 8192];
        peer.read_exact(&mut sink).unwrap();
        assert_eq!(backlog.unread().unwrap(), 0);
    }

    #[tokio::test]
    async fn read_more_waits_for_the_peer_to_read() {
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let backlog = PeerBacklog::of(&ours).unwrap();
        assert!(backlog.watch());
        // The registration reports the socket writable once; take that first.
        tokio::time::timeout(Duration::from_secs(10), backlog.read_more())
            .await
            .expect("the initial writability is reported");
        ours.write_all(&[1u8; 4096]).unwrap();
        ours.write_all(&[2u8; 4096]).unwrap();
        assert!(backlog.unread().unwrap() > 0);
        let waiting = tokio::time::timeout(Duration::from_millis(50), backlog.read_more()).await;
        assert!(waiting.is_err(), "nothing was read yet");
        let reader = std::thread::spawn(move || {
            let mut first = [0u8; 4096];
            peer.read_exact(&mut first).unwrap();
            peer
        });
        tokio::time::timeout(Duration::from_secs(10), backlog.read_more())
            .await
            .expect("a read by the peer wakes the waiter");
        drop(reader.join().unwrap());
    }
}
