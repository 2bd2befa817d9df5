//! Socket hand-over: an already-connected client socket passed to the server over a UNIX
//! socket with `SCM_RIGHTS`, as the C tapdisk's fd receivers (`nbdserver<pid>.<minor>`)
//! take it during storage migration.
//!
//! The helper connects, sends one message whose data is a text id (the datapath name, for
//! logs) and whose ancillary data carries exactly one file descriptor, and closes. The
//! descriptor is a connected stream socket (UNIX or TCP) on which NBD is then served.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, sockopt, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;

/// Longest id accepted with a handed-over socket.
pub const MAX_ID_LEN: usize = 4096;

/// A socket received from a helper.
#[derive(Debug)]
pub enum ReceivedStream {
    /// A UNIX stream socket.
    Unix(tokio::net::UnixStream),
    /// A TCP socket.
    Tcp(tokio::net::TcpStream),
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Reading the helper's message failed.
    #[error("receiving the hand-over message: {0}")]
    Io(#[from] io::Error),
    /// The helper closed without sending anything.
    #[error("the helper closed the connection without sending a socket")]
    Empty,
    /// The message carried no descriptor, or more than one.
    #[error("the hand-over message carried {0} file descriptors, expected exactly one")]
    DescriptorCount(usize),
    /// The descriptor is not a stream socket we can serve.
    #[error("the handed-over descriptor is not a UNIX or TCP stream socket ({0})")]
    NotAStream(String),
}

/// Receives one socket and its id from `helper`.
pub async fn receive_stream(
    helper: &tokio::net::UnixStream,
) -> Result<(String, ReceivedStream), HandoverError> {
    let mut id = vec![0u8; MAX_ID_LEN];
    let (received, mut fds) = loop {
        helper.readable().await?;
        let attempt = helper.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut id)];
            let message = recvmsg(helper, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
                .map_err(io::Error::from)?;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = message {
                    fds.extend(rights);
                }
            }
            Ok((message.bytes, fds))
        });
        match attempt {
            Ok(result) => break result,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if received == 0 && fds.is_empty() {
        return Err(HandoverError::Empty);
    }
    if fds.len() != 1 {
        return Err(HandoverError::DescriptorCount(fds.len()));
    }
    let id = String::from_utf8_lossy(&id[..received])
        .trim_end_matches('\0')
        .to_owned();
    let fd = fds.remove(0);
    Ok((id, into_stream(fd)?))
}

fn into_stream(fd: OwnedFd) -> Result<ReceivedStream, HandoverError> {
    let kind = sockopt::socket_type(&fd)
        .map_err(|e| HandoverError::NotAStream(format!("not a socket: {e}")))?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(HandoverError::NotAStream(format!("socket type {kind:?}")));
    }
    let domain = sockopt::socket_domain(&fd)
        .map_err(|e| HandoverError::NotAStream(format!("socket domain: {e}")))?;
    if domain == AddressFamily::UNIX {
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(ReceivedStream::Unix(tokio::net::UnixStream::from_std(
            stream,
        )?))
    } else if domain == AddressFamily::INET || domain == AddressFamily::INET6 {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        Ok(ReceivedStream::Tcp(tokio::net::TcpStream::from_std(
            stream,
        )?))
    } else {
        Err(HandoverError::NotAStream(format!(
            "address family {domain:?}"
        )))
    }
}

/// Sends `socket` and `id` over `helper` (the client side of a hand-over; blocking).
pub fn send_stream(
    helper: &std::os::unix::net::UnixStream,
    id: &str,
    socket: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [socket];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("ancillary buffer too small"));
    }
    let data = if id.is_empty() { "\0" } else { id };
    let sent = sendmsg(
        helper.as_fd(),
        &[IoSlice::new(data.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(io::Error::from)?;
    if sent != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} id bytes", data.len()),
        ));
    }
    Ok(())
}
