//! The control protocol spoken between `tap-ctl` and a `tapdisk` daemon over its
//! `AF_UNIX` control socket: a pure (I/O-free) encoder and decoder for `tapdisk_message_t`.
//!
//! # Wire format
//!
//! Every request and every reply is one fixed-size record of [`MESSAGE_SIZE`] (544) bytes in
//! the native x86_64 C layout, little-endian, with no framing:
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 2 | `type` ([`MessageType`]) |
//! | 2 | 2 | `cookie`: the minor (VBD id); [`COOKIE_ALL`] means "all" for LIST/STATS |
//! | 4 | 4 | padding (written as zero, ignored when read) |
//! | 8 | 536 | `union u`, the member chosen by the type (see [`body_kind`]) |
//!
//! Union members, with offsets relative to byte 8:
//!
//! * `tapdisk_pid`: `i32` @0 ([`Body::Pid`]).
//! * `image`: `u64 sectors` @0, `u32 sector_size` @8, `u32 info` @12 ([`ImageInfo`]).
//! * `params`: `u32 flags` @0, `u32 devnum` @4, `u32 domid` @8, `char path[256]` @12,
//!   `u32 prt_devnum` @268, `u16 req_timeout` @272, `char secondary[256]` @274 ([`Params`]).
//! * `response`: `i32 error` @0 (positive errno), `char message[256]` @4 ([`Body::Response`]).
//! * `minors`: `i32 count` @0, `i32 list[63]` @4 ([`Minors`]).
//! * `list`: `i32 count` @0, `i32 minor` @4, `i32 state` @8, `char path[256]` @12
//!   ([`ListEntry`]).
//! * `info`: `u16 type` @0, `u16 cookie` @2, `u64 length` @8 ([`StatInfo`]).
//! * `blkif`: `u32 domid` @0, `u32 devid` @4, `u32 gref[8]` @8, `u32 order` @40,
//!   `u32 proto` @44, `char pool[256]` @48, `u32 port` @304, `u32 poll_duration` @308,
//!   `u32 poll_idle_threshold` @312 ([`Blkif`]).
//! * `query`: `u64 current_progress` @0, `u64 total_progress` @8, `char status[256]` @16
//!   ([`Query`]).
//!
//! Absolute offsets of every field are in [`layout`]. Character arrays hold a NUL-terminated
//! UTF-8 string; bytes after the NUL are ignored on decode and written as zero on encode.
//! Every byte the encoder does not fill is zero.
//!
//! Two payloads may follow an OPEN or RESUME request on the same stream: a fixed
//! [`LOG_PATH_PAYLOAD_LEN`]-byte log path when [`OpenFlags::ADD_LOG`] is set
//! ([`encode_log_path`]), then for OPEN with [`OpenFlags::OPEN_ENCRYPTED`] a one-byte key size
//! followed by the key ([`encode_key`]), then for OPEN with [`OpenFlags::OPEN_OPTIONS`] (a
//! blktap-rs extension) a fixed [`OPEN_OPTIONS_PAYLOAD_LEN`]-byte text of per-VBD options
//! ([`encode_open_options`]). A STATS_RSP is followed by [`StatInfo::length`] bytes of text.
//!
//! # Guarantees
//!
//! [`Message::decode`] never panics; it rejects anything the C daemon could not have meant
//! (unknown type, unterminated strings, impossible counts, ...) with a [`DecodeError`] that names
//! the field and its absolute offset. [`Message::encode`] rejects exactly the values that decode
//! would reject, so a message that encodes successfully always decodes back to itself.
//!
//! # The image argument
//!
//! `params.path` of OPEN and RESUME names the image as `TYPE:LOCATOR`; [`image`] parses it
//! into an [`ImageSpec`], whose locator is a local path for file-backed types and verbatim
//! text for the others (`nbd:unix:SOCKET:exportname=NAME`, `rbd:pool/image`).

pub mod image;
pub mod layout;

pub use image::{ImageLocator, ImageSpec, ImageSpecError};

use layout::{
    read_c_string, read_i32, read_u16, read_u32, read_u64, write_c_string, write_i32, write_u16,
    write_u32, write_u64,
};

/// Size in bytes of one `tapdisk_message_t` on x86_64.
pub const MESSAGE_SIZE: usize = 544;
/// Size of every `char[]` field of the message (`params.path`, `params.secondary`,
/// `response.message`, `list.path`, `blkif.pool`, `query.status`) and of the log path payload.
pub const PATH_LEN: usize = 256;
/// Cookie meaning "every VBD" for LIST and STATS.
pub const COOKIE_ALL: u16 = 0xFFFF;
/// Size of the log-path payload that follows OPEN/RESUME when [`OpenFlags::ADD_LOG`] is set.
pub const LOG_PATH_PAYLOAD_LEN: usize = 256;
/// Size of the open-options payload ([`OpenFlags::OPEN_OPTIONS`]): NUL-terminated UTF-8.
pub const OPEN_OPTIONS_PAYLOAD_LEN: usize = 256;
/// Capacity of `minors.list`.
pub const MAX_MINORS: usize = 63;
/// Largest encryption key the server accepts, in bytes (the smallest is 1).
pub const MAX_KEY_SIZE: usize = 128;
/// Largest STATS_RSP text length accepted by the decoder (64 MiB).
pub const MAX_STATS_LENGTH: u64 = 64 * 1024 * 1024;
/// Largest `blkif.order` (a ring of `1 << order` pages, at most 8).
pub const MAX_BLKIF_ORDER: u32 = 3;
/// Number of grant references in `blkif.gref`.
pub const GREF_COUNT: usize = 8;
/// `params.prt_devnum` value meaning "no parent minor" (`-1` in C).
pub const NO_PARENT_DEVNUM: u32 = u32::MAX;
/// `blkif.proto`: native ring ABI.
pub const BLKIF_PROTOCOL_NATIVE: u32 = 1;
/// `blkif.proto`: 32-bit x86 guest ring ABI.
pub const BLKIF_PROTOCOL_X86_32: u32 = 2;
/// `blkif.proto`: 64-bit x86 guest ring ABI.
pub const BLKIF_PROTOCOL_X86_64: u32 = 3;
/// The errno reported for any malformed request (`EINVAL` on Linux).
pub const EINVAL: i32 = 22;

/// Message type (`type` field at offset 0), numbered as in XCP-ng's `tapdisk-message.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    Error = 1,
    RuntimeError = 2,
    Pid = 3,
    PidRsp = 4,
    Attach = 5,
    AttachRsp = 6,
    Open = 7,
    OpenRsp = 8,
    Pause = 9,
    PauseRsp = 10,
    Resume = 11,
    ResumeRsp = 12,
    Close = 13,
    CloseRsp = 14,
    Detach = 15,
    DetachRsp = 16,
    ListMinors = 17,
    ListMinorsRsp = 18,
    List = 19,
    ListRsp = 20,
    Stats = 21,
    StatsRsp = 22,
    ForceShutdown = 23,
    XenblkifConnect = 24,
    XenblkifConnectRsp = 25,
    XenblkifDisconnect = 26,
    XenblkifDisconnectRsp = 27,
    DiskInfo = 28,
    DiskInfoRsp = 29,
    Exit = 30,
    Commit = 31,
    CommitRsp = 32,
    QueryCommitJob = 33,
    QueryCommitJobRsp = 34,
    CancelCommitJob = 35,
    CancelCommitJobRsp = 36,
    /// blktap-rs extension: ask which kernel block device serves a VBD.
    BlockDevice = 64,
    /// blktap-rs extension: the block device path (empty when the VBD has none).
    BlockDeviceRsp = 65,
    /// blktap-rs extension: serve a VBD's NBD export on TCP; `u.string` holds
    /// `ADDRESS tls=CERTDIR` or `ADDRESS plain`.
    NbdListen = 66,
    /// blktap-rs extension: the bound TCP address (`u.string`).
    NbdListenRsp = 67,
}

impl MessageType {
    /// Every message type, in numeric order.
    pub const ALL: [MessageType; 40] = [
        Self::Error,
        Self::RuntimeError,
        Self::Pid,
        Self::PidRsp,
        Self::Attach,
        Self::AttachRsp,
        Self::Open,
        Self::OpenRsp,
        Self::Pause,
        Self::PauseRsp,
        Self::Resume,
        Self::ResumeRsp,
        Self::Close,
        Self::CloseRsp,
        Self::Detach,
        Self::DetachRsp,
        Self::ListMinors,
        Self::ListMinorsRsp,
        Self::List,
        Self::ListRsp,
        Self::Stats,
        Self::StatsRsp,
        Self::ForceShutdown,
        Self::XenblkifConnect,
        Self::XenblkifConnectRsp,
        Self::XenblkifDisconnect,
        Self::XenblkifDisconnectRsp,
        Self::DiskInfo,
        Self::DiskInfoRsp,
        Self::Exit,
        Self::Commit,
        Self::CommitRsp,
        Self::QueryCommitJob,
        Self::QueryCommitJobRsp,
        Self::CancelCommitJob,
        Self::CancelCommitJobRsp,
        Self::BlockDevice,
        Self::BlockDeviceRsp,
        Self::NbdListen,
        Self::NbdListenRsp,
    ];

    /// The upper-case protocol name, e.g. `"OPEN"` or `"LIST_RSP"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::RuntimeError => "RUNTIME_ERROR",
            Self::Pid => "PID",
            Self::PidRsp => "PID_RSP",
            Self::Attach => "ATTACH",
            Self::AttachRsp => "ATTACH_RSP",
            Self::Open => "OPEN",
            Self::OpenRsp => "OPEN_RSP",
            Self::Pause => "PAUSE",
            Self::PauseRsp => "PAUSE_RSP",
            Self::Resume => "RESUME",
            Self::ResumeRsp => "RESUME_RSP",
            Self::Close => "CLOSE",
            Self::CloseRsp => "CLOSE_RSP",
            Self::Detach => "DETACH",
            Self::DetachRsp => "DETACH_RSP",
            Self::ListMinors => "LIST_MINORS",
            Self::ListMinorsRsp => "LIST_MINORS_RSP",
            Self::List => "LIST",
            Self::ListRsp => "LIST_RSP",
            Self::Stats => "STATS",
            Self::StatsRsp => "STATS_RSP",
            Self::ForceShutdown => "FORCE_SHUTDOWN",
            Self::XenblkifConnect => "XENBLKIF_CONNECT",
            Self::XenblkifConnectRsp => "XENBLKIF_CONNECT_RSP",
            Self::XenblkifDisconnect => "XENBLKIF_DISCONNECT",
            Self::XenblkifDisconnectRsp => "XENBLKIF_DISCONNECT_RSP",
            Self::DiskInfo => "DISK_INFO",
            Self::DiskInfoRsp => "DISK_INFO_RSP",
            Self::Exit => "EXIT",
            Self::Commit => "COMMIT",
            Self::CommitRsp => "COMMIT_RSP",
            Self::QueryCommitJob => "QUERY_COMMIT_JOB",
            Self::QueryCommitJobRsp => "QUERY_COMMIT_JOB_RSP",
            Self::CancelCommitJob => "CANCEL_COMMIT_JOB",
            Self::CancelCommitJobRsp => "CANCEL_COMMIT_JOB_RSP",
            Self::BlockDevice => "BLOCK_DEVICE",
            Self::BlockDeviceRsp => "BLOCK_DEVICE_RSP",
            Self::NbdListen => "NBD_LISTEN",
            Self::NbdListenRsp => "NBD_LISTEN_RSP",
        }
    }

    /// The type for a wire value: 1..=36 (the C stack's and XCP-ng's types) and the
    /// blktap-rs extensions 64..=67; `None` for anything else.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.as_u16() == v)
    }

    /// The wire value of this type.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The reply a server sends when this request succeeds, or `None` if this type is not a
    /// request that has a success reply (replies, ERROR, RUNTIME_ERROR, EXIT). FORCE_SHUTDOWN
    /// is answered with CLOSE_RSP, like CLOSE.
    pub fn success_reply(self) -> Option<Self> {
        Some(match self {
            Self::Pid => Self::PidRsp,
            Self::Attach => Self::AttachRsp,
            Self::Open => Self::OpenRsp,
            Self::Pause => Self::PauseRsp,
            Self::Resume => Self::ResumeRsp,
            Self::Close | Self::ForceShutdown => Self::CloseRsp,
            Self::Detach => Self::DetachRsp,
            Self::ListMinors => Self::ListMinorsRsp,
            Self::List => Self::ListRsp,
            Self::Stats => Self::StatsRsp,
            Self::XenblkifConnect => Self::XenblkifConnectRsp,
            Self::XenblkifDisconnect => Self::XenblkifDisconnectRsp,
            Self::DiskInfo => Self::DiskInfoRsp,
            Self::Commit => Self::CommitRsp,
            Self::QueryCommitJob => Self::QueryCommitJobRsp,
            Self::CancelCommitJob => Self::CancelCommitJobRsp,
            Self::BlockDevice => Self::BlockDeviceRsp,
            Self::NbdListen => Self::NbdListenRsp,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u16> for MessageType {
    type Error = DecodeError;

    fn try_from(value: u16) -> Result<Self, DecodeError> {
        Self::from_u16(value).ok_or(DecodeError::UnknownType { value })
    }
}

impl From<MessageType> for u16 {
    fn from(t: MessageType) -> u16 {
        t.as_u16()
    }
}

/// Open flags (`TAPDISK_MESSAGE_FLAG_*`) carried in `params.flags`. Unknown bits are kept
/// as they are, so a decoded value re-encodes byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct OpenFlags(pub u32);

impl OpenFlags {
    /// Open the image shared (`-s`).
    pub const SHARED: Self = Self(0x001);
    /// Open read-only (`-r`).
    pub const RDONLY: Self = Self(0x002);
    /// Add a read cache layer (`-R`).
    pub const ADD_CACHE: Self = Self(0x004);
    /// Use a VHD index (`-i`).
    pub const VHD_INDEX: Self = Self(0x008);
    /// A changed-block-tracking log path follows the message (`-C`).
    pub const ADD_LOG: Self = Self(0x010);
    /// Add a local cache layer (`-l`).
    pub const ADD_LCACHE: Self = Self(0x020);
    /// Reuse the parent minor's cache (`-e`).
    pub const REUSE_PRT: Self = Self(0x040);
    /// Mirror writes to `params.secondary` (`-2`).
    pub const SECONDARY: Self = Self(0x080);
    /// The secondary is a standby mirror (`-s` with `-2`).
    pub const STANDBY: Self = Self(0x100);
    /// Do not open with `O_DIRECT` (`-D`).
    pub const NO_O_DIRECT: Self = Self(0x200);
    /// An encryption key follows the message (`-E`).
    pub const OPEN_ENCRYPTED: Self = Self(0x400);
    /// Union of every flag the C stack defines.
    pub const KNOWN: Self = Self(0x7FF);
    /// blktap-rs extension: serve no kernel block device (NBD only).
    pub const BLOCKDEV_NONE: Self = Self(0x1_0000);
    /// blktap-rs extension: serve the VBD as a ublk block device.
    pub const BLOCKDEV_UBLK: Self = Self(0x2_0000);
    /// blktap-rs extension: serve the VBD as a FUSE file attached to a loop device.
    pub const BLOCKDEV_FUSE: Self = Self(0x4_0000);
    /// The block-device choice bits; none set means "automatic" (ublk, else FUSE + loop).
    pub const BLOCKDEV_MASK: Self = Self(0x7_0000);
    /// blktap-rs extension: re-attach to the ublk device of this minor that outlived its
    /// tapdisk (`tap-ctl recover`) instead of creating one; an empty path reopens the image the
    /// previous tapdisk recorded in `<ctl dir>/vbd-<minor>`.
    pub const BLOCKDEV_RECOVER: Self = Self(0x8_0000);
    /// blktap-rs extension: serve a kernel block device, whichever this host has (ublk, else
    /// FUSE + loop): the explicit `tap-ctl -b auto`.
    pub const BLOCKDEV_AUTO: Self = Self(0x10_0000);
    /// blktap-rs extension: no block device was chosen for this `tap-ctl create`; tapdisk
    /// applies its site default for creates (built in: auto). Without any of the
    /// [`OpenFlags::BLOCKDEV_CHOICE`] bits (C clients, `tap-ctl open` without `-b`), tapdisk
    /// applies its site default for opens (built in: none, as the C stack).
    pub const BLOCKDEV_CREATE_DEFAULT: Self = Self(0x20_0000);
    /// Every bit that chooses the block device: [`OpenFlags::BLOCKDEV_MASK`],
    /// [`OpenFlags::BLOCKDEV_AUTO`] and [`OpenFlags::BLOCKDEV_CREATE_DEFAULT`]; at most one may
    /// be set.
    pub const BLOCKDEV_CHOICE: Self = Self(0x37_0000);
    /// blktap-rs extension: per-VBD open options follow the message (after the log path and
    /// the key, if any) as an [`OPEN_OPTIONS_PAYLOAD_LEN`]-byte text ([`encode_open_options`]).
    pub const OPEN_OPTIONS: Self = Self(0x40_0000);

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// True if every bit of `other` is set in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets every bit of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Clears every bit of `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }

    /// The raw bit pattern.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// True if no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits not covered by [`OpenFlags::KNOWN`].
    pub fn unknown(self) -> Self {
        Self(self.0 & !Self::KNOWN.0)
    }
}

impl std::ops::BitOr for OpenFlags {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for OpenFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

/// `u.params`: OPEN, RESUME, COMMIT and CANCEL_COMMIT_JOB requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params {
    pub flags: OpenFlags,
    pub devnum: u32,
    pub domid: u32,
    /// `"type:/path"` of the image (empty on RESUME means "reopen the same image").
    pub path: String,
    /// Parent minor for [`OpenFlags::REUSE_PRT`]; [`NO_PARENT_DEVNUM`] (`u32::MAX`) = none.
    pub prt_devnum: u32,
    /// Request timeout in seconds; 0 = the daemon's default.
    pub req_timeout: u16,
    /// `"type:/path"` of the secondary (mirror) image, or empty.
    pub secondary: String,
}

/// `u.image`: geometry returned by OPEN_RSP and DISK_INFO_RSP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageInfo {
    pub sectors: u64,
    pub sector_size: u32,
    /// `VDISK_*` bits.
    pub info: u32,
}

/// `u.list`: one LIST_RSP record. The stream ends with a record whose `count` is 0.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListEntry {
    /// Number of records still to come including this one; 0 terminates the stream.
    pub count: i32,
    /// The VBD's minor, -1 in the terminator.
    pub minor: i32,
    pub state: i32,
    /// `"type:/path"`, or empty.
    pub path: String,
}

/// `u.info`: STATS_RSP header; `length` bytes of text follow the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatInfo {
    pub msg_type: u16,
    pub cookie: u16,
    pub length: u64,
}

/// `u.blkif`: XENBLKIF_CONNECT and XENBLKIF_DISCONNECT requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Blkif {
    pub domid: u32,
    pub devid: u32,
    pub gref: [u32; GREF_COUNT],
    /// The ring spans `1 << order` pages; at most [`MAX_BLKIF_ORDER`] (the daemon answers a
    /// larger order with `EINVAL`; the codec carries any value).
    pub order: u32,
    /// One of [`BLKIF_PROTOCOL_NATIVE`], [`BLKIF_PROTOCOL_X86_32`], [`BLKIF_PROTOCOL_X86_64`]
    /// (the daemon answers others with `EPROTONOSUPPORT`; the codec carries any value).
    pub proto: u32,
    pub pool: String,
    pub port: u32,
    pub poll_duration: u32,
    pub poll_idle_threshold: u32,
}

/// `u.minors`: LIST_MINORS_RSP. On the wire `count` says how many of the 63 slots are used;
/// encode requires `list.len() == count`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Minors {
    pub count: i32,
    pub list: Vec<i32>,
}

/// `u.query`: QUERY_COMMIT_JOB_RSP progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Query {
    pub current_progress: u64,
    pub total_progress: u64,
    pub status: String,
}

/// Which union member a message type carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKind {
    Empty,
    Pid,
    Image,
    Params,
    Response,
    Minors,
    List,
    Stat,
    Blkif,
    Query,
    /// `u.string`: one 256-byte string.
    Text,
}

/// The union member carried by messages of type `t`.
pub fn body_kind(t: MessageType) -> BodyKind {
    use MessageType as T;
    match t {
        T::Error | T::RuntimeError | T::DetachRsp => BodyKind::Response,
        T::PidRsp => BodyKind::Pid,
        T::Open | T::Resume | T::Commit | T::CancelCommitJob => BodyKind::Params,
        T::OpenRsp | T::DiskInfoRsp => BodyKind::Image,
        T::ListMinorsRsp => BodyKind::Minors,
        T::ListRsp => BodyKind::List,
        T::StatsRsp => BodyKind::Stat,
        T::XenblkifConnect | T::XenblkifDisconnect => BodyKind::Blkif,
        T::QueryCommitJobRsp => BodyKind::Query,
        T::BlockDeviceRsp | T::NbdListen | T::NbdListenRsp => BodyKind::Text,
        T::Pid
        | T::Attach
        | T::AttachRsp
        | T::Pause
        | T::PauseRsp
        | T::ResumeRsp
        | T::Close
        | T::CloseRsp
        | T::Detach
        | T::ListMinors
        | T::List
        | T::Stats
        | T::ForceShutdown
        | T::XenblkifConnectRsp
        | T::XenblkifDisconnectRsp
        | T::DiskInfo
        | T::Exit
        | T::CommitRsp
        | T::QueryCommitJob
        | T::CancelCommitJobRsp
        | T::BlockDevice => BodyKind::Empty,
    }
}

/// The decoded union member of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Empty,
    Pid(i32),
    Image(ImageInfo),
    Params(Params),
    /// `error` is a positive errno (0 = success, used by DETACH_RSP).
    Response {
        error: i32,
        message: String,
    },
    Minors(Minors),
    List(ListEntry),
    Stat(StatInfo),
    Blkif(Blkif),
    Query(Query),
    /// A NUL-terminated string in the 256-byte `u.string` member.
    Text(String),
}

impl Body {
    /// Which union member this body is.
    pub fn kind(&self) -> BodyKind {
        match self {
            Self::Empty => BodyKind::Empty,
            Self::Pid(_) => BodyKind::Pid,
            Self::Image(_) => BodyKind::Image,
            Self::Params(_) => BodyKind::Params,
            Self::Response { .. } => BodyKind::Response,
            Self::Minors(_) => BodyKind::Minors,
            Self::List(_) => BodyKind::List,
            Self::Stat(_) => BodyKind::Stat,
            Self::Blkif(_) => BodyKind::Blkif,
            Self::Query(_) => BodyKind::Query,
            Self::Text(_) => BodyKind::Text,
        }
    }
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_type: MessageType,
    /// The minor the message is about, or [`COOKIE_ALL`].
    pub cookie: u16,
    pub body: Body,
}

/// Why a received buffer is not a valid message or payload.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{what} is {actual} bytes, expected exactly {expected}")]
    WrongLength {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("unknown message type {value} in field type at offset 0 (valid: 1..=36, 64..=65)")]
    UnknownType { value: u16 },
    #[error("unterminated string in {field} at offset {offset}: no NUL within {PATH_LEN} bytes")]
    UnterminatedString { field: &'static str, offset: usize },
    #[error(
        "invalid UTF-8 in {field} at offset {offset} (first bad byte at offset {byte_offset})"
    )]
    InvalidUtf8 {
        field: &'static str,
        offset: usize,
        byte_offset: usize,
    },
    #[error("{field} at offset {offset} is {value}, allowed {allowed}")]
    OutOfRange {
        field: &'static str,
        offset: usize,
        value: i128,
        allowed: &'static str,
    },
    #[error(
        "encryption key size {value} in key_size at payload offset 0, allowed 1..={MAX_KEY_SIZE}"
    )]
    KeySize { value: u8 },
}

impl DecodeError {
    /// The errno a server answers a malformed request with: always `EINVAL` (22).
    pub fn errno(&self) -> i32 {
        EINVAL
    }
}

/// Why a message or payload cannot be put on the wire.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{msg_type} carries a {expected:?} body, got {actual:?}")]
    BodyMismatch {
        msg_type: MessageType,
        expected: BodyKind,
        actual: BodyKind,
    },
    #[error("{field} at offset {offset} is {len} bytes, at most {max} fit with the NUL")]
    StringTooLong {
        field: &'static str,
        offset: usize,
        len: usize,
        max: usize,
    },
    #[error("{field} at offset {offset} contains a NUL at string position {position}")]
    InteriorNul {
        field: &'static str,
        offset: usize,
        position: usize,
    },
    #[error("minors.list at offset 12 has {len} entries, at most {MAX_MINORS} fit")]
    TooManyMinors { len: usize },
    #[error("minors.count at offset 8 is {count} but minors.list has {len} entries")]
    MinorsCountMismatch { count: i32, len: usize },
    #[error("{field} at offset {offset} is {value}, allowed {allowed}")]
    OutOfRange {
        field: &'static str,
        offset: usize,
        value: i128,
        allowed: &'static str,
    },
    #[error("encryption key is {len} bytes, allowed 1..={MAX_KEY_SIZE}")]
    KeyLength { len: usize },
}

/// A numeric field holding a value the protocol does not allow; converted into the
/// `OutOfRange` variant of either error type.
struct RangeViolation {
    field: &'static str,
    offset: usize,
    value: i128,
    allowed: &'static str,
}

impl From<RangeViolation> for DecodeError {
    fn from(v: RangeViolation) -> Self {
        Self::OutOfRange {
            field: v.field,
            offset: v.offset,
            value: v.value,
            allowed: v.allowed,
        }
    }
}

impl From<RangeViolation> for EncodeError {
    fn from(v: RangeViolation) -> Self {
        Self::OutOfRange {
            field: v.field,
            offset: v.offset,
            value: v.value,
            allowed: v.allowed,
        }
    }
}

fn check_minors_count(count: i32) -> Result<usize, RangeViolation> {
    usize::try_from(count)
        .ok()
        .filter(|&n| n <= MAX_MINORS)
        .ok_or(RangeViolation {
            field: "minors.count",
            offset: layout::MINORS_COUNT,
            value: i128::from(count),
            allowed: "0..=63",
        })
}

/// Checks the numeric fields that have a restricted range; shared by encode and decode so
/// that both accept exactly the same messages.
fn check_ranges(body: &Body) -> Result<(), RangeViolation> {
    match body {
        Body::Response { error, .. } if *error < 0 => Err(RangeViolation {
            field: "response.error",
            offset: layout::RESPONSE_ERROR,
            value: i128::from(*error),
            allowed: ">= 0 (a positive errno)",
        }),
        Body::Minors(minors) => check_minors_count(minors.count).map(drop),
        Body::List(entry) if entry.count < 0 => Err(RangeViolation {
            field: "list.count",
            offset: layout::LIST_COUNT,
            value: i128::from(entry.count),
            allowed: ">= 0",
        }),
        Body::Stat(stat) if stat.length > MAX_STATS_LENGTH => Err(RangeViolation {
            field: "info.length",
            offset: layout::STAT_LENGTH,
            value: i128::from(stat.length),
            allowed: "0..=67108864 (64 MiB)",
        }),
        _ => Ok(()),
    }
}

impl Message {
    /// A message of type `msg_type` about minor `cookie`.
    pub fn new(msg_type: MessageType, cookie: u16, body: Body) -> Self {
        Self {
            msg_type,
            cookie,
            body,
        }
    }

    /// An ERROR reply carrying the positive errno `errno`, as the daemon sends when a handler
    /// fails.
    pub fn error(cookie: u16, errno: i32) -> Self {
        Self::new(
            MessageType::Error,
            cookie,
            Body::Response {
                error: errno,
                message: String::new(),
            },
        )
    }

    /// Serialises the message into its 544-byte wire form.
    ///
    /// Fails if the body is not the member [`body_kind`] assigns to the type, a string does
    /// not fit its field with its NUL or contains a NUL, the minors list is inconsistent, or a
    /// numeric field holds a value [`Message::decode`] would reject.
    pub fn encode(&self) -> Result<[u8; MESSAGE_SIZE], EncodeError> {
        let expected = body_kind(self.msg_type);
        let actual = self.body.kind();
        if expected != actual {
            return Err(EncodeError::BodyMismatch {
                msg_type: self.msg_type,
                expected,
                actual,
            });
        }
        if let Body::Minors(minors) = &self.body {
            if minors.list.len() > MAX_MINORS {
                return Err(EncodeError::TooManyMinors {
                    len: minors.list.len(),
                });
            }
        }
        check_ranges(&self.body)?;

        let mut buf = [0u8; MESSAGE_SIZE];
        write_u16(&mut buf, layout::TYPE, self.msg_type.as_u16());
        write_u16(&mut buf, layout::COOKIE, self.cookie);
        match &self.body {
            Body::Empty => {}
            Body::Pid(pid) => write_i32(&mut buf, layout::PID, *pid),
            Body::Image(image) => {
                write_u64(&mut buf, layout::IMAGE_SECTORS, image.sectors);
                write_u32(&mut buf, layout::IMAGE_SECTOR_SIZE, image.sector_size);
                write_u32(&mut buf, layout::IMAGE_INFO, image.info);
            }
            Body::Params(params) => {
                write_u32(&mut buf, layout::PARAMS_FLAGS, params.flags.bits());
                write_u32(&mut buf, layout::PARAMS_DEVNUM, params.devnum);
                write_u32(&mut buf, layout::PARAMS_DOMID, params.domid);
                write_c_string(
                    &mut buf,
                    layout::PARAMS_PATH,
                    PATH_LEN,
                    &params.path,
                    "params.path",
                )?;
                write_u32(&mut buf, layout::PARAMS_PRT_DEVNUM, params.prt_devnum);
                write_u16(&mut buf, layout::PARAMS_REQ_TIMEOUT, params.req_timeout);
                write_c_string(
                    &mut buf,
                    layout::PARAMS_SECONDARY,
                    PATH_LEN,
                    &params.secondary,
                    "params.secondary",
                )?;
            }
            Body::Response { error, message } => {
                write_i32(&mut buf, layout::RESPONSE_ERROR, *error);
                write_c_string(
                    &mut buf,
                    layout::RESPONSE_MESSAGE,
                    PATH_LEN,
                    message,
                    "response.message",
                )?;
            }
            Body::Minors(minors) => {
                let count_matches =
                    usize::try_from(minors.count).is_ok_and(|n| n == minors.list.len());
                if !count_matches {
                    return Err(EncodeError::MinorsCountMismatch {
                        count: minors.count,
                        len: minors.list.len(),
                    });
                }
                write_i32(&mut buf, layout::MINORS_COUNT, minors.count);
                for (index, minor) in minors.list.iter().enumerate() {
                    write_i32(&mut buf, layout::MINORS_LIST + 4 * index, *minor);
                }
            }
            Body::List(entry) => {
                write_i32(&mut buf, layout::LIST_COUNT, entry.count);
                write_i32(&mut buf, layout::LIST_MINOR, entry.minor);
                write_i32(&mut buf, layout::LIST_STATE, entry.state);
                write_c_string(
                    &mut buf,
                    layout::LIST_PATH,
                    PATH_LEN,
                    &entry.path,
                    "list.path",
                )?;
            }
            Body::Stat(stat) => {
                write_u16(&mut buf, layout::STAT_TYPE, stat.msg_type);
                write_u16(&mut buf, layout::STAT_COOKIE, stat.cookie);
                write_u64(&mut buf, layout::STAT_LENGTH, stat.length);
            }
            Body::Blkif(blkif) => {
                write_u32(&mut buf, layout::BLKIF_DOMID, blkif.domid);
                write_u32(&mut buf, layout::BLKIF_DEVID, blkif.devid);
                for (index, gref) in blkif.gref.iter().enumerate() {
                    write_u32(&mut buf, layout::BLKIF_GREF + 4 * index, *gref);
                }
                write_u32(&mut buf, layout::BLKIF_ORDER, blkif.order);
                write_u32(&mut buf, layout::BLKIF_PROTO, blkif.proto);
                write_c_string(
                    &mut buf,
                    layout::BLKIF_POOL,
                    PATH_LEN,
                    &blkif.pool,
                    "blkif.pool",
                )?;
                write_u32(&mut buf, layout::BLKIF_PORT, blkif.port);
                write_u32(&mut buf, layout::BLKIF_POLL_DURATION, blkif.poll_duration);
                write_u32(
                    &mut buf,
                    layout::BLKIF_POLL_IDLE_THRESHOLD,
                    blkif.poll_idle_threshold,
                );
            }
            Body::Query(query) => {
                write_u64(&mut buf, layout::QUERY_CURRENT, query.current_progress);
                write_u64(&mut buf, layout::QUERY_TOTAL, query.total_progress);
                write_c_string(
                    &mut buf,
                    layout::QUERY_STATUS,
                    PATH_LEN,
                    &query.status,
                    "query.status",
                )?;
            }
            Body::Text(text) => {
                write_c_string(&mut buf, layout::STRING_TEXT, PATH_LEN, text, "string.text")?;
            }
        }
        Ok(buf)
    }

    /// Parses one message; `buf` must be exactly [`MESSAGE_SIZE`] bytes. Padding bytes and
    /// the union bytes of types without a body are ignored.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        if buf.len() != MESSAGE_SIZE {
            return Err(DecodeError::WrongLength {
                what: "control message",
                expected: MESSAGE_SIZE,
                actual: buf.len(),
            });
        }
        let msg_type = MessageType::try_from(read_u16(buf, layout::TYPE))?;
        let cookie = read_u16(buf, layout::COOKIE);
        let body = match body_kind(msg_type) {
            BodyKind::Empty => Body::Empty,
            BodyKind::Pid => Body::Pid(read_i32(buf, layout::PID)),
            BodyKind::Image => Body::Image(ImageInfo {
                sectors: read_u64(buf, layout::IMAGE_SECTORS),
                sector_size: read_u32(buf, layout::IMAGE_SECTOR_SIZE),
                info: read_u32(buf, layout::IMAGE_INFO),
            }),
            BodyKind::Params => Body::Params(Params {
                flags: OpenFlags(read_u32(buf, layout::PARAMS_FLAGS)),
                devnum: read_u32(buf, layout::PARAMS_DEVNUM),
                domid: read_u32(buf, layout::PARAMS_DOMID),
                path: read_c_string(buf, layout::PARAMS_PATH, PATH_LEN, "params.path")?,
                prt_devnum: read_u32(buf, layout::PARAMS_PRT_DEVNUM),
                req_timeout: read_u16(buf, layout::PARAMS_REQ_TIMEOUT),
                secondary: read_c_string(
                    buf,
                    layout::PARAMS_SECONDARY,
                    PATH_LEN,
                    "params.secondary",
                )?,
            }),
            BodyKind::Response => Body::Response {
                error: read_i32(buf, layout::RESPONSE_ERROR),
                message: read_c_string(
                    buf,
                    layout::RESPONSE_MESSAGE,
                    PATH_LEN,
                    "response.message",
                )?,
            },
            BodyKind::Minors => {
                let count = read_i32(buf, layout::MINORS_COUNT);
                let used = check_minors_count(count)?;
                let list = (0..used)
                    .map(|index| read_i32(buf, layout::MINORS_LIST + 4 * index))
                    .collect();
                Body::Minors(Minors { count, list })
            }
            BodyKind::List => Body::List(ListEntry {
                count: read_i32(buf, layout::LIST_COUNT),
                minor: read_i32(buf, layout::LIST_MINOR),
                state: read_i32(buf, layout::LIST_STATE),
                path: read_c_string(buf, layout::LIST_PATH, PATH_LEN, "list.path")?,
            }),
            BodyKind::Stat => Body::Stat(StatInfo {
                msg_type: read_u16(buf, layout::STAT_TYPE),
                cookie: read_u16(buf, layout::STAT_COOKIE),
                length: read_u64(buf, layout::STAT_LENGTH),
            }),
            BodyKind::Blkif => {
                let mut gref = [0u32; GREF_COUNT];
                for (index, slot) in gref.iter_mut().enumerate() {
                    *slot = read_u32(buf, layout::BLKIF_GREF + 4 * index);
                }
                Body::Blkif(Blkif {
                    domid: read_u32(buf, layout::BLKIF_DOMID),
                    devid: read_u32(buf, layout::BLKIF_DEVID),
                    gref,
                    order: read_u32(buf, layout::BLKIF_ORDER),
                    proto: read_u32(buf, layout::BLKIF_PROTO),
                    pool: read_c_string(buf, layout::BLKIF_POOL, PATH_LEN, "blkif.pool")?,
                    port: read_u32(buf, layout::BLKIF_PORT),
                    poll_duration: read_u32(buf, layout::BLKIF_POLL_DURATION),
                    poll_idle_threshold: read_u32(buf, layout::BLKIF_POLL_IDLE_THRESHOLD),
                })
            }
            BodyKind::Query => Body::Query(Query {
                current_progress: read_u64(buf, layout::QUERY_CURRENT),
                total_progress: read_u64(buf, layout::QUERY_TOTAL),
                status: read_c_string(buf, layout::QUERY_STATUS, PATH_LEN, "query.status")?,
            }),
            BodyKind::Text => Body::Text(read_c_string(
                buf,
                layout::STRING_TEXT,
                PATH_LEN,
                "string.text",
            )?),
        };
        check_ranges(&body)?;
        Ok(Message {
            msg_type,
            cookie,
            body,
        })
    }
}

/// Builds the fixed 256-byte log-path payload sent after OPEN/RESUME with
/// [`OpenFlags::ADD_LOG`]: the path, a NUL, then zeros.
pub fn encode_log_path(path: &str) -> Result<[u8; LOG_PATH_PAYLOAD_LEN], EncodeError> {
    encode_text_payload(path, "log path")
}

/// Parses the 256-byte log-path payload; offsets in errors are relative to the payload.
pub fn decode_log_path(buf: &[u8]) -> Result<String, DecodeError> {
    decode_text_payload(buf, LOG_PATH_PAYLOAD_LEN, "log path", "log path payload")
}

/// Builds the open-options payload sent after OPEN with [`OpenFlags::OPEN_OPTIONS`]: `text`
/// (at most 255 bytes, no NUL) NUL-padded to [`OPEN_OPTIONS_PAYLOAD_LEN`] bytes. What the
/// text means is tapdisk's business (`key = value` lines).
pub fn encode_open_options(text: &str) -> Result<[u8; OPEN_OPTIONS_PAYLOAD_LEN], EncodeError> {
    encode_text_payload(text, "open options")
}

/// Parses the open-options payload; offsets in errors are relative to the payload.
pub fn decode_open_options(buf: &[u8]) -> Result<String, DecodeError> {
    decode_text_payload(
        buf,
        OPEN_OPTIONS_PAYLOAD_LEN,
        "open options",
        "open options payload",
    )
}

/// A text trailer of `N` bytes: `text` (the `what` of errors), a NUL, then zeros.
fn encode_text_payload<const N: usize>(
    text: &str,
    what: &'static str,
) -> Result<[u8; N], EncodeError> {
    let mut buf = [0u8; N];
    write_c_string(&mut buf, 0, N, text, what)?;
    Ok(buf)
}

/// The text of a `len`-byte trailer (`payload` names the trailer in a length error, `what`
/// its text in the others).
fn decode_text_payload(
    buf: &[u8],
    len: usize,
    what: &'static str,
    payload: &'static str,
) -> Result<String, DecodeError> {
    if buf.len() != len {
        return Err(DecodeError::WrongLength {
            what: payload,
            expected: len,
            actual: buf.len(),
        });
    }
    read_c_string(buf, 0, len, what)
}

/// Builds the encryption-key payload sent after OPEN with [`OpenFlags::OPEN_ENCRYPTED`]:
/// a one-byte size (1..=128) followed by the key bytes.
pub fn encode_key(key: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let size = u8::try_from(key.len())
        .ok()
        .filter(|&n| (1..=MAX_KEY_SIZE).contains(&usize::from(n)))
        .ok_or(EncodeError::KeyLength { len: key.len() })?;
    let mut payload = Vec::with_capacity(1 + key.len());
    payload.push(size);
    payload.extend_from_slice(key);
    Ok(payload)
}

/// Validates the key-size byte that starts the encryption-key payload and returns how many
/// key bytes follow it.
pub fn decode_key_size(b: u8) -> Result<usize, DecodeError> {
    let size = usize::from(b);
    if (1..=MAX_KEY_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(DecodeError::KeySize { value: b })
    }
}
