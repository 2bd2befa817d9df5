//! XCP-ng's live commit of a qcow2 VBD (control messages 31-36): start a commit job, query
//! its progress, cancel it.

use tapdisk_proto::{Body, Message, MessageType, OpenFlags, Params};

use crate::ipc::{check_reply, request, Connection};
use crate::ops::cookie;
use crate::{ControlDir, Error, Result};

/// A commit job's state as `query` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    /// qemu's job status name (`undefined` when there is no job).
    pub status: String,
    /// Bytes copied.
    pub current: u64,
    /// Bytes to copy.
    pub total: u64,
}

/// Starts committing `path` (the VBD's active layer) into the bottom of its chain; returns
/// once the job is created.
pub fn commit(dir: &ControlDir, pid: u32, minor: u32, path: &str) -> Result<()> {
    let params = Params {
        path: path.to_owned(),
        ..Params::default()
    };
    let message = Message::new(MessageType::Commit, cookie(minor)?, Body::Params(params));
    request(dir, pid, &message, &[], None).map(drop)
}

/// The progress of VBD `minor`'s commit job.
pub fn query(dir: &ControlDir, pid: u32, minor: u32) -> Result<CommitStatus> {
    let message = Message::new(MessageType::QueryCommitJob, cookie(minor)?, Body::Empty);
    let reply = request(dir, pid, &message, &[], None)?;
    match reply.body {
        Body::Query(query) => Ok(CommitStatus {
            status: query.status,
            current: query.current_progress,
            total: query.total_progress,
        }),
        other => Err(Error::new(
            libc::EPROTO,
            format!(
                "tapdisk {pid} answered QUERY_COMMIT_JOB with body {:?}",
                other.kind()
            ),
        )),
    }
}

/// Cancels VBD `minor`'s commit job; with `wait`, tapdisk answers once it has stopped. As
/// the C client, an ERROR reply is `EINVAL` ("unexpected result").
pub fn cancel(dir: &ControlDir, pid: u32, minor: u32, wait: bool) -> Result<()> {
    let params = Params {
        flags: OpenFlags(u32::from(wait)),
        ..Params::default()
    };
    let message = Message::new(
        MessageType::CancelCommitJob,
        cookie(minor)?,
        Body::Params(params),
    );
    let mut conn = Connection::connect(dir, pid, None)?;
    conn.send(&message, &[])?;
    let reply = conn.receive()?;
    if reply.msg_type == MessageType::Error {
        let detail = match &reply.body {
            Body::Response { message, .. } if !message.is_empty() => format!(": {message}"),
            _ => String::new(),
        };
        return Err(Error::new(
            libc::EINVAL,
            format!("tapdisk {pid} gave an unexpected result 'error' to CANCEL_COMMIT_JOB{detail}"),
        ));
    }
    check_reply(
        pid,
        MessageType::CancelCommitJob,
        MessageType::CancelCommitJobRsp,
        reply,
    )
    .map(drop)
}
