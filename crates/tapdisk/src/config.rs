//! tapdisk's configuration: read once in `main`, then passed down. Nothing else in the daemon
//! reads the environment or a configuration file.
//!
//! Sources, highest precedence first:
//! 1. the command line: `-c FILE`/`--config FILE` names the site file, `-D` keeps the daemon
//!    in the foreground;
//! 2. the environment variables tapdisk documents: `TAPDISK_CONFIG` (the site file, when no
//!    `-c`), `TAPDISK_LOG` (log filter), `BLKTAP_CONTROL_DIR` (set by `tap-ctl spawn`);
//! 3. the site file, TOML, [`DEFAULT_FILE`] unless named otherwise (a missing default file is
//!    no error: built-in values apply; a named one must exist);
//! 4. built-in defaults ([`Config::default`]).
//!
//! ```toml
//! [block_device]
//! open = "none"            # OPEN without a choice (C clients, tap-ctl open without -b)
//! create = "auto"          # tap-ctl create without -b
//! compat_symlinks = false  # /dev/xen/blktap-2/tapdev<minor> links to ublk devices
//!
//! [ublk]                   # per VBD; tap-ctl open/create -o ublk.queues=4 overrides
//! queues = 2
//! depth = 64
//! max_io_kib = 512
//! user_copy = "auto"       # or "off"
//!
//! [io]
//! engine = "auto"          # "io_uring", "pread"
//!
//! [nbd]                    # caps on NBD connections, lowered to fit the open-file limit
//! max_connections_per_vbd = 128
//! max_connections = 1024   # per tapdisk
//!
//! [nbd_client]             # the nbd image driver: storage-migration mirrors, remote disks
//! request_timeout = 30     # seconds a request may go unanswered; then the connection is dropped
//! handshake_timeout = 10   # seconds to connect and negotiate
//! max_in_flight = 256      # requests on the wire per connection (as many again may queue)
//! tls_certificates = ""    # a directory with ca-cert.pem: TLS for host:port targets
//!
//! [log]
//! filter = "info"          # a tracing filter: "debug", "tapdisk=debug,nbd=info", ...
//!
//! [tuning]                 # for benchmarks and diagnosis; may change between releases
//! mapped_reads = true
//! nbd_gather = true
//! ublk_bridge = "inline"   # or "spawn"
//! ublk_affinity = "any"    # "queue", "other"
//! ```
//!
//! Per-VBD device settings (the `[ublk]` keys and `block_device.compat_symlinks`) are the
//! site's defaults for every VBD; an OPEN may carry its own values for them as open options
//! ([`DeviceSettings::with_open_options`]), so `tap-ctl open` on a running tapdisk honours
//! them. Every value is checked: an unknown key, a wrong type or a value out of range is an
//! error naming the key, the value and where it came from, never a silent default.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::driver::nbd::NbdClientSettings;
use crate::engine::{EngineChoice, IoSettings};
use crate::frontend::nbd::ConnectionCaps;
use crate::frontend::ublk::config::{
    Affinity, Bridge, UblkConfig, UserCopy, DEFAULT_DEPTH, DEFAULT_MAX_IO_KIB, DEFAULT_QUEUES,
    MAX_DEPTH, MAX_IO_KIB_LIMIT, MAX_QUEUES,
};
use crate::frontend::{BlockDeviceChoice, BlockDeviceDefaults};

/// The site file read when none is named.
pub const DEFAULT_FILE: &str = "/etc/blktap/tapdisk.toml";
/// Environment variable naming the site file (below `-c`).
pub const FILE_ENV: &str = "TAPDISK_CONFIG";
/// Environment variable with the log filter (above the file's `log.filter`).
pub const LOG_ENV: &str = "TAPDISK_LOG";
/// Environment variable with the control directory (`tap-ctl spawn` sets it).
pub use blktapctl::paths::CONTROL_DIR_ENV;

/// The log filter used when nothing sets one.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// The usage text of the `tapdisk` command.
pub const USAGE: &str = "usage: tapdisk [-D] [-c FILE] [--print-config] [-h]
  -D               do not daemonize: stay in the foreground and log to stderr
  -c, --config F   read the site configuration from F (default $TAPDISK_CONFIG, else
                   /etc/blktap/tapdisk.toml if it exists)
  --print-config   print the configuration in effect as TOML and exit
  -h, --help       show this help
";

/// A value that cannot be used, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value of the right type but out of range (or not a valid filter).
    #[error("{origin}: {key} = {value}: {reason}")]
    Value {
        /// Where it came from: a file path, `open options`, `environment`.
        origin: String,
        /// The key, e.g. `ublk.queues` or `TAPDISK_LOG`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What is accepted.
        reason: String,
    },
    /// Not TOML, an unknown key or a value of the wrong type.
    #[error("{origin}: {message}")]
    Syntax {
        /// Where it came from.
        origin: String,
        /// The parser's explanation, with the line.
        message: String,
    },
    /// The site file cannot be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A command-line argument tapdisk does not know.
    #[error("{0}")]
    Usage(String),
}

impl ConfigError {
    /// The errno a control reply or the exit status carries for it.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EINVAL,
        }
    }
}

impl From<ConfigError> for io::Error {
    fn from(error: ConfigError) -> Self {
        crate::error::failure(error.errno(), error.to_string())
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `-D`: stay in the foreground, log to stderr.
    pub foreground: bool,
    /// `-c FILE`: the site file.
    pub config_file: Option<PathBuf>,
    /// `--print-config`: print the configuration and exit.
    pub print_config: bool,
    /// `-h`: print the usage and exit.
    pub help: bool,
}

impl Flags {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let mut flags = Self::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-D" => flags.foreground = true,
                "-h" | "--help" => flags.help = true,
                "--print-config" => flags.print_config = true,
                "-c" | "--config" => {
                    let file = args.next().ok_or_else(|| {
                        ConfigError::Usage(format!("option '{arg}' needs a file name"))
                    })?;
                    flags.config_file = Some(PathBuf::from(file));
                }
                other => {
                    if let Some(file) = other.strip_prefix("--config=") {
                        flags.config_file = Some(PathBuf::from(file));
                    } else {
                        return Err(ConfigError::Usage(format!("unknown argument '{other}'")));
                    }
                }
            }
        }
        Ok(flags)
    }
}

/// The settings of one VBD's kernel block device: the site's defaults, or those with an
/// OPEN's own options applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSettings {
    /// ublk hardware queues.
    pub ublk_queues: u16,
    /// ublk requests in flight per queue.
    pub ublk_depth: u16,
    /// ublk largest request, in KiB.
    pub ublk_max_io_kib: u32,
    /// ublk data transfer mode.
    pub ublk_user_copy: UserCopy,
    /// `/dev/xen/blktap-2/tapdev<minor>` links to the device.
    pub compat_symlinks: bool,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            ublk_queues: DEFAULT_QUEUES,
            ublk_depth: DEFAULT_DEPTH,
            ublk_max_io_kib: DEFAULT_MAX_IO_KIB,
            ublk_user_copy: UserCopy::Auto,
            compat_symlinks: false,
        }
    }
}

/// Switches for benchmarks and diagnosis (`[tuning]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Gather NBD read replies on UNIX sockets while the client has plenty unread.
    pub nbd_gather: bool,
    /// How ublk queue threads reach the runtime.
    pub ublk_bridge: Bridge,
    /// Where ublk queue threads run.
    pub ublk_affinity: Affinity,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            nbd_gather: true,
            ublk_bridge: Bridge::Inline,
            ublk_affinity: Affinity::Any,
        }
    }
}

/// Everything tapdisk is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The control directory (`BLKTAP_CONTROL_DIR`, else `/run/blktap-control`).
    pub control_dir: PathBuf,
    /// The log filter.
    pub log_filter: String,
    /// Engine and mapped reads for every image.
    pub io: IoSettings,
    /// The block device of an OPEN that does not choose one.
    pub block_device: BlockDeviceDefaults,
    /// Per-VBD device settings, site defaults.
    pub device: DeviceSettings,
    /// Caps on NBD connections (`[nbd]`).
    pub nbd: ConnectionCaps,
    /// Benchmark and diagnosis switches.
    pub tuning: Tuning,
    /// The NBD client of `nbd:` images.
    pub nbd_client: NbdClientSettings,
    /// The site file read, if any.
    pub file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            control_dir: PathBuf::from(blktapctl::paths::DEFAULT_CONTROL_DIR),
            log_filter: DEFAULT_LOG_FILTER.to_owned(),
            io: IoSettings::default(),
            block_device: BlockDeviceDefaults::default(),
            device: DeviceSettings::default(),
            nbd: ConnectionCaps::default(),
            tuning: Tuning::default(),
            nbd_client: NbdClientSettings::default(),
            file: None,
        }
    }
}

/// The site file as written (every key optional).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    #[serde(default)]
    block_device: BlockDeviceSection,
    #[serde(default)]
    ublk: UblkSection,
    #[serde(default)]
    io: IoSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    nbd: NbdSection,
    #[serde(default)]
    tuning: TuningSection,
    #[serde(default)]
    nbd_client: NbdClientSection,
}

/// Most connections a cap may allow.
const MAX_CONNECTIONS_LIMIT: u32 = 1 << 20;

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NbdSection {
    max_connections_per_vbd: Option<i64>,
    max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BlockDeviceSection {
    open: Option<BlockDeviceChoice>,
    create: Option<BlockDeviceChoice>,
    compat_symlinks: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct UblkSection {
    queues: Option<i64>,
    depth: Option<i64>,
    max_io_kib: Option<i64>,
    user_copy: Option<UserCopy>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct IoSection {
    engine: Option<EngineChoice>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    filter: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TuningSection {
    mapped_reads: Option<bool>,
    nbd_gather: Option<bool>,
    ublk_bridge: Option<Bridge>,
    ublk_affinity: Option<Affinity>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NbdClientSection {
    request_timeout: Option<i64>,
    handshake_timeout: Option<i64>,
    max_in_flight: Option<i64>,
    tls_certificates: Option<PathBuf>,
}

impl NbdClientSection {
    /// Applies the keys present to `settings`.
    fn apply(&self, settings: &mut NbdClientSettings, origin: &str) -> Result<(), ConfigError> {
        let seconds = |key, value| in_range(origin, key, value, 1..=3600u64);
        if let Some(secs) = self.request_timeout {
            settings.request_timeout =
                std::time::Duration::from_secs(seconds("nbd_client.request_timeout", secs)?);
        }
        if let Some(secs) = self.handshake_timeout {
            settings.handshake_timeout =
                std::time::Duration::from_secs(seconds("nbd_client.handshake_timeout", secs)?);
        }
        if let Some(slots) = self.max_in_flight {
            settings.max_in_flight = in_range(origin, "nbd_client.max_in_flight", slots, 1..=4096)?;
        }
        match &self.tls_certificates {
            Some(dir) if dir.as_os_str().is_empty() => settings.tls_certificates = None,
            Some(dir) => {
                // Checked now, so a wrong directory stops tapdisk at start; read again at
                // every connection, so renewed certificates are picked up.
                nbd::tls::ClientTls::from_dir(dir).map_err(|e| ConfigError::Value {
                    origin: origin.to_owned(),
                    key: "nbd_client.tls_certificates",
                    value: format!("{:?}", dir.display().to_string()),
                    reason: e.to_string(),
                })?;
                settings.tls_certificates = Some(dir.clone());
            }
            None => {}
        }
        Ok(())
    }
}

/// The per-VBD options an OPEN may carry (the same keys as the site file's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenOptionsText {
    #[serde(default)]
    block_device: OpenBlockDeviceSection,
    #[serde(default)]
    ublk: UblkSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBlockDeviceSection {
    compat_symlinks: Option<bool>,
}

/// Parses TOML `text` from `origin`; errors name the line.
fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim_end().to_owned();
        ConfigError::Syntax {
            origin: origin.to_owned(),
            message: match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        }
    })
}

/// Checks an integer against `range`.
fn in_range<T>(
    origin: &str,
    key: &'static str,
    value: i64,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: TryFrom<i64> + PartialOrd + std::fmt::Display,
{
    T::try_from(value)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| ConfigError::Value {
            origin: origin.to_owned(),
            key,
            value: value.to_string(),
            reason: format!("expected {} to {}", range.start(), range.end()),
        })
}

impl UblkSection {
    /// Applies the keys present to `device`.
    fn apply(&self, device: &mut DeviceSettings, origin: &str) -> Result<(), ConfigError> {
        if let Some(queues) = self.queues {
            device.ublk_queues = in_range(origin, "ublk.queues", queues, 1..=MAX_QUEUES)?;
        }
        if let Some(depth) = self.depth {
            device.ublk_depth = in_range(origin, "ublk.depth", depth, 1..=MAX_DEPTH)?;
        }
        if let Some(kib) = self.max_io_kib {
            let kib = in_range(origin, "ublk.max_io_kib", kib, 4..=MAX_IO_KIB_LIMIT)?;
            if kib % 4 != 0 {
                return Err(ConfigError::Value {
                    origin: origin.to_owned(),
                    key: "ublk.max_io_kib",
                    value: kib.to_string(),
                    reason: format!("expected a multiple of 4 from 4 to {MAX_IO_KIB_LIMIT}"),
                });
            }
            device.ublk_max_io_kib = kib;
        }
        if let Some(user_copy) = self.user_copy {
            device.ublk_user_copy = user_copy;
        }
        Ok(())
    }
}

/// Checks a log filter.
fn log_filter(origin: &str, key: &'static str, value: &str) -> Result<String, ConfigError> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| value.to_owned())
        .map_err(|e| ConfigError::Value {
            origin: origin.to_owned(),
            key,
            value: format!("{value:?}"),
            reason: e.to_string(),
        })
}

impl DeviceSettings {
    /// These settings with an OPEN's own options applied: `text` holds `key = value` lines
    /// with the per-VBD keys of the site file (`ublk.queues = 4`,
    /// `block_device.compat_symlinks = true`).
    pub fn with_open_options(&self, text: &str) -> Result<Self, ConfigError> {
        const ORIGIN: &str = "open options";
        let options: OpenOptionsText = parse_toml(text, ORIGIN)?;
        let mut device = *self;
        options.ublk.apply(&mut device, ORIGIN)?;
        if let Some(links) = options.block_device.compat_symlinks {
            device.compat_symlinks = links;
        }
        Ok(device)
    }

    /// The ublk device configuration these settings and `tuning` give.
    pub fn ublk(&self, tuning: &Tuning) -> UblkConfig {
        UblkConfig {
            queues: self.ublk_queues,
            depth: self.ublk_depth,
            max_io_bytes: self.ublk_max_io_kib * 1024,
            user_copy: self.ublk_user_copy,
            compat_symlinks: self.compat_symlinks,
            bridge: tuning.ublk_bridge,
            affinity: tuning.ublk_affinity,
        }
    }
}

impl Config {
    /// The configuration of this process: `flags`, the environment, the site file.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        Self::load_with(flags, |name| {
            std::env::var_os(name)
                .filter(|value| !value.is_empty())
                .map(|value| value.to_string_lossy().into_owned())
        })
    }

    /// [`Config::load`] with the environment read through `env` (variable name to value).
    pub fn load_with(
        flags: &Flags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let named = flags
            .config_file
            .clone()
            .or_else(|| env(FILE_ENV).map(PathBuf::from));
        let mut config = match &named {
            Some(path) => Self::from_file(path)?,
            None => match std::fs::read_to_string(DEFAULT_FILE) {
                Ok(text) => Self::from_text(&text, Path::new(DEFAULT_FILE))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Self::default(),
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: PathBuf::from(DEFAULT_FILE),
                        source,
                    })
                }
            },
        };
        if let Some(filter) = env(LOG_ENV) {
            config.log_filter = log_filter("environment", LOG_ENV, &filter)?;
        }
        if let Some(dir) = env(CONTROL_DIR_ENV) {
            config.control_dir = PathBuf::from(dir);
        }
        Ok(config)
    }

    /// The built-in defaults with the site file at `path` applied.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(&text, path)
    }

    /// The built-in defaults with site file `text` (read from `path`) applied.
    pub fn from_text(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let site: SiteFile = parse_toml(text, &origin)?;
        let mut config = Self {
            file: Some(path.to_path_buf()),
            ..Self::default()
        };
        let blockdev = &site.block_device;
        if let Some(open) = blockdev.open {
            config.block_device.open = open;
        }
        if let Some(create) = blockdev.create {
            config.block_device.create = create;
        }
        if let Some(links) = blockdev.compat_symlinks {
            config.device.compat_symlinks = links;
        }
        site.ublk.apply(&mut config.device, &origin)?;
        if let Some(engine) = site.io.engine {
            config.io.engine = engine;
        }
        if let Some(filter) = &site.log.filter {
            config.log_filter = log_filter(&origin, "log.filter", filter)?;
        }
        let range = 1..=MAX_CONNECTIONS_LIMIT;
        if let Some(cap) = site.nbd.max_connections_per_vbd {
            let cap: u32 = in_range(&origin, "nbd.max_connections_per_vbd", cap, range.clone())?;
            config.nbd.per_vbd = usize::try_from(cap).unwrap_or(usize::MAX);
        }
        if let Some(cap) = site.nbd.max_connections {
            let cap: u32 = in_range(&origin, "nbd.max_connections", cap, range)?;
            config.nbd.per_tapdisk = usize::try_from(cap).unwrap_or(usize::MAX);
        }
        let tuning = &site.tuning;
        if let Some(mapped) = tuning.mapped_reads {
            config.io.mapped_reads = mapped;
        }
        if let Some(gather) = tuning.nbd_gather {
            config.tuning.nbd_gather = gather;
        }
        if let Some(bridge) = tuning.ublk_bridge {
            config.tuning.ublk_bridge = bridge;
        }
        if let Some(affinity) = tuning.ublk_affinity {
            config.tuning.ublk_affinity = affinity;
        }
        site.nbd_client.apply(&mut config.nbd_client, &origin)?;
        Ok(config)
    }

    /// The configuration in effect as a site file (every key spelled out), for
    /// `tapdisk --print-config`; the control directory follows as a comment.
    pub fn to_toml(&self) -> String {
        let device = &self.device;
        let site = SiteFile {
            block_device: BlockDeviceSection {
                open: Some(self.block_device.open),
                create: Some(self.block_device.create),
                compat_symlinks: Some(device.compat_symlinks),
            },
            ublk: UblkSection {
                queues: Some(i64::from(device.ublk_queues)),
                depth: Some(i64::from(device.ublk_depth)),
                max_io_kib: Some(i64::from(device.ublk_max_io_kib)),
                user_copy: Some(device.ublk_user_copy),
            },
            io: IoSection {
                engine: Some(self.io.engine),
            },
            log: LogSection {
                filter: Some(self.log_filter.clone()),
            },
            nbd: NbdSection {
                max_connections_per_vbd: i64::try_from(self.nbd.per_vbd).ok(),
                max_connections: i64::try_from(self.nbd.per_tapdisk).ok(),
            },
            tuning: TuningSection {
                mapped_reads: Some(self.io.mapped_reads),
                nbd_gather: Some(self.tuning.nbd_gather),
                ublk_bridge: Some(self.tuning.ublk_bridge),
                ublk_affinity: Some(self.tuning.ublk_affinity),
            },
            nbd_client: NbdClientSection {
                request_timeout: i64::try_from(self.nbd_client.request_timeout.as_secs()).ok(),
                handshake_timeout: i64::try_from(self.nbd_client.handshake_timeout.as_secs()).ok(),
                max_in_flight: Some(i64::from(self.nbd_client.max_in_flight)),
                tls_certificates: Some(
                    self.nbd_client.tls_certificates.clone().unwrap_or_default(),
                ),
            },
        };
        let source = match &self.file {
            Some(file) => format!("# site file: {}\n", file.display()),
            None => "# site file: none (built-in defaults)\n".to_owned(),
        };
        format!(
            "{source}# control directory: {}\n{}",
            self.control_dir.display(),
            toml::to_string(&site).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn site(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, Path::new("/etc/blktap/tapdisk.toml"))
    }

    #[test]
    fn flags() {
        let args = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(Flags::parse(args("")).unwrap(), Flags::default());
        let flags = Flags::parse(args("-D -c /x.toml --print-config")).unwrap();
        assert!(flags.foreground && flags.print_config && !flags.help);
        assert_eq!(flags.config_file, Some(PathBuf::from("/x.toml")));
        let flags = Flags::parse(args("--config=/y.toml -h")).unwrap();
        assert_eq!(flags.config_file, Some(PathBuf::from("/y.toml")));
        assert!(flags.help);
        for bad in ["-x", "-c", "--verbose"] {
            let error = Flags::parse(args(bad)).unwrap_err();
            assert!(matches!(error, ConfigError::Usage(_)), "{bad}");
        }
    }

    #[test]
    fn nbd_connection_caps() {
        let config = site("[nbd]\nmax_connections_per_vbd = 4\nmax_connections = 9").unwrap();
        assert_eq!((config.nbd.per_vbd, config.nbd.per_tapdisk), (4, 9));
        assert_eq!(Config::default().nbd, ConnectionCaps::default());
        for bad in ["max_connections_per_vbd = 0", "max_connections = -1"] {
            let error = site(&format!("[nbd]\n{bad}")).unwrap_err();
            assert!(matches!(error, ConfigError::Value { .. }), "{bad}: {error}");
        }
        let printed = Config::default().to_toml();
        assert!(
            printed.contains("[nbd]\nmax_connections_per_vbd = 128\nmax_connections = 1024"),
            "{printed}"
        );
    }

    #[test]
    fn built_in_defaults() {
        let config = Config::default();
        assert_eq!(config.block_device.open, BlockDeviceChoice::None);
        assert_eq!(config.block_device.create, BlockDeviceChoice::Auto);
        assert_eq!(config.device.ublk(&config.tuning), UblkConfig::default());
        assert_eq!(config.io, IoSettings::default());
        assert_eq!(config.log_filter, "info");
        assert_eq!(config.control_dir, Path::new("/run/blktap-control"));
        // An empty site file changes nothing but the file named.
        let empty = site("").unwrap();
        assert_eq!(
            empty,
            Config {
                file: Some(PathBuf::from("/etc/blktap/tapdisk.toml")),
                ..Config::default()
            }
        );
    }

    #[test]
    fn every_key_of_the_site_file() {
        let config = site(
            "[block_device]\nopen = \"ublk\"\ncreate = \"none\"\ncompat_symlinks = true\n\
             [ublk]\nqueues = 4\ndepth = 128\nmax_io_kib = 1024\nuser_copy = \"off\"\n\
             [io]\nengine = \"pread\"\n[log]\nfilter = \"debug\"\n\
             [tuning]\nmapped_reads = false\nnbd_gather = false\nublk_bridge = \"spawn\"\n\
             ublk_affinity = \"other\"\n\
             [nbd_client]\nrequest_timeout = 5\nhandshake_timeout = 3\nmax_in_flight = 8\n",
        )
        .unwrap();
        assert_eq!(
            config.block_device,
            BlockDeviceDefaults {
                open: BlockDeviceChoice::Ublk,
                create: BlockDeviceChoice::None
            }
        );
        assert_eq!(
            config.device,
            DeviceSettings {
                ublk_queues: 4,
                ublk_depth: 128,
                ublk_max_io_kib: 1024,
                ublk_user_copy: UserCopy::Off,
                compat_symlinks: true,
            }
        );
        assert_eq!(
            config.io,
            IoSettings {
                engine: EngineChoice::Pread,
                mapped_reads: false
            }
        );
        assert_eq!(config.log_filter, "debug");
        assert_eq!(
            config.tuning,
            Tuning {
                nbd_gather: false,
                ublk_bridge: Bridge::Spawn,
                ublk_affinity: Affinity::Other,
            }
        );
        assert_eq!(config.device.ublk(&config.tuning).max_io_bytes, 1024 * 1024);
        assert_eq!(
            config.nbd_client,
            NbdClientSettings {
                request_timeout: std::time::Duration::from_secs(5),
                handshake_timeout: std::time::Duration::from_secs(3),
                max_in_flight: 8,
                tls_certificates: None,
            }
        );
        // What --print-config prints reads back as the same configuration.
        let printed = config.to_toml();
        let again = Config::from_text(&printed, Path::new("/etc/blktap/tapdisk.toml")).unwrap();
        assert_eq!(again, config);
        assert_eq!(
            site("[io]\nengine = \"uring\"").unwrap().io.engine,
            EngineChoice::Uring
        );
    }

    #[test]
    fn bad_values_name_key_value_and_file() {
        for (text, wanted) in [
            (
                "[ublk]\nqueues = 0",
                "/etc/blktap/tapdisk.toml: ublk.queues = 0: expected 1 to 64",
            ),
            ("[ublk]\nqueues = 65", "ublk.queues = 65: expected 1 to 64"),
            ("[ublk]\ndepth = -1", "ublk.depth = -1: expected 1 to 4096"),
            ("[ublk]\ndepth = 4097", "ublk.depth = 4097"),
            (
                "[ublk]\nmax_io_kib = 6",
                "ublk.max_io_kib = 6: expected a multiple of 4",
            ),
            ("[ublk]\nmax_io_kib = 65536", "ublk.max_io_kib = 65536"),
            ("[log]\nfilter = \"[\"", "log.filter = \"[\""),
            (
                "[nbd_client]\nrequest_timeout = 0",
                "nbd_client.request_timeout = 0: expected 1 to 3600",
            ),
            (
                "[nbd_client]\nmax_in_flight = 5000",
                "nbd_client.max_in_flight = 5000",
            ),
            (
                "[nbd_client]\ntls_certificates = \"/nonexistent/pki\"",
                "nbd_client.tls_certificates = \"/nonexistent/pki\": cannot load certificate \
                 authorities from /nonexistent/pki/ca-cert.pem",
            ),
        ] {
            let error = site(text).unwrap_err();
            assert!(
                matches!(error, ConfigError::Value { .. }),
                "{text}: {error}"
            );
            assert!(error.to_string().contains(wanted), "{text}: {error}");
            assert_eq!(error.errno(), libc::EINVAL);
        }
        for (text, wanted) in [
            ("[ublk]\nqueues = \"two\"", "line 2"),
            ("[ublk]\nuser_copy = \"maybe\"", "maybe"),
            ("[io]\nengine = \"auto2\"", "auto2"),
            ("[block_device]\nopen = \"nbd\"", "nbd"),
            ("[ublk]\nqueus = 2", "queus"),
            ("[tapdisk]\nx = 1", "tapdisk"),
            ("[tuning]\nublk_affinity = \"cpu0\"", "cpu0"),
            ("[tuning]\nnbd_gather = \"off\"", "line 2"),
            ("not toml", "line 1"),
        ] {
            let error = site(text).unwrap_err();
            assert!(
                matches!(error, ConfigError::Syntax { .. }),
                "{text}: {error}"
            );
            let message = error.to_string();
            assert!(
                message.starts_with("/etc/blktap/tapdisk.toml: ") && message.contains(wanted),
                "{text}: {message}"
            );
        }
    }

    #[test]
    fn precedence_flag_env_file_built_in() {
        let dir = tempfile::tempdir().unwrap();
        let from_flag = dir.path().join("flag.toml");
        let from_env = dir.path().join("env.toml");
        std::fs::write(&from_flag, "[ublk]\nqueues = 3\n[log]\nfilter = \"warn\"\n").unwrap();
        std::fs::write(&from_env, "[ublk]\nqueues = 5\n").unwrap();
        let flags = Flags {
            config_file: Some(from_flag.clone()),
            ..Flags::default()
        };
        let env_file = from_env.display().to_string();
        let config = Config::load_with(&flags, env(&[(FILE_ENV, &env_file)])).unwrap();
        assert_eq!(config.device.ublk_queues, 3);
        assert_eq!(config.file, Some(from_flag.clone()));
        assert_eq!(config.log_filter, "warn");
        let config = Config::load_with(&Flags::default(), env(&[(FILE_ENV, &env_file)])).unwrap();
        assert_eq!(config.device.ublk_queues, 5);
        // The environment's log filter and control directory beat the file's.
        let config = Config::load_with(
            &flags,
            env(&[(LOG_ENV, "debug"), (CONTROL_DIR_ENV, "/tmp/ctl")]),
        )
        .unwrap();
        assert_eq!(config.log_filter, "debug");
        assert_eq!(config.control_dir, Path::new("/tmp/ctl"));
        let error = Config::load_with(&flags, env(&[(LOG_ENV, "a=b=c")])).unwrap_err();
        assert!(
            error.to_string().starts_with("environment: TAPDISK_LOG = "),
            "{error}"
        );
        // A named file must exist.
        let missing = Flags {
            config_file: Some(dir.path().join("missing.toml")),
            ..Flags::default()
        };
        let error = Config::load_with(&missing, env(&[])).unwrap_err();
        assert_eq!(error.errno(), libc::ENOENT);
        assert!(error.to_string().contains("missing.toml"), "{error}");
    }

    #[test]
    fn open_options_override_the_site_defaults() {
        let defaults = site("[ublk]\nqueues = 4\ndepth = 32").unwrap().device;
        let device = defaults
            .with_open_options(
                "ublk.depth = 128\nublk.user_copy = \"off\"\nblock_device.compat_symlinks = true",
            )
            .unwrap();
        assert_eq!(device.ublk_queues, 4);
        assert_eq!(device.ublk_depth, 128);
        assert_eq!(device.ublk_user_copy, UserCopy::Off);
        assert!(device.compat_symlinks);
        assert_eq!(defaults.with_open_options("").unwrap(), defaults);
        let error = defaults.with_open_options("ublk.queues = 0").unwrap_err();
        assert_eq!(
            error.to_string(),
            "open options: ublk.queues = 0: expected 1 to 64"
        );
        // Only per-VBD keys: the site's choices and tuning are not open options.
        for text in [
            "io.engine = \"pread\"",
            "block_device.open = \"ublk\"",
            "x = 1",
        ] {
            let error = defaults.with_open_options(text).unwrap_err();
            assert!(
                error.to_string().starts_with("open options: line 1"),
                "{error}"
            );
        }
    }

    /// The site file the Debian package installs as `/etc/blktap/tapdisk.toml`.
    const SHIPPED: &str = include_str!("../../../packaging/tapdisk.toml");
    /// Its manual page, tapdisk.toml(5).
    const MANUAL: &str = include_str!("../../../docs/man/tapdisk.toml.5");

    /// `section.key` of every key line in TOML `text`.
    fn keys(text: &str) -> std::collections::BTreeSet<String> {
        let mut section = "";
        let mut found = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
            } else if let Some((key, _)) = line.split_once(" = ") {
                if !key.starts_with('#') {
                    found.insert(format!("{section}.{key}"));
                }
            }
        }
        found
    }

    /// The shipped file's commented `#key = value` lines, uncommented.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `to_toml` without its comment lines (which name the file read).
    fn settings(config: &Config) -> String {
        let text = config.to_toml();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        lines.join("\n")
    }

    #[test]
    fn shipped_site_file_spells_out_the_defaults() {
        let defaults = settings(&Config::default());
        assert_eq!(settings(&site(SHIPPED).unwrap()), defaults, "as shipped");
        let all_set = uncommented(SHIPPED);
        assert_eq!(settings(&site(&all_set).unwrap()), defaults, "uncommented");
        assert_eq!(keys(&all_set), keys(&Config::default().to_toml()));
    }

    #[test]
    fn manual_page_documents_exactly_the_keys() {
        // Keys are the `.TP` tags (`.B key`) under a `.SS [section]` heading.
        let mut section = None;
        let mut documented = std::collections::BTreeSet::new();
        for (tag, line) in MANUAL.lines().zip(MANUAL.lines().skip(1)) {
            if line.starts_with(".SH") || line.starts_with(".SS") {
                section = line
                    .strip_prefix(".SS [")
                    .and_then(|rest| rest.strip_suffix(']'));
            } else if let (Some(section), ".TP", Some(key)) =
                (section, tag, line.strip_prefix(".B "))
            {
                documented.insert(format!("{section}.{key}"));
            }
        }
        assert_eq!(documented, keys(&Config::default().to_toml()));
    }

    #[test]
    fn manual_page_documents_exactly_the_flags() {
        let page = include_str!("../../../docs/man/tapdisk.8");
        let short = getopt::manual::documented_options(page)
            .remove("OPTIONS")
            .unwrap_or_default();
        for letter in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
            let flag = format!("-{letter}");
            let accepted = Flags::parse([flag.clone()]).is_ok()
                || Flags::parse([flag, "file".to_owned()]).is_ok();
            assert_eq!(accepted, short.contains(&letter), "-{letter}");
        }
        for long in [&["--config", "f"][..], &["--print-config"], &["--help"]] {
            assert!(Flags::parse(long.iter().map(|arg| (*arg).to_owned())).is_ok());
            let roff = long[0].replace('-', "\\-");
            assert!(page.contains(&roff), "{} undocumented", long[0]);
        }
    }
}
