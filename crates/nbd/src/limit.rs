//! Caps on live connections, and how a connection beyond a cap is turned away.
//!
//! Every connection costs the server descriptors and memory whether or not it ever sends a
//! request, so a client that opens connections and parks them could take all of a process's
//! descriptors. A [`ConnectionLimit`] counts the connections of the servers it is given to
//! (all the sockets of one export, say); limits nest ([`ConnectionLimit::within`]: one per
//! export inside one per process), and a connection needs a place in each.
//!
//! A connection beyond a cap is told so where the protocol allows it: in the newstyle
//! handshake its first option is answered `NBD_REP_ERR_POLICY` with a message the client
//! can print (`EXPORT_NAME`, which has no error reply, just closes); an old-style
//! connection is closed before its greeting. At most [`MAX_REFUSING`] such conversations
//! run at once per limit, each for at most [`REFUSAL_TIMEOUT`]; beyond that a connection is
//! closed at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto;

/// Refusal conversations at once per limit.
pub const MAX_REFUSING: usize = 16;

/// Longest a refused client is talked to.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// A cap on live connections, shared by the servers it is given to.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// What is limited, for the refusal message (`"this export"`, `"this tapdisk"`).
    scope: String,
    max: usize,
    live: AtomicUsize,
    refusing: AtomicUsize,
    parent: Option<Arc<ConnectionLimit>>,
}

/// One connection's place in a limit and in each of its parents; freed when dropped.
#[derive(Debug)]
pub struct Place {
    limits: Vec<Arc<ConnectionLimit>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        for limit in &self.limits {
            limit.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A place among the connections being refused (bounded separately from live ones); freed when dropped.
#[derive(Debug)]
pub struct Refusal {
    limit: Arc<ConnectionLimit>,
    /// What the client is told.
    pub message: String,
}

impl Drop for Refusal {
    fn drop(&mut self) {
        self.limit.refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one unit of `counter` if it is below `max`.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl ConnectionLimit {
    /// At most `max` connections in `scope` (named in the refusal message).
    pub fn new(scope: impl Into<String>, max: usize) -> Arc<Self> {
        Arc::new(Self {
            scope: scope.into(),
            max,
            live: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            parent: None,
        })
    }

    /// At most `max` connections in `scope`, each also counted in `self`.
    pub fn within(self: &Arc<Self>, scope: impl Into<String>, max: usize) -> Arc<Self> {
        Arc::new(Self {
            scope: scope.into(),
            max,
            live: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            parent: Some(Arc::clone(self)),
        })
    }

    /// Connections holding a place now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The most connections allowed.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection, or (when this limit or a parent is full) the
    /// refusal to send it: `Err(None)` when even refusals are at their cap.
    pub fn admit(self: &Arc<Self>) -> Result<Place, Option<Refusal>> {
        let mut place = Place { limits: Vec::new() };
        let mut limit = Some(self);
        while let Some(current) = limit {
            if !take(&current.live, current.max) {
                drop(place);
                return Err(current.refusal());
            }
            place.limits.push(Arc::clone(current));
            limit = current.parent.as_ref();
        }
        Ok(place)
    }

    /// A refusal conversation slot, if one is free.
    fn refusal(self: &Arc<Self>) -> Option<Refusal> {
        if !take(&self.refusing, MAX_REFUSING) {
            return None;
        }
        Some(Refusal {
            limit: Arc::clone(self),
            message: format!(
                "too many connections to {} (at most {}): try again later",
                self.scope, self.max
            ),
        })
    }
}

/// Options a refused client may send before it is closed on.
const MAX_REFUSED_OPTIONS: usize = 16;

/// Turns away a newstyle client: greeting, client flags, then every option answered with
/// `NBD_REP_ERR_POLICY` and the reason, until the client aborts (acknowledged) or sends
/// `EXPORT_NAME` (which has no error reply: closed). Clients negotiate other options first
/// (structured replies, metadata contexts) and go on after an error there, so refusing only
/// the first option would close on them before they hear why; after the refused `GO` they
/// abort. Bounded by [`REFUSAL_TIMEOUT`] and a cap of 16 refused options.
pub async fn refuse_newstyle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, refusal: &Refusal) {
    let conversation = async {
        stream.write_all(&proto::server_greeting()).await?;
        stream.flush().await?;
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).await?;
        let mut data = Vec::new();
        let mut out = Vec::with_capacity(128);
        for _ in 0..MAX_REFUSED_OPTIONS {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            stream.read_exact(&mut header).await?;
            let header = proto::OptionHeader::parse(&header)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            // parse() bounds the length by the protocol's maximum option size.
            data.resize(usize::try_from(header.length).unwrap_or(0), 0);
            stream.read_exact(&mut data).await?;
            out.clear();
            match header.option {
                proto::OPT_EXPORT_NAME => break,
                proto::OPT_ABORT => {
                    proto::encode_option_reply(&mut out, header.option, proto::REP_ACK, &[]);
                }
                option => proto::encode_option_error(
                    &mut out,
                    option,
                    proto::REP_ERR_POLICY,
                    &refusal.message,
                ),
            }
            stream.write_all(&out).await?;
            stream.flush().await?;
            if header.option == proto::OPT_ABORT {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, conversation).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_nest_and_free_on_drop() {
        let process = ConnectionLimit::new("this tapdisk", 3);
        let export_a = process.within("export a", 2);
        let export_b = process.within("export b", 2);
        let a1 = export_a.admit().unwrap();
        let _a2 = export_a.admit().unwrap();
        let refused = export_a.admit().unwrap_err().expect("a refusal slot");
        assert!(
            refused.message.contains("export a (at most 2)"),
            "{}",
            refused.message
        );
        let _b1 = export_b.admit().unwrap();
        // The process-wide cap is reached although export b has room.
        let refused = export_b.admit().unwrap_err().expect("a refusal slot");
        assert!(refused.message.contains("this tapdisk (at most 3)"));
        assert_eq!(export_b.live(), 1, "a refused connection holds no place");
        drop(a1);
        assert_eq!((process.live(), export_a.live()), (2, 1));
        let _b2 = export_b.admit().unwrap();
        assert_eq!(process.live(), 3);
    }

    #[test]
    fn refusals_are_capped_too() {
        let limit = ConnectionLimit::new("x", 0);
        let refusals: Vec<Refusal> = (0..MAX_REFUSING)
            .map(|_| limit.admit().unwrap_err().unwrap())
            .collect();
        assert!(limit.admit().unwrap_err().is_none());
        drop(refusals);
        assert!(limit.admit().unwrap_err().is_some());
    }
}
