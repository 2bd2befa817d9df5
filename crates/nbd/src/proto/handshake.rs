//! The handshake phase: the fixed newstyle and old-style greetings, client flags, option
//! headers and option data, option replies, and [`Negotiation`], the state machine that
//! answers options until the client enters transmission (or aborts).

use std::fmt;

use super::{
    be_u16, be_u32, truncate_str, wire_len, ExportInfo, ProtoError, Session, MAX_STRING_LEN,
};

/// `"NBDMAGIC"`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;

/// `"IHAVEOPT"`: newstyle magic sent by the server after [`NBDMAGIC`] and by the client in
/// front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Magic after `NBDMAGIC` in the old-style greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Length of the old-style greeting.
pub const OLDSTYLE_GREETING_LEN: usize = 152;

/// Option: choose an export and enter transmission (no reply header).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (see [`TlsPolicy`]).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: syntactically invalid option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: TLS must be negotiated first (`NBD_REP_ERR_TLS_REQD`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: a request is too big.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information item: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Name of the metadata context every export offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Context id of the first of an export's own contexts ([`ExportInfo::meta_contexts`]);
/// the others follow in order.
pub const FIRST_EXPORT_CONTEXT_ID: u32 = 2;

/// A metadata context a connection may select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeros (`STATE_HOLE`, `STATE_ZERO`).
    BaseAllocation,
    /// The export's own context `ExportInfo::meta_contexts[index]`, answered by the export.
    Export(usize),
}

impl MetaContext {
    /// The id the server hands out for this context.
    pub fn id(self) -> u32 {
        match self {
            Self::BaseAllocation => BASE_ALLOCATION_ID,
            Self::Export(index) => {
                FIRST_EXPORT_CONTEXT_ID.saturating_add(u32::try_from(index).unwrap_or(u32::MAX))
            }
        }
    }

    /// Its name, for `info`'s export.
    pub fn name(self, info: &ExportInfo) -> &str {
        match self {
            Self::BaseAllocation => BASE_ALLOCATION,
            Self::Export(index) => info.meta_contexts.get(index).map_or("", String::as_str),
        }
    }
}

/// The contexts of `info`'s export that `queries` ask for. Listing (`set == false`) matches a
/// whole name or a namespace prefix ending in `:` (`base:`, `qemu:dirty-bitmap:`), and no
/// query at all lists every context; selecting matches whole names only, and no query
/// selects none.
pub fn matching_contexts(info: &ExportInfo, queries: &[String], set: bool) -> Vec<MetaContext> {
    let all = std::iter::once(MetaContext::BaseAllocation)
        .chain((0..info.meta_contexts.len()).map(MetaContext::Export));
    if queries.is_empty() {
        return if set { Vec::new() } else { all.collect() };
    }
    all.filter(|context| {
        let name = context.name(info);
        queries.iter().any(|query| {
            query == name || (!set && query.ends_with(':') && name.starts_with(query.as_str()))
        })
    })
    .collect()
}

/// Size of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;

/// Size of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;

/// Largest option payload accepted; a larger one ends the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The old-style greeting, after which transmission starts at once: `NBDMAGIC`, the
/// old-style magic, the size, 32 bits of flags (the transmission flags in the low 16 bits)
/// and 124 zero bytes. Old-style clients get simple replies only.
pub fn oldstyle_greeting(info: &ExportInfo) -> [u8; OLDSTYLE_GREETING_LEN] {
    let mut out = [0u8; OLDSTYLE_GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    out[16..24].copy_from_slice(&info.size.to_be_bytes());
    out[24..28].copy_from_slice(&u32::from(info.transmission_flags(false)).to_be_bytes());
    out
}

/// The transmission session of an old-style connection (no options were negotiated).
pub fn oldstyle_session(info: &ExportInfo) -> Session {
    let (_, _, max) = info.block_sizes();
    Session {
        info: info.clone(),
        transmission_flags: info.transmission_flags(false),
        structured: false,
        contexts: Vec::new(),
        max_request: max,
    }
}

/// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
pub fn server_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parse the client's 32-bit flags; unknown bits are a violation that closes the
/// connection.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(bytes);
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ProtoError::UnknownClientFlags {
            flags,
            unknown: flags & !known,
        });
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parse a 16-byte option header, enforcing the magic and [`MAX_OPTION_LEN`].
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(bytes[0..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic { found: magic });
        }
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or_default());
        if length > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong { option, length });
        }
        Ok(Self { option, length })
    }

    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

impl fmt::Display for OptionHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "option {} ({} bytes)", self.option, self.length)
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO` (`go == true`).
    Info {
        /// Whether transmission starts after the reply.
        go: bool,
        /// Export name asked for.
        name: String,
        /// Information items the client asked for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    MetaContext {
        /// Whether this selects (set) or only lists contexts.
        set: bool,
        /// Export name the query is about.
        name: String,
        /// Query strings.
        queries: Vec<String>,
    },
    /// An option this server answers with `NBD_REP_ERR_UNSUP` (including STARTTLS and
    /// extended headers).
    Unsupported(u32),
}

/// Why an option's data could not be decoded; answered with `NBD_REP_ERR_INVALID` (or
/// for `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, a disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// The data length does not fit the option's layout.
    #[error("option {option}: {what}")]
    Malformed {
        /// Option number.
        option: u32,
        /// What is wrong.
        what: &'static str,
    },
}

fn parse_string(bytes: &[u8], option: u32, what: &'static str) -> Result<String, OptionDataError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionDataError::Malformed { option, what });
    }
    if bytes.contains(&0) {
        return Err(OptionDataError::Malformed { option, what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionDataError::Malformed { option, what })
}

/// Read a u32-length-prefixed string at `*at`, advancing it.
fn take_prefixed_string(
    data: &[u8],
    at: &mut usize,
    option: u32,
    what: &'static str,
) -> Result<String, OptionDataError> {
    let malformed = OptionDataError::Malformed { option, what };
    let len = be_u32(data, *at).ok_or(malformed.clone())?;
    let len = usize::try_from(len).map_err(|_| malformed.clone())?;
    let start = at.checked_add(4).ok_or(malformed.clone())?;
    let end = start.checked_add(len).ok_or(malformed.clone())?;
    let raw = data.get(start..end).ok_or(malformed)?;
    *at = end;
    parse_string(raw, option, what)
}

/// Decode an option's data. Unknown options decode to [`OptionRequest::Unsupported`].
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest, OptionDataError> {
    match option {
        OPT_EXPORT_NAME => Ok(OptionRequest::ExportName(parse_string(
            data,
            option,
            "export name is not a valid string (UTF-8, no NUL, at most 4096 bytes)",
        )?)),
        OPT_ABORT => Ok(OptionRequest::Abort),
        OPT_LIST => without_data(
            option,
            data,
            OptionRequest::List,
            "NBD_OPT_LIST must carry no data",
        ),
        OPT_INFO | OPT_GO => {
            let mut at = 0;
            let name = take_prefixed_string(
                data,
                &mut at,
                option,
                "export name length/contents do not fit the option data",
            )?;
            let count = be_u16(data, at).ok_or(OptionDataError::Malformed {
                option,
                what: "missing number of information requests",
            })?;
            at += 2;
            let rest = data.get(at..).unwrap_or_default();
            if rest.len() != usize::from(count) * 2 {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "number of information requests does not match the data length",
                });
            }
            let requests = rest
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            Ok(OptionRequest::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_STRUCTURED_REPLY => without_data(
            option,
            data,
            OptionRequest::StructuredReply,
            "NBD_OPT_STRUCTURED_REPLY must carry no data",
        ),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut at = 0;
            let name = take_prefixed_string(
                data,
                &mut at,
                option,
                "export name length/contents do not fit the option data",
            )?;
            let count = be_u32(data, at).ok_or(OptionDataError::Malformed {
                option,
                what: "missing number of queries",
            })?;
            at += 4;
            // Each query needs at least its 4-byte length, which bounds count by the data.
            let remaining = data.len().saturating_sub(at);
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count > remaining / 4 {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "number of queries exceeds the option data",
                });
            }
            let mut queries = Vec::with_capacity(count);
            for _ in 0..count {
                queries.push(take_prefixed_string(
                    data,
                    &mut at,
                    option,
                    "query length/contents do not fit the option data",
                )?);
            }
            if at != data.len() {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "trailing bytes after the last query",
                });
            }
            Ok(OptionRequest::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            })
        }
        other => Ok(OptionRequest::Unsupported(other)),
    }
}

/// `request` for an option that takes no data; `what` explains the error when it has some.
fn without_data(
    option: u32,
    data: &[u8],
    request: OptionRequest,
    what: &'static str,
) -> Result<OptionRequest, OptionDataError> {
    if data.is_empty() {
        Ok(request)
    } else {
        Err(OptionDataError::Malformed { option, what })
    }
}

/// Append one option reply (header and data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&wire_len(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Append an option error reply carrying a human-readable message.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error, message.as_bytes());
}

/// What the option phase does after one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies, then close the connection (after `NBD_OPT_ABORT`).
    Close,
    /// Send the replies, then enter the transmission phase with these parameters.
    Transmission(Session),
    /// Send the replies (the acknowledgement, in the clear), then run the TLS handshake on
    /// the stream: the options that follow arrive inside TLS. Only under
    /// [`TlsPolicy::Required`].
    StartTls,
}

/// Whether a connection must negotiate TLS before anything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP` like any unknown option.
    #[default]
    Plaintext,
    /// TLS required: until the client has sent `NBD_OPT_STARTTLS` (acknowledged, then
    /// [`OptionOutcome::StartTls`]), every option but `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME`, which has no error reply, ends the
    /// connection ([`ProtoError::TlsRequired`]). Once TLS is up, a second `NBD_OPT_STARTTLS`
    /// is invalid.
    Required,
}

/// Where a negotiation stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// [`TlsPolicy::Plaintext`].
    Off,
    /// [`TlsPolicy::Required`], not started yet.
    Pending,
    /// [`TlsPolicy::Required`], started.
    Active,
}

/// State of the option phase of one connection: feed it options, send what it writes.
#[derive(Debug, Clone)]
pub struct Negotiation {
    export_name: String,
    info: ExportInfo,
    client: ClientFlags,
    structured: bool,
    contexts: Vec<MetaContext>,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged.
    extended: bool,
    tls: TlsState,
}

impl Negotiation {
    /// Start negotiating `info` (listed under `export_name`) with a client that sent
    /// `client` flags, under the `tls` policy.
    pub fn new(export_name: &str, info: ExportInfo, client: ClientFlags, tls: TlsPolicy) -> Self {
        Self {
            export_name: export_name.to_owned(),
            info,
            client,
            structured: false,
            contexts: Vec::new(),
            extended: false,
            tls: match tls {
                TlsPolicy::Plaintext => TlsState::Off,
                TlsPolicy::Required => TlsState::Pending,
            },
        }
    }

    /// Whether extended headers (64-bit lengths, 32-byte headers) have been negotiated;
    /// they imply structured replies.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Whether structured replies have been negotiated so far.
    pub fn structured(&self) -> bool {
        self.structured
    }

    fn session(&self) -> Session {
        let (_, _, max) = self.info.block_sizes();
        Session {
            info: self.info.clone(),
            transmission_flags: self.info.transmission_flags(self.structured),
            structured: self.structured,
            contexts: if self.structured {
                self.contexts.clone()
            } else {
                Vec::new()
            },
            max_request: max,
        }
    }

    /// Handle one option (header already validated by [`OptionHeader::parse`], `data` its
    /// payload). Replies are appended to `out`. An error means the connection must close
    /// without further replies.
    pub fn handle_option(
        &mut self,
        header: OptionHeader,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, ProtoError> {
        let option = header.option;
        match self.tls {
            TlsState::Pending if option != OPT_ABORT => return self.before_tls(option, data, out),
            TlsState::Active if option == OPT_STARTTLS => {
                encode_option_error(out, option, REP_ERR_INVALID, "TLS is already active");
                return Ok(OptionOutcome::Continue);
            }
            _ => {}
        }
        if option == OPT_EXTENDED_HEADERS {
            if data.is_empty() {
                self.extended = true;
                self.structured = true;
                encode_option_reply(out, option, REP_ACK, &[]);
            } else {
                encode_option_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_EXTENDED_HEADERS must carry no data",
                );
            }
            return Ok(OptionOutcome::Continue);
        }
        let request = match parse_option(option, data) {
            Ok(request) => request,
            Err(OptionDataError::Malformed { what, .. }) => {
                if option == OPT_EXPORT_NAME {
                    return Err(ProtoError::BadExportName { reason: what });
                }
                encode_option_error(out, option, REP_ERR_INVALID, what);
                return Ok(OptionOutcome::Continue);
            }
        };
        match request {
            OptionRequest::ExportName(_) => {
                let session = self.session();
                out.extend_from_slice(&session.info.size.to_be_bytes());
                out.extend_from_slice(&session.transmission_flags.to_be_bytes());
                if !self.client.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(OptionOutcome::Transmission(session))
            }
            OptionRequest::Abort => {
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Close)
            }
            OptionRequest::List => {
                let mut item = Vec::with_capacity(4 + self.export_name.len());
                item.extend_from_slice(&wire_len(self.export_name.len()).to_be_bytes());
                item.extend_from_slice(self.export_name.as_bytes());
                encode_option_reply(out, option, REP_SERVER, &item);
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::Info { go, name, requests } => {
                self.encode_info(out, option, &name, &requests);
                encode_option_reply(out, option, REP_ACK, &[]);
                if go {
                    Ok(OptionOutcome::Transmission(self.session()))
                } else {
                    Ok(OptionOutcome::Continue)
                }
            }
            OptionRequest::StructuredReply => {
                self.structured = true;
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::MetaContext { set, queries, .. } => {
                if !self.structured {
                    encode_option_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "metadata contexts need NBD_OPT_STRUCTURED_REPLY first",
                    );
                    return Ok(OptionOutcome::Continue);
                }
                let matches = matching_contexts(&self.info, &queries, set);
                for context in &matches {
                    let name = context.name(&self.info);
                    let id = if set { context.id() } else { 0 };
                    let mut item = Vec::with_capacity(4 + name.len());
                    item.extend_from_slice(&id.to_be_bytes());
                    item.extend_from_slice(name.as_bytes());
                    encode_option_reply(out, option, REP_META_CONTEXT, &item);
                }
                if set {
                    self.contexts = matches;
                }
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::Unsupported(code) => {
                encode_option_error(out, code, REP_ERR_UNSUP, "option not supported");
                Ok(OptionOutcome::Continue)
            }
        }
    }

    /// An option other than `NBD_OPT_ABORT` while TLS is required and not started yet.
    fn before_tls(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, ProtoError> {
        match option {
            OPT_STARTTLS if data.is_empty() => {
                encode_option_reply(out, option, REP_ACK, &[]);
                self.tls = TlsState::Active;
                Ok(OptionOutcome::StartTls)
            }
            OPT_STARTTLS => {
                encode_option_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS carries no data",
                );
                Ok(OptionOutcome::Continue)
            }
            OPT_EXPORT_NAME => Err(ProtoError::TlsRequired),
            _ => {
                encode_option_error(
                    out,
                    option,
                    REP_ERR_TLS_REQD,
                    "this export requires TLS: send NBD_OPT_STARTTLS first",
                );
                Ok(OptionOutcome::Continue)
            }
        }
    }

    /// NBD_INFO_EXPORT always; NBD_INFO_BLOCK_SIZE always (the spec lets a server send it
    /// unasked); NBD_INFO_NAME and NBD_INFO_DESCRIPTION only when requested.
    fn encode_info(&self, out: &mut Vec<u8>, option: u32, name: &str, requests: &[u16]) {
        let mut item = Vec::with_capacity(12);
        item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        item.extend_from_slice(&self.info.size.to_be_bytes());
        item.extend_from_slice(&self.info.transmission_flags(self.structured).to_be_bytes());
        encode_option_reply(out, option, REP_INFO, &item);

        if requests.contains(&INFO_NAME) {
            // Every name is accepted; the canonical name is the configured one when the
            // client asked for the default export, else the name it used.
            let canonical = if name.is_empty() {
                self.export_name.as_str()
            } else {
                name
            };
            let mut item = Vec::with_capacity(2 + canonical.len());
            item.extend_from_slice(&INFO_NAME.to_be_bytes());
            item.extend_from_slice(canonical.as_bytes());
            encode_option_reply(out, option, REP_INFO, &item);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            if let Some(description) = &self.info.description {
                let text = truncate_str(description, MAX_STRING_LEN);
                let mut item = Vec::with_capacity(2 + text.len());
                item.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                item.extend_from_slice(text.as_bytes());
                encode_option_reply(out, option, REP_INFO, &item);
            }
        }
        let (min, preferred, max) = self.info.block_sizes();
        let mut item = Vec::with_capacity(14);
        item.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        item.extend_from_slice(&min.to_be_bytes());
        item.extend_from_slice(&preferred.to_be_bytes());
        item.extend_from_slice(&max.to_be_bytes());
        encode_option_reply(out, option, REP_INFO, &item);
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::tests::full_info;
    use crate::proto::*;
    use proptest::prelude::*;

    fn negotiation(no_zeroes: bool) -> Negotiation {
        Negotiation::new(
            "vbd",
            full_info(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes,
            },
            TlsPolicy::Plaintext,
        )
    }

    fn tls_negotiation() -> Negotiation {
        Negotiation::new(
            "vbd",
            full_info(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true,
            },
            TlsPolicy::Required,
        )
    }

    fn error_reply(option: u32, error: u32, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_option_error(&mut out, option, error, message);
        out
    }

    #[test]
    fn tls_required_refuses_everything_until_starttls() {
        let mut n = tls_negotiation();
        let required = "this export requires TLS: send NBD_OPT_STARTTLS first";
        for (code, data) in [
            (OPT_LIST, &[][..]),
            (OPT_GO, &[0, 0, 0, 0, 0, 0]),
            (OPT_INFO, &[0, 0, 0, 0, 0, 0]),
            (OPT_STRUCTURED_REPLY, &[]),
            (OPT_EXTENDED_HEADERS, &[]),
            (OPT_SET_META_CONTEXT, &[1, 2, 3]),
            (99, b"junk"),
        ] {
            let (outcome, out) = option(&mut n, code, data);
            assert_eq!(outcome, OptionOutcome::Continue, "option {code}");
            assert_eq!(
                out,
                error_reply(code, REP_ERR_TLS_REQD, required),
                "option {code}"
            );
        }
        assert!(!n.structured() && !n.extended_headers());
        let (outcome, out) = option(&mut n, OPT_STARTTLS, &[0]);
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(
            out,
            error_reply(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS carries no data"
            )
        );
        let mut out = Vec::new();
        let header = OptionHeader {
            option: OPT_EXPORT_NAME,
            length: 0,
        };
        assert_eq!(
            n.handle_option(header, &[], &mut out),
            Err(ProtoError::TlsRequired)
        );
        assert!(out.is_empty(), "EXPORT_NAME before TLS gets no bytes");

        let (outcome, out) = option(&mut n, OPT_STARTTLS, &[]);
        assert_eq!(outcome, OptionOutcome::StartTls);
        let mut ack = Vec::new();
        encode_option_reply(&mut ack, OPT_STARTTLS, REP_ACK, &[]);
        assert_eq!(out, ack);
        // Inside TLS: options work as without the policy; STARTTLS again is invalid.
        let (outcome, out) = option(&mut n, OPT_LIST, &[]);
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(out, option(&mut negotiation(true), OPT_LIST, &[]).1);
        let (outcome, out) = option(&mut n, OPT_STARTTLS, &[]);
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(
            out,
            error_reply(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already active")
        );
        let (outcome, _) = option(&mut n, OPT_EXPORT_NAME, b"");
        assert!(matches!(outcome, OptionOutcome::Transmission(_)));
    }

    #[test]
    fn tls_required_still_lets_the_client_abort() {
        let (outcome, out) = option(&mut tls_negotiation(), OPT_ABORT, &[]);
        assert_eq!(outcome, OptionOutcome::Close);
        assert_eq!(out, option(&mut negotiation(true), OPT_ABORT, &[]).1);
    }

    #[test]
    fn plaintext_answers_starttls_as_unsupported() {
        let (outcome, out) = option(&mut negotiation(true), OPT_STARTTLS, &[]);
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(
            out,
            error_reply(OPT_STARTTLS, REP_ERR_UNSUP, "option not supported")
        );
    }

    fn option(n: &mut Negotiation, option: u32, data: &[u8]) -> (OptionOutcome, Vec<u8>) {
        let mut out = Vec::new();
        let header = OptionHeader {
            option,
            length: u32::try_from(data.len()).unwrap(),
        };
        let outcome = n.handle_option(header, data, &mut out).unwrap();
        (outcome, out)
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            server_greeting().as_slice(),
            b"NBDMAGICIHAVEOPT\x00\x03".as_slice()
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Ok(ClientFlags::default()));
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags {
                flags: 4,
                unknown: 4
            })
        );
    }

    #[test]
    fn option_header_parse_and_limits() {
        let bytes = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a";
        assert_eq!(
            OptionHeader::parse(&bytes),
            Ok(OptionHeader {
                option: 7,
                length: 10
            })
        );
        assert_eq!(OptionHeader::parse(&bytes).unwrap().encode(), bytes);
        let too_long = *b"IHAVEOPT\x00\x00\x00\x07\x00\x01\x00\x01";
        assert_eq!(
            OptionHeader::parse(&too_long),
            Err(ProtoError::OptionTooLong {
                option: 7,
                length: 0x1_0001
            })
        );
        let bad = *b"IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x00";
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadOptionMagic { .. })
        ));
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_EXPORT_NAME, b"x");
        assert!(matches!(outcome, OptionOutcome::Transmission(_)));
        let flags = 0x0d6du16; // HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN|CACHE|FAST_ZERO
        let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 0];
        expected.extend_from_slice(&flags.to_be_bytes());
        assert_eq!(out, expected);
        let (_, out) = option(&mut negotiation(false), OPT_EXPORT_NAME, b"");
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..10], expected.as_slice());
    }

    #[test]
    fn list_reply_bytes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_LIST, &[]);
        assert_eq!(outcome, OptionOutcome::Continue);
        let expected: Vec<u8> = [
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 3],
            b"vbd",
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn abort_acks_and_closes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_ABORT, &[]);
        assert_eq!(outcome, OptionOutcome::Close);
        let expected: Vec<u8> = [
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn unknown_option_is_unsupported() {
        let (outcome, out) = option(&mut negotiation(true), 99, b"junk");
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(&out[8..16], &[0, 0, 0, 99, 0x80, 0, 0, 1]);
    }

    #[test]
    fn go_reply_items() {
        let mut n = negotiation(true);
        let data = [0, 0, 0, 1, b'a', 0, 2, 0, 1, 0, 2];
        let (outcome, out) = option(&mut n, OPT_GO, &data);
        let OptionOutcome::Transmission(session) = outcome else {
            panic!("GO must enter transmission");
        };
        assert!(!session.structured);
        assert_eq!(session.max_request, DEFAULT_MAX_BLOCK);
        // EXPORT item: 20-byte header + 12 bytes.
        let reply = |kind: u32, data: &[u8]| -> Vec<u8> {
            let mut v = Vec::new();
            encode_option_reply(&mut v, OPT_GO, kind, data);
            v
        };
        let expected: Vec<u8> = [
            reply(REP_INFO, &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x0d, 0x6d]),
            reply(REP_INFO, &[0, 1, b'a']),
            reply(REP_INFO, b"\x00\x02desc"),
            reply(REP_INFO, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]),
            reply(REP_ACK, &[]),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn structured_and_meta_context_negotiation() {
        let mut n = negotiation(true);
        let query = [
            &[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15][..],
            b"base:allocation",
        ]
        .concat();
        // Before structured replies: invalid.
        let (_, out) = option(&mut n, OPT_SET_META_CONTEXT, &query);
        assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
        let (_, out) = option(&mut n, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        let (_, out) = option(&mut n, OPT_SET_META_CONTEXT, &query);
        let mut expected = Vec::new();
        encode_option_reply(
            &mut expected,
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            b"\x00\x00\x00\x01base:allocation",
        );
        encode_option_reply(&mut expected, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        assert_eq!(out, expected);
        // Listing with no query lists base:allocation with id 0.
        let (_, out) = option(&mut n, OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[20..24], &[0, 0, 0, 0]);
        assert_eq!(&out[24..39], b"base:allocation");
        // Unknown context: just ACK.
        let other = [&[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5][..], b"x:foo"].concat();
        let (_, out) = option(&mut n, OPT_LIST_META_CONTEXT, &other);
        assert_eq!(out.len(), 20);
        let (outcome, _) = option(&mut n, OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let OptionOutcome::Transmission(session) = outcome else {
            panic!("GO must enter transmission");
        };
        assert!(session.structured);
        assert_eq!(session.contexts, [MetaContext::BaseAllocation]);
        assert_ne!(session.transmission_flags & TFLAG_SEND_DF, 0);
    }

    /// A list or set query for `names`.
    fn meta_query(names: &[&str]) -> Vec<u8> {
        let mut data = vec![0u8; 4];
        data.extend_from_slice(&u32::try_from(names.len()).unwrap().to_be_bytes());
        for name in names {
            data.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            data.extend_from_slice(name.as_bytes());
        }
        data
    }

    /// The (id, name) of every `NBD_REP_META_CONTEXT` in `out`, which ends with an ACK.
    fn meta_replies(out: &[u8]) -> Vec<(u32, String)> {
        let mut found = Vec::new();
        let mut at = 0;
        while at + 20 <= out.len() {
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
            let len = usize::try_from(u32::from_be_bytes(
                out[at + 16..at + 20].try_into().unwrap(),
            ))
            .unwrap();
            let data = &out[at + 20..at + 20 + len];
            if kind == REP_META_CONTEXT {
                let id = u32::from_be_bytes(data[..4].try_into().unwrap());
                found.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
            } else {
                assert_eq!(kind, REP_ACK);
            }
            at += 20 + len;
        }
        found
    }

    #[test]
    fn an_export_s_own_contexts_are_listed_and_selected() {
        let mut info = full_info();
        info.meta_contexts = vec!["qemu:dirty-bitmap:cbt".to_owned()];
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        let mut n = Negotiation::new("disk", info, flags, TlsPolicy::Plaintext);
        option(&mut n, OPT_STRUCTURED_REPLY, &[]);
        let list = |n: &mut Negotiation, names: &[&str]| {
            meta_replies(&option(n, OPT_LIST_META_CONTEXT, &meta_query(names)).1)
        };
        let dirty = (0, "qemu:dirty-bitmap:cbt".to_owned());
        let base = (0, BASE_ALLOCATION.to_owned());
        assert_eq!(list(&mut n, &[]), [base.clone(), dirty.clone()]);
        assert_eq!(list(&mut n, &["qemu:"]), std::slice::from_ref(&dirty));
        assert_eq!(
            list(&mut n, &["qemu:dirty-bitmap:"]),
            std::slice::from_ref(&dirty)
        );
        assert_eq!(
            list(&mut n, &["base:", "qemu:dirty-bitmap:cbt"]),
            [base, dirty.clone()]
        );
        assert_eq!(list(&mut n, &["qemu:dirty-bitmap:other"]), []);
        // Selecting takes whole names only; ids are 1 for base:allocation, then 2, ...
        let set = |n: &mut Negotiation, names: &[&str]| {
            meta_replies(&option(n, OPT_SET_META_CONTEXT, &meta_query(names)).1)
        };
        assert_eq!(set(&mut n, &["qemu:"]), []);
        assert_eq!(
            set(&mut n, &["qemu:dirty-bitmap:cbt", "base:allocation"]),
            [
                (1, BASE_ALLOCATION.to_owned()),
                (2, "qemu:dirty-bitmap:cbt".to_owned())
            ]
        );
        assert_eq!(
            set(&mut n, &["qemu:dirty-bitmap:cbt"]),
            [(2, dirty.1.clone())]
        );
        let (outcome, _) = option(&mut n, OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let OptionOutcome::Transmission(session) = outcome else {
            panic!("GO must enter transmission");
        };
        assert_eq!(session.contexts, [MetaContext::Export(0)]);
        assert_eq!(MetaContext::Export(0).id(), 2);
    }

    #[test]
    fn malformed_options() {
        let mut n = negotiation(true);
        for (code, data) in [
            (OPT_GO, &[0u8, 0, 0, 5, b'a'][..]),
            (OPT_INFO, &[0, 0, 0, 0, 0, 1]),
            (OPT_INFO, &[0, 0, 0, 0, 0, 0, 0]),
            (OPT_LIST, &[1]),
            (OPT_STRUCTURED_REPLY, &[1]),
        ] {
            let (outcome, out) = option(&mut n, code, data);
            assert_eq!(outcome, OptionOutcome::Continue);
            assert_eq!(
                &out[12..16],
                &REP_ERR_INVALID.to_be_bytes(),
                "option {code}"
            );
        }
        let mut out = Vec::new();
        let header = OptionHeader {
            option: OPT_EXPORT_NAME,
            length: 2,
        };
        assert!(matches!(
            n.handle_option(header, &[0xff, 0xfe], &mut out),
            Err(ProtoError::BadExportName { .. })
        ));
    }

    #[test]
    fn oldstyle_greeting_bytes() {
        let mut info = ExportInfo::new(0x1234_5678_9abc);
        info.can_flush = true;
        info.read_only = true;
        let greeting = oldstyle_greeting(&info);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"NBDMAGIC");
        expected.extend_from_slice(&[0x00, 0x00, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
        expected.extend_from_slice(&[0, 0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        let flags = info.transmission_flags(false);
        assert_eq!(flags & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        expected.extend_from_slice(&u32::from(flags).to_be_bytes());
        expected.extend_from_slice(&[0u8; 124]);
        assert_eq!(greeting.to_vec(), expected);
        let session = oldstyle_session(&info);
        assert!(!session.structured);
        assert!(session.contexts.is_empty());
    }

    proptest! {
        #[test]
        fn option_phase_never_panics(
            input in proptest::collection::vec(any::<u8>(), 0..2048),
            tls in any::<bool>(),
        ) {
            let mut n = if tls { tls_negotiation() } else { negotiation(false) };
            let mut rest = input.as_slice();
            let mut out = Vec::new();
            while rest.len() >= OPTION_HEADER_LEN {
                let (head, tail) = rest.split_at(OPTION_HEADER_LEN);
                let mut head: [u8; OPTION_HEADER_LEN] = head.try_into().unwrap();
                head[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
                let Ok(header) = OptionHeader::parse(&head) else { break };
                let len = usize::try_from(header.length).unwrap().min(tail.len());
                let (data, tail) = tail.split_at(len);
                match n.handle_option(header, data, &mut out) {
                    Ok(OptionOutcome::Continue | OptionOutcome::StartTls) => {}
                    _ => break,
                }
                rest = tail;
            }
        }

        #[test]
        fn parse_option_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_option(code, &data);
        }
    }
}
