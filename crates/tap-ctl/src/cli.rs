//! Command-line parsing and execution of `tap-ctl`, compatible with the C tool.
//!
//! Conventions kept from the C tool: with no arguments the global usage goes to stdout with
//! exit status 0; `-h` prints a command's usage on stdout (exit 0); an
//! unknown option, a missing option value, a missing required option or a malformed number
//! prints the usage on stderr and exits with `EINVAL` (22); `--debug` is removed wherever it
//! appears (accepted, no debug output yet). A failed operation prints
//! `tap-ctl: <command>: <what failed>: <strerror>` on stderr and exits with the errno.
//! Unlike the C tool, an unknown command is an error (the global usage on stderr, exit
//! `EINVAL`): the C tool's exit status 0 made scripts take a misspelt command for success.
//!
//! XCP-ng's live commit commands: `commit -p -m -a PATH` (start), `query -p -m` (prints
//! `Commit status '<status>' (<current>/<total>)`), `cancel -p -m [-w]`.
//!
//! IntelliCache's options go to tapdisk: `-r` (`ADD_LCACHE`: a local cache of the parent
//! chain) and `-e MINOR` (`REUSE_PRT`: the parent chain is that VBD's NBD export).
//! Options the daemon does not implement yet (`create -d`, `open -E`) are parsed
//! and then refused with "not supported yet" and `EOPNOTSUPP` (95), without contacting any
//! tapdisk. The changed-block log (`create`/`open`/`recover -C`, `unpause -c`) is made an
//! absolute path, as image paths are (tapdisk runs in `/`); so is a secondary image's
//! (`-2 TYPE:PATH`) when it is a local file. `major` and `check` belonged to the
//! kernel-device (v3) stack: `major` reports that no blktap device major exists (`ENOSYS`),
//! `check` prints `ok` because nothing kernel-side is needed.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blktapctl::{Error, ImageSpec, ListFilter, OpenFlags, OpenRequest, ResumeRequest};

use crate::config::Config;
use getopt::Getopt;

/// The commands, in the order the global usage lists them.
pub const COMMANDS: [&str; 20] = [
    "list",
    "allocate",
    "free",
    "create",
    "destroy",
    "spawn",
    "attach",
    "detach",
    "open",
    "close",
    "pause",
    "unpause",
    "stats",
    "commit",
    "query",
    "cancel",
    "recover",
    "nbd-listen",
    "major",
    "check",
];

/// A fully parsed command line ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List {
        filter: ListFilter,
    },
    Allocate,
    Free {
        minor: u32,
    },
    Create {
        request: OpenRequest,
    },
    Destroy {
        pid: u32,
        minor: u32,
        timeout: Option<Duration>,
    },
    Spawn,
    Attach {
        pid: u32,
        minor: u32,
    },
    Detach {
        pid: u32,
        minor: u32,
    },
    Open {
        pid: u32,
        minor: u32,
        request: OpenRequest,
        /// `-E`: the XTS-AES key (32 or 64 bytes) is read from stdin when the command runs.
        key_from_stdin: bool,
    },
    Close {
        pid: u32,
        minor: u32,
        force: bool,
        timeout: Option<Duration>,
    },
    Pause {
        pid: u32,
        minor: u32,
        timeout: Option<Duration>,
    },
    Unpause {
        pid: u32,
        minor: u32,
        request: ResumeRequest,
    },
    Stats {
        pid: u32,
        minor: u32,
    },
    /// Start a live commit of the VBD's active layer `path` (XCP-ng).
    Commit {
        pid: u32,
        minor: u32,
        path: String,
    },
    /// Print the commit job's progress (XCP-ng).
    Query {
        pid: u32,
        minor: u32,
    },
    /// Cancel the commit job, with `wait` until it stopped (XCP-ng).
    Cancel {
        pid: u32,
        minor: u32,
        wait: bool,
    },
    /// Serve a VBD's NBD export on TCP too (blktap-rs extension): `spec` is
    /// `ADDRESS tls=DIR` or `ADDRESS plain`.
    NbdListen {
        pid: u32,
        minor: u32,
        spec: String,
    },
    /// Re-attach a block device whose tapdisk died to a new tapdisk (blktap-rs extension).
    Recover {
        minor: u32,
        request: OpenRequest,
    },
    Major,
    Check,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run `command` (named `name` in error messages).
    Run {
        name: &'static str,
        command: Command,
    },
    /// Print this text on stdout and exit 0.
    Help(String),
    /// Print `message` (if any) and the usage on stderr, exit `EINVAL`.
    Usage {
        message: Option<String>,
        usage: String,
    },
    /// Refuse an option the daemon cannot honour yet: exit `EOPNOTSUPP`.
    Unsupported { name: &'static str, what: String },
}

/// Why parsing stopped before producing a [`Command`] (the non-`Run` cases of [`Action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    Help(String),
    Usage {
        message: Option<String>,
        usage: String,
    },
    Unsupported {
        name: &'static str,
        what: String,
    },
}

impl From<Stop> for Action {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Help(text) => Action::Help(text),
            Stop::Usage { message, usage } => Action::Usage { message, usage },
            Stop::Unsupported { name, what } => Action::Unsupported { name, what },
        }
    }
}

/// The global usage (`usage: tap-ctl COMMAND [OPTIONS]` plus the command list).
pub fn global_usage() -> String {
    format!(
        "usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := {{ {} }}\n",
        COMMANDS.join(" | ")
    )
}

/// The usage text of one command.
pub fn usage(name: &str) -> String {
    let text = match name {
        "list" => {
            "usage: list [-h] [-p pid] [-m minor] [-t type] [-f file]\n\n\
                   Lists VBDs, tapdisks and allocated minors; on a terminal as\n\
                   pid minor state type file, otherwise as pid= minor= state= args= fields\n"
        }
        "allocate" => "usage: allocate [-h]\n",
        "free" => "usage: free <-m minor>\n",
        "create" => {
            "usage: create <-a type:/path/to/file> [-R read-only] [-D no O_DIRECT] \
                     [-t request timeout in seconds] [-d device name] [-r read cache] \
                     [-e <minor> reuse parent chain] [-2 <type:/path> secondary image] \
                     [-s standby secondary] [-C <logfile> changed-block log] \
                     [-b auto|ublk|fuse|none block device] [-o key=value[,key=value...] \
                     device options]\n"
        }
        "destroy" => "usage: destroy <-p pid> <-m minor> [-t timeout in seconds]\n",
        "spawn" => "usage: spawn [-h]\n",
        "attach" => "usage: attach <-p pid> <-m minor>\n",
        "detach" => "usage: detach <-p pid> <-m minor>\n",
        "open" => {
            "usage: open <-p pid> <-m minor> <-a type:/path/to/file> [-R read-only] \
                   [-D no O_DIRECT] [-t request timeout in seconds] [-r read cache] \
                   [-e <minor> reuse parent chain] [-2 <type:/path> secondary image] \
                   [-s standby secondary] [-C <logfile> changed-block log] \
                   [-E key on stdin] [-b auto|ublk|fuse|none block device] \
                   [-o key=value[,key=value...] device options]\n"
        }
        "close" => "usage: close <-p pid> <-m minor> [-f force] [-t timeout in seconds]\n",
        "pause" => "usage: pause <-p pid> <-m minor> [-t timeout in seconds]\n",
        "unpause" => {
            "usage: unpause <-p pid> <-m minor> [-a type:/path/to/file] \
                      [-2 <type:/path> secondary image] [-c <logfile> changed-block log]\n"
        }
        "stats" => {
            "usage: stats <-p pid> <-m minor>\n\n\
                    Prints the VBD statistics as a JSON-style object; images are listed \
                    leaf first, root last\n"
        }
        "commit" => "usage: commit <-p pid> <-m minor> <-a /path/to/file>\n",
        "query" => "usage: query <-p pid> <-m minor>\n",
        "cancel" => "usage: cancel <-p pid> <-m minor> [-w]\n",
        "recover" => {
            "usage: recover <-m minor> [-a type:/path/to/file] [-R read-only] [-D no O_DIRECT] \
                     [-t request timeout in seconds] [-C <logfile> changed-block log]\n\n\
                     Spawns a tapdisk for a minor whose tapdisk died and re-attaches it to the\n\
                     minor's surviving ublk device; without -a the recorded image is reopened\n"
        }
        "major" => "usage: major [-h]\n",
        "nbd-listen" => {
            "usage: nbd-listen <-p pid> <-m minor> <-l address:port> \
                     <-T tls certificate directory | -P plaintext>\n\n\
                     Also serves the VBD's NBD export on TCP until the VBD is closed; the\n\
                     directory holds server-cert.pem and server-key.pem. Prints the bound address.\n"
        }
        "check" => "usage: check\n(checks whether this host can run tapdisk)\n",
        _ => return global_usage(),
    };
    text.to_owned()
}

/// Options collected by one command's getopt loop.
#[derive(Debug, Default)]
struct Collected {
    pid: Option<u32>,
    minor: Option<u32>,
    args: Option<String>,
    timeout_secs: Option<u64>,
    force: bool,
    readonly: bool,
    no_o_direct: bool,
    driver: Option<String>,
    file: Option<String>,
    /// `-b`: which kernel block device serves the VBD.
    block_device: Option<OpenFlags>,
    /// `-o`: per-VBD device options, as `key = value` lines for tapdisk.
    options: Vec<String>,
    /// `-C` (`create`, `open`, `recover`) or `-c` (`unpause`): the changed-block log.
    log: Option<String>,
    /// `-2`: the secondary image (`TYPE:LOCATOR`, or `null` to remove it on unpause).
    secondary: Option<String>,
    /// `-s`: the secondary is a standby.
    standby: bool,
    /// `-r`: a local cache of the parent chain (IntelliCache).
    local_cache: bool,
    /// `-e MINOR`: the parent chain is that VBD's NBD export (IntelliCache).
    parent_minor: Option<u32>,
    /// Options given that the daemon does not support yet: (letter, description).
    unsupported: Vec<(char, &'static str)>,
    key_from_stdin: bool,
    /// `nbd-listen -l`: TCP address.
    listen: Option<String>,
    /// `nbd-listen -T`: TLS certificate directory.
    tls_dir: Option<String>,
    /// `nbd-listen -P`: plaintext TCP, explicitly.
    plaintext: bool,
    /// `cancel -w`: wait until the job stopped.
    wait: bool,
}

/// A number option's value, or the usage error for it.
fn number<T: std::str::FromStr>(name: &str, letter: char, value: &str) -> Result<T, Stop> {
    let digits_only = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    value
        .parse::<T>()
        .ok()
        .filter(|_| digits_only)
        .ok_or_else(|| Stop::Usage {
            message: Some(format!(
                "tap-ctl: {name}: invalid value '{value}' for -{letter}"
            )),
            usage: usage(name),
        })
}

fn usage_error(name: &str, message: Option<String>) -> Stop {
    Stop::Usage {
        message,
        usage: usage(name),
    }
}

/// Runs getopt over `args` for command `name`, filling [`Collected`]. `Err` is the action to
/// take instead (help or usage error).
fn collect(name: &'static str, args: &[String], spec: &str) -> Result<Collected, Stop> {
    let mut c = Collected::default();
    for item in Getopt::new(args, spec) {
        let (letter, value) = item.map_err(|e| usage_error(name, Some(format!("tap-ctl: {e}"))))?;
        let value = value.unwrap_or_default();
        match (name, letter) {
            (_, 'h') => return Err(Stop::Help(usage(name))),
            // -b / -c of `major` chose block or character majors; neither exists here.
            ("major", _) => {}
            ("nbd-listen", 'l') => c.listen = Some(value),
            ("nbd-listen", 'T') => c.tls_dir = Some(value),
            ("nbd-listen", 'P') => c.plaintext = true,
            ("cancel", 'w') => c.wait = true,
            (_, 'p') => c.pid = Some(number(name, letter, &value)?),
            (_, 'm') => c.minor = Some(number(name, letter, &value)?),
            (_, 'a') => c.args = Some(value),
            (_, 'f') if name == "list" => c.file = Some(value),
            (_, 'f') => c.force = true,
            ("list", 't') => c.driver = Some(value),
            (_, 't') => c.timeout_secs = Some(number(name, letter, &value)?),
            (_, 'b') => c.block_device = Some(block_device_mode(name, &value)?),
            (_, 'o') => c.options.extend(device_options(name, &value)?),
            (_, 'R') => c.readonly = true,
            (_, 'D') => c.no_o_direct = true,
            (_, 'd') => c.unsupported.push(('d', "device name")),
            (_, 'r') => c.local_cache = true,
            (_, 'e') => c.parent_minor = Some(number(name, letter, &value)?),
            (_, '2') => c.secondary = Some(absolute_params(value)),
            (_, 's') => c.standby = true,
            (_, 'C' | 'c') => c.log = Some(absolute_path(Path::new(&value))),
            (_, 'E') => c.key_from_stdin = true,
            _ => {}
        }
    }
    Ok(c)
}

/// The open flags of a `-b` value: `auto` (ublk, else FUSE + loop), `ublk`, `fuse`, `none`.
fn block_device_mode(name: &str, value: &str) -> Result<OpenFlags, Stop> {
    match value {
        "auto" => Ok(OpenFlags::BLOCKDEV_AUTO),
        "ublk" => Ok(OpenFlags::BLOCKDEV_UBLK),
        "fuse" => Ok(OpenFlags::BLOCKDEV_FUSE),
        "none" => Ok(OpenFlags::BLOCKDEV_NONE),
        other => Err(usage_error(
            name,
            Some(format!(
                "tap-ctl: {name}: block device '{other}' is not one of auto, ublk, fuse, none"
            )),
        )),
    }
}

/// The `key = value` lines of a `-o key=value[,key=value...]` argument. Keys are tapdisk's
/// per-VBD settings (`ublk.queues`, `ublk.depth`, `ublk.max_io_kib`, `ublk.user_copy`,
/// `block_device.compat_symlinks`), which tapdisk checks; numbers and `true`/`false` go as
/// they are, anything else as a string.
fn device_options(name: &str, value: &str) -> Result<Vec<String>, Stop> {
    let bad = |what: &str| {
        usage_error(
            name,
            Some(format!(
                "tap-ctl: {name}: device option '{what}' is not key=value"
            )),
        )
    };
    value
        .split(',')
        .map(|item| {
            let (key, value) = item.split_once('=').ok_or_else(|| bad(item))?;
            let key_ok = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._".contains(&b));
            if !key_ok || value.is_empty() {
                return Err(bad(item));
            }
            let bare = value.parse::<i64>().is_ok() || value == "true" || value == "false";
            Ok(if bare {
                format!("{key} = {value}")
            } else {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                format!("{key} = \"{escaped}\"")
            })
        })
        .collect()
}

/// Makes a path absolute (tapdisk runs in `/`).
fn absolute_path(path: &Path) -> String {
    if path.is_absolute() {
        return path.display().to_string();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path).display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

/// Makes the relative path of a file image's `TYPE:PATH` argument absolute (tapdisk runs in
/// `/`). Other locators (`nbd:unix:SOCKET:exportname=NAME`, `rbd:pool/image`) and
/// arguments that are not `TYPE:LOCATOR` at all go to tapdisk exactly as given.
fn absolute_params(params: String) -> String {
    let Ok(spec) = ImageSpec::parse(&params) else {
        return params;
    };
    match spec.relative_path() {
        Some(relative) => format!("{}:{}", spec.type_name, absolute_path(relative)),
        None => params,
    }
}

/// Requires `-p` and `-m`.
fn pid_minor(name: &str, c: &Collected) -> Result<(u32, u32), Stop> {
    match (c.pid, c.minor) {
        (Some(pid), Some(minor)) => Ok((pid, minor)),
        _ => Err(usage_error(name, None)),
    }
}

/// Refuses the first unsupported option, if any.
fn refuse_unsupported(name: &'static str, c: &Collected) -> Result<(), Stop> {
    match c.unsupported.first() {
        Some((letter, what)) => Err(Stop::Unsupported {
            name,
            what: format!("option -{letter} ({what})"),
        }),
        None => Ok(()),
    }
}

/// Request timeout (`-t` of open/create) in seconds, at most `u16::MAX`.
fn request_timeout(name: &str, c: &Collected) -> Result<u16, Stop> {
    match c.timeout_secs {
        None => Ok(0),
        Some(secs) => u16::try_from(secs).map_err(|_| {
            usage_error(
                name,
                Some(format!(
                    "tap-ctl: {name}: request timeout {secs} is above {}",
                    u16::MAX
                )),
            )
        }),
    }
}

/// The secondary of `create`/`open` (`-2`, with `-s` a standby, which needs `-2`).
fn secondary(name: &str, c: &Collected) -> Result<Option<String>, Stop> {
    if c.standby && c.secondary.is_none() {
        return Err(usage_error(
            name,
            Some(format!(
                "tap-ctl: {name}: -s (standby) needs a secondary image (-2)"
            )),
        ));
    }
    Ok(c.secondary.clone())
}

fn open_request(args: String, c: &Collected, timeout: u16) -> OpenRequest {
    let mut flags = c.block_device.unwrap_or_default();
    if c.standby {
        flags |= OpenFlags::STANDBY;
    }
    let options = (!c.options.is_empty()).then(|| c.options.join("\n"));
    if c.readonly {
        flags |= OpenFlags::RDONLY;
    }
    if c.no_o_direct {
        flags |= OpenFlags::NO_O_DIRECT;
    }
    if c.local_cache {
        flags |= OpenFlags::ADD_LCACHE;
    }
    OpenRequest {
        params: absolute_params(args),
        flags,
        request_timeout: timeout,
        options,
        log_path: c.log.clone(),
        secondary: c.secondary.clone(),
        parent_minor: c.parent_minor,
        ..OpenRequest::default()
    }
}

/// The getopt spec of command `name` (a member of [`COMMANDS`]): the options it accepts,
/// which tap-ctl(8) documents (a unit test compares the two).
fn option_spec(name: &str) -> &'static str {
    match name {
        "list" => "m:p:t:f:h",
        "allocate" | "spawn" => "h",
        "free" => "m:h",
        "create" => "a:RDd:e:r2:st:C:b:o:h",
        "destroy" | "pause" => "p:m:t:h",
        "attach" | "detach" | "stats" | "query" => "p:m:h",
        "commit" => "p:m:a:h",
        "cancel" => "p:m:wh",
        "open" => "a:RDm:p:e:r2:st:C:Eb:o:h",
        "close" => "p:m:ft:h",
        "unpause" => "p:m:a:2:c:h",
        "major" => "bch",
        "recover" => "m:a:RDt:C:h",
        "nbd-listen" => "p:m:l:T:Ph",
        _ => "",
    }
}

/// Parses one command (`name` is a member of [`COMMANDS`]) and its arguments.
fn parse_command(name: &'static str, args: &[String], config: &Config) -> Result<Command, Stop> {
    let spec = option_spec(name);
    if name == "check" {
        return if args.is_empty() {
            Ok(Command::Check)
        } else {
            Err(usage_error(name, None))
        };
    }
    let mut c = collect(name, args, spec)?;
    if c.block_device.is_none() && matches!(name, "create" | "open") {
        // -b, else $BLKTAP_BLOCK_DEVICE, else tapdisk's site default (for opens, that of
        // C clients; for creates, its own).
        c.block_device = match &config.block_device {
            Some(value) => Some(block_device_mode(name, value)?),
            None if name == "create" => Some(OpenFlags::BLOCKDEV_CREATE_DEFAULT),
            None => None,
        };
    }
    let timeout = c.timeout_secs.map(Duration::from_secs);
    let command = match name {
        "list" => Command::List {
            filter: ListFilter {
                pid: c.pid,
                minor: c.minor,
                driver: c.driver,
                path: c.file,
            },
        },
        "allocate" => Command::Allocate,
        "spawn" => Command::Spawn,
        "major" => Command::Major,
        "free" => Command::Free {
            minor: c.minor.ok_or_else(|| usage_error(name, None))?,
        },
        "create" => {
            let args = c.args.clone().ok_or_else(|| usage_error(name, None))?;
            let req_timeout = request_timeout(name, &c)?;
            secondary(name, &c)?;
            refuse_unsupported(name, &c)?;
            Command::Create {
                request: open_request(args, &c, req_timeout),
            }
        }
        "recover" => {
            let minor = c.minor.ok_or_else(|| usage_error(name, None))?;
            let req_timeout = request_timeout(name, &c)?;
            let args = c.args.clone().unwrap_or_default();
            Command::Recover {
                minor,
                request: open_request(args, &c, req_timeout),
            }
        }
        "open" => {
            let (pid, minor) = pid_minor(name, &c)?;
            let args = c.args.clone().ok_or_else(|| usage_error(name, None))?;
            let req_timeout = request_timeout(name, &c)?;
            secondary(name, &c)?;
            refuse_unsupported(name, &c)?;
            Command::Open {
                pid,
                minor,
                request: open_request(args, &c, req_timeout),
                key_from_stdin: c.key_from_stdin,
            }
        }
        "nbd-listen" => {
            let (pid, minor) = pid_minor(name, &c)?;
            let listen = c.listen.clone().ok_or_else(|| usage_error(name, None))?;
            let mode = match (&c.tls_dir, c.plaintext) {
                (Some(dir), false) => format!("tls={}", absolute_path(Path::new(dir))),
                (None, true) => "plain".to_owned(),
                _ => {
                    return Err(usage_error(
                        name,
                        Some(format!(
                            "tap-ctl: {name}: give exactly one of -T (TLS) and -P (plaintext)"
                        )),
                    ))
                }
            };
            Command::NbdListen {
                pid,
                minor,
                spec: format!("{listen} {mode}"),
            }
        }
        "commit" => {
            let (pid, minor) = pid_minor(name, &c)?;
            let path = c.args.clone().ok_or_else(|| usage_error(name, None))?;
            Command::Commit {
                pid,
                minor,
                path: absolute_path(Path::new(&path)),
            }
        }
        "query" => {
            let (pid, minor) = pid_minor(name, &c)?;
            Command::Query { pid, minor }
        }
        "cancel" => {
            let (pid, minor) = pid_minor(name, &c)?;
            Command::Cancel {
                pid,
                minor,
                wait: c.wait,
            }
        }
        "unpause" => {
            let (pid, minor) = pid_minor(name, &c)?;
            refuse_unsupported(name, &c)?;
            Command::Unpause {
                pid,
                minor,
                request: ResumeRequest {
                    params: c.args.map(absolute_params),
                    log_path: c.log,
                    secondary: c.secondary,
                },
            }
        }
        _ => {
            let (pid, minor) = pid_minor(name, &c)?;
            match name {
                "destroy" => Command::Destroy {
                    pid,
                    minor,
                    timeout,
                },
                "attach" => Command::Attach { pid, minor },
                "detach" => Command::Detach { pid, minor },
                "close" => Command::Close {
                    pid,
                    minor,
                    force: c.force,
                    timeout,
                },
                "pause" => Command::Pause {
                    pid,
                    minor,
                    timeout,
                },
                _ => Command::Stats { pid, minor },
            }
        }
    };
    Ok(command)
}

/// Parses the arguments after the program name (`config` gives the default of `-b`).
pub fn parse(argv: &[String], config: &Config) -> Action {
    let args: Vec<String> = argv.iter().filter(|a| *a != "--debug").cloned().collect();
    let Some((first, rest)) = args.split_first() else {
        return Action::Help(global_usage());
    };
    let Some(name) = COMMANDS.iter().copied().find(|c| c == first) else {
        return Action::Usage {
            message: Some(format!("tap-ctl: unknown command '{first}'")),
            usage: global_usage(),
        };
    };
    match parse_command(name, rest, config) {
        Ok(command) => Action::Run { name, command },
        Err(stop) => stop.into(),
    }
}

/// Where a run writes, and whether stdout is a terminal (it changes `list` and `spawn`).
pub struct Io<'a> {
    /// Where `open -E` reads the key (stdin).
    pub input: &'a mut dyn Read,
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub stdout_is_tty: bool,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("stdout_is_tty", &self.stdout_is_tty)
            .finish_non_exhaustive()
    }
}

/// Carries out `action` with `config` (control directory, tapdisk binary); returns the exit
/// status. Write errors on stdout/stderr (e.g. a closed pipe) are ignored, as the C tool
/// ignores them.
pub fn run(action: Action, config: &Config, io: &mut Io<'_>) -> i32 {
    match action {
        Action::Help(text) => {
            let _ = io.out.write_all(text.as_bytes());
            0
        }
        Action::Usage { message, usage } => {
            if let Some(message) = message {
                let _ = writeln!(io.err, "{message}");
            }
            let _ = io.err.write_all(usage.as_bytes());
            libc::EINVAL
        }
        Action::Unsupported { name, what } => {
            let _ = writeln!(
                io.err,
                "tap-ctl: {name}: {what} is not supported yet: {}",
                blktapctl::strerror(libc::EOPNOTSUPP)
            );
            libc::EOPNOTSUPP
        }
        Action::Run { name, mut command } => {
            if let Command::Open {
                request,
                key_from_stdin: true,
                ..
            } = &mut command
            {
                match read_key(io.input) {
                    Ok(key) => request.encryption_key = Some(Arc::new(key)),
                    Err(message) => {
                        // The C tool's words and exit status.
                        let _ = writeln!(io.err, "{message}");
                        return 1;
                    }
                }
            }
            run_command(name, command, config, io)
        }
    }
}

/// Reads `open -E`'s key from `input` to its end: 32 or 64 bytes (XTS-AES-128 or -256),
/// into locked memory. The error names the size only.
fn read_key(input: &mut dyn Read) -> Result<secret::Key, String> {
    const UNSUPPORTED: &str = "Unsupported keysize, use either 256 bit or 512 bit key";
    let mut input = input;
    match secret::Key::read_from(&mut input, 64) {
        Ok(key) if key.len() == 32 || key.len() == 64 => Ok(key),
        Ok(key) => Err(format!("{UNSUPPORTED} (read {} bytes)", key.len())),
        Err(e) => Err(format!("{UNSUPPORTED} ({e})")),
    }
}

fn run_command(name: &str, command: Command, config: &Config, io: &mut Io<'_>) -> i32 {
    match execute(command, config, io) {
        Ok(()) => 0,
        Err(err) => {
            let _ = writeln!(io.err, "tap-ctl: {name}: {err}");
            err.errno()
        }
    }
}

fn execute(command: Command, config: &Config, io: &mut Io<'_>) -> Result<(), Error> {
    let dir = &config.control_dir;
    match command {
        Command::List { filter } => {
            let survey = match filter.pid {
                Some(pid) => blktapctl::list::survey_pid(dir, pid)?,
                None => blktapctl::list::survey(dir)?,
            };
            for row in survey.rows.iter().filter(|row| filter.matches(row)) {
                // Scripts parse the dict form, which stays exactly the C one; people at a
                // terminal also see the kernel block device of each open VBD.
                let line = if io.stdout_is_tty {
                    let mut line = row.format_table_row();
                    if let (Some(pid), Some(minor), Some(_)) = (row.pid, row.minor, &row.driver) {
                        if let Ok(Some(device)) = blktapctl::block_device(dir, pid, minor) {
                            line.push_str(&format!("  {}", device.display()));
                        }
                    }
                    line
                } else {
                    row.format_dict()
                };
                let _ = writeln!(io.out, "{line}");
            }
            return list_outcome(&survey, &filter, dir, io);
        }
        Command::Allocate => {
            let (_, marker) = blktapctl::allocate(dir)?;
            let _ = writeln!(io.out, "{}", marker.display());
        }
        Command::Free { minor } => blktapctl::free(dir, minor)?,
        Command::Create { request } => {
            let created = blktapctl::create_with(dir, &config.tapdisk()?, &request)?;
            let shown = created.device.as_ref().unwrap_or(&created.marker);
            let _ = writeln!(io.out, "{}", shown.display());
        }
        Command::Destroy {
            pid,
            minor,
            timeout,
        } => blktapctl::destroy(dir, pid, minor, timeout)?,
        Command::Spawn => {
            let pid = blktapctl::spawn_with(dir, &config.tapdisk()?)?;
            if io.stdout_is_tty {
                let _ = writeln!(io.out, "tapdisk spawned with pid {pid}");
            } else {
                let _ = writeln!(io.out, "{pid}");
            }
        }
        Command::Attach { pid, minor } => blktapctl::attach(dir, pid, minor)?,
        Command::Detach { pid, minor } => blktapctl::detach(dir, pid, minor)?,
        Command::Open {
            pid,
            minor,
            request,
            ..
        } => {
            blktapctl::open(dir, pid, minor, &request)?;
        }
        Command::Close {
            pid,
            minor,
            force,
            timeout,
        } => blktapctl::close(dir, pid, minor, force, timeout)?,
        Command::Pause {
            pid,
            minor,
            timeout,
        } => blktapctl::pause(dir, pid, minor, timeout)?,
        Command::Unpause {
            pid,
            minor,
            request,
        } => blktapctl::unpause(dir, pid, minor, &request)?,
        Command::Stats { pid, minor } => {
            let text = blktapctl::stats(dir, pid, Some(minor))?;
            // The C tap-ctl ends the text with an empty line: SM reads the first line.
            let _ = write!(io.out, "{text}\n\n");
        }
        Command::Commit { pid, minor, path } => {
            blktapctl::commit::commit(dir, pid, minor, &path)?;
        }
        Command::Query { pid, minor } => {
            let job = blktapctl::commit::query(dir, pid, minor)?;
            let _ = writeln!(
                io.out,
                "Commit status '{}' ({}/{})",
                job.status, job.current, job.total
            );
        }
        Command::Cancel { pid, minor, wait } => {
            blktapctl::commit::cancel(dir, pid, minor, wait)?;
        }
        Command::NbdListen { pid, minor, spec } => {
            let address = blktapctl::nbd_listen(dir, pid, minor, &spec)?;
            let _ = writeln!(io.out, "{address}");
        }
        Command::Recover { minor, request } => {
            let recovered = blktapctl::recover_with(dir, &config.tapdisk()?, minor, &request)?;
            let shown = recovered.device.as_ref().unwrap_or(&recovered.marker);
            let _ = writeln!(io.out, "{}", shown.display());
        }
        Command::Major => {
            return Err(Error::new(
                libc::ENOSYS,
                "this blktap stack has no kernel block device, hence no device major",
            ))
        }
        Command::Check => {
            let _ = writeln!(io.out, "ok");
        }
    }
    Ok(())
}

/// What `list` adds after its rows: stale entries on stderr (scripts parse stdout only), and
/// the failure when a tapdisk that might hold a listed row did not answer. With `-m`, a
/// tapdisk that did not answer matters only if the minor's marker is locked by it (or by
/// nobody knows whom); any other filter cannot rule it out.
fn list_outcome(
    survey: &blktapctl::list::Survey,
    filter: &ListFilter,
    dir: &blktapctl::ControlDir,
    io: &mut Io<'_>,
) -> Result<(), Error> {
    for sentence in &survey.stale {
        let _ = writeln!(io.err, "tap-ctl: list: {sentence}");
    }
    let holder = filter.minor.and_then(|minor| {
        blktapctl::marker::FlockHolders::read().map(|locks| locks.holder(&dir.marker_path(minor)))
    });
    let mut failure = None;
    for (pid, error) in &survey.silent {
        let relevant = match holder {
            Some(held_by) => held_by == Some(*pid),
            None => true,
        };
        if relevant {
            let _ = writeln!(
                io.err,
                "tap-ctl: list: tapdisk {pid} did not answer, its VBDs are not all listed: {error}"
            );
            failure.get_or_insert_with(|| {
                Error::new(
                    error.errno(),
                    format!(
                        "tapdisk {pid} did not answer (its rows show only what its markers tell)"
                    ),
                )
            });
        }
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blktapctl::ControlDir;

    /// [`super::parse`] without `$BLKTAP_BLOCK_DEVICE`.
    fn parse(argv: &[String]) -> Action {
        super::parse(argv, &Config::new(ControlDir::new("/nonexistent")))
    }

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn command(line: &str) -> Command {
        match parse(&args(line)) {
            Action::Run { command, .. } => command,
            other => panic!("{line:?} did not parse to a command: {other:?}"),
        }
    }

    fn is_usage_error(line: &str) -> bool {
        matches!(parse(&args(line)), Action::Usage { .. })
    }

    fn unsupported(line: &str) -> Option<String> {
        match parse(&args(line)) {
            Action::Unsupported { what, .. } => Some(what),
            _ => None,
        }
    }

    /// Runs an action with captured output: (status, stdout, stderr).
    fn run_captured(action: Action, tty: bool) -> (i32, String, String) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            input: &mut std::io::empty(),
            out: &mut out,
            err: &mut err,
            stdout_is_tty: tty,
        };
        let status = run(action, &Config::new(dir), &mut io);
        (
            status,
            String::from_utf8(out).expect("utf8"),
            String::from_utf8(err).expect("utf8"),
        )
    }

    fn open_flags_and_options(line: &str, config: &Config) -> (OpenFlags, Option<String>) {
        match super::parse(&args(line), config) {
            Action::Run {
                command: Command::Create { request } | Command::Open { request, .. },
                ..
            } => (request.flags, request.options),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn block_device_choice_travels_explicitly() {
        let plain = Config::new(ControlDir::new("/x"));
        let mut from_env = plain.clone();
        from_env.block_device = Some("ublk".into());
        for (line, config, flags) in [
            // No -b: create asks for the site's create default, open for nothing (as C).
            (
                "create -a aio:/i",
                &plain,
                OpenFlags::BLOCKDEV_CREATE_DEFAULT,
            ),
            ("open -p 1 -m 2 -a aio:/i", &plain, OpenFlags::empty()),
            // -b always travels as its own bit, auto included.
            ("create -a aio:/i -b auto", &plain, OpenFlags::BLOCKDEV_AUTO),
            (
                "open -p 1 -m 2 -a aio:/i -b auto",
                &plain,
                OpenFlags::BLOCKDEV_AUTO,
            ),
            (
                "open -p 1 -m 2 -a aio:/i -b none",
                &plain,
                OpenFlags::BLOCKDEV_NONE,
            ),
            ("create -a aio:/i -b fuse", &plain, OpenFlags::BLOCKDEV_FUSE),
            // $BLKTAP_BLOCK_DEVICE stands for -b; -b wins.
            ("create -a aio:/i", &from_env, OpenFlags::BLOCKDEV_UBLK),
            (
                "open -p 1 -m 2 -a aio:/i",
                &from_env,
                OpenFlags::BLOCKDEV_UBLK,
            ),
            (
                "open -p 1 -m 2 -a aio:/i -b none",
                &from_env,
                OpenFlags::BLOCKDEV_NONE,
            ),
        ] {
            assert_eq!(open_flags_and_options(line, config).0, flags, "{line}");
        }
        assert!(is_usage_error("create -a aio:/i -b loop"));
        let mut bad_env = plain;
        bad_env.block_device = Some("loop".into());
        assert!(matches!(
            super::parse(&args("create -a aio:/i"), &bad_env),
            Action::Usage { .. }
        ));
    }

    #[test]
    fn device_options_become_lines_for_tapdisk() {
        let config = Config::new(ControlDir::new("/x"));
        let (_, options) = open_flags_and_options(
            "create -a aio:/i -o ublk.queues=4,ublk.user_copy=off -o block_device.compat_symlinks=true",
            &config,
        );
        assert_eq!(
            options.as_deref(),
            Some("ublk.queues = 4\nublk.user_copy = \"off\"\nblock_device.compat_symlinks = true")
        );
        let (_, options) = open_flags_and_options("open -p 1 -m 2 -a aio:/i", &config);
        assert_eq!(options, None);
        let (_, options) =
            open_flags_and_options("open -p 1 -m 2 -a aio:/i -o ublk.user_copy=a\"b", &config);
        assert_eq!(options.as_deref(), Some("ublk.user_copy = \"a\\\"b\""));
        for bad in [
            "create -a aio:/i -o queues",
            "create -a aio:/i -o =4",
            "create -a aio:/i -o ublk.queues=",
            "create -a aio:/i -o Ublk.queues=4",
            "create -a aio:/i -o ublk.queues=4,",
        ] {
            assert!(is_usage_error(bad), "{bad}");
        }
    }

    #[test]
    fn no_args_prints_global_usage_and_succeeds() {
        for line in ["", "--debug"] {
            let action = parse(&args(line));
            assert_eq!(action, Action::Help(global_usage()), "{line:?}");
            let (status, out, err) = run_captured(action, false);
            assert_eq!(status, 0);
            assert!(out.starts_with("usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := { list |"));
            assert!(out.ends_with("| major | check }\n"), "{out}");
            assert!(err.is_empty());
        }
    }

    #[test]
    fn unknown_commands_fail_with_einval() {
        for line in [
            "frobnicate",
            "a-very-long-command-name-beyond-24",
            "commit2",
        ] {
            let (status, out, err) = run_captured(parse(&args(line)), false);
            assert_eq!(status, libc::EINVAL, "{line:?}");
            assert!(out.is_empty());
            let name = line.split(' ').next().unwrap();
            assert!(
                err.starts_with(&format!(
                    "tap-ctl: unknown command '{name}'\nusage: tap-ctl COMMAND"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn commit_query_and_cancel_parse_as_xcpng_builds_them() {
        assert_eq!(
            command("commit -p 12 -m 3 -a /srv/sr/leaf.qcow2"),
            Command::Commit {
                pid: 12,
                minor: 3,
                path: "/srv/sr/leaf.qcow2".to_owned()
            }
        );
        assert_eq!(
            command("query -p 12 -m 3"),
            Command::Query { pid: 12, minor: 3 }
        );
        assert_eq!(
            command("cancel -p 12 -m 3 -w"),
            Command::Cancel {
                pid: 12,
                minor: 3,
                wait: true
            }
        );
        assert_eq!(
            command("cancel -p 12 -m 3"),
            Command::Cancel {
                pid: 12,
                minor: 3,
                wait: false
            }
        );
        for (line, usage) in [
            (
                "commit -p 1 -m 2",
                "usage: commit <-p pid> <-m minor> <-a /path/to/file>\n",
            ),
            ("query -m 2", "usage: query <-p pid> <-m minor>\n"),
            ("cancel -p 1", "usage: cancel <-p pid> <-m minor> [-w]\n"),
        ] {
            let (status, out, err) = run_captured(parse(&args(line)), false);
            assert_eq!(status, libc::EINVAL, "{line}");
            assert!(out.is_empty());
            assert_eq!(err, usage);
        }
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(
            command("list"),
            Command::List {
                filter: ListFilter::default()
            }
        );
        assert_eq!(
            command("list -p 12 -m3 -t vhd -f /x.vhd"),
            Command::List {
                filter: ListFilter {
                    pid: Some(12),
                    minor: Some(3),
                    driver: Some("vhd".to_owned()),
                    path: Some("/x.vhd".to_owned()),
                }
            }
        );
        assert_eq!(command("allocate"), Command::Allocate);
        assert_eq!(command("free -m 7"), Command::Free { minor: 7 });
        let mut request = OpenRequest::new("vhd:/a.vhd");
        request.flags = OpenFlags::RDONLY | OpenFlags::NO_O_DIRECT;
        request.request_timeout = 30;
        // Without -b (nor $BLKTAP_BLOCK_DEVICE), create leaves the choice to tapdisk's
        // site default for creates; open leaves it to the default for opens (no bit).
        let mut create_request = request.clone();
        create_request.flags |= OpenFlags::BLOCKDEV_CREATE_DEFAULT;
        assert_eq!(
            command("create -a vhd:/a.vhd -RD -t 30"),
            Command::Create {
                request: create_request
            }
        );
        assert_eq!(
            command("destroy -p 1 -m 2 -t 120"),
            Command::Destroy {
                pid: 1,
                minor: 2,
                timeout: Some(Duration::from_secs(120))
            }
        );
        assert_eq!(command("spawn"), Command::Spawn);
        assert_eq!(
            command("attach -p 1 -m 2"),
            Command::Attach { pid: 1, minor: 2 }
        );
        assert_eq!(
            command("detach -p 1 -m 2"),
            Command::Detach { pid: 1, minor: 2 }
        );
        assert_eq!(
            command("open -p 1 -m 2 -a vhd:/a.vhd -R -D -t 30"),
            Command::Open {
                pid: 1,
                minor: 2,
                request,
                key_from_stdin: false,
            }
        );
        assert_eq!(
            command("close -p 1 -m 2 -f -t 120"),
            Command::Close {
                pid: 1,
                minor: 2,
                force: true,
                timeout: Some(Duration::from_secs(120))
            }
        );
        assert_eq!(
            command("close -p 1 -m 2"),
            Command::Close {
                pid: 1,
                minor: 2,
                force: false,
                timeout: None
            }
        );
        assert_eq!(
            command("pause -p 1 -m 2 -t 5"),
            Command::Pause {
                pid: 1,
                minor: 2,
                timeout: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(
            command("unpause -p 1 -m 2"),
            Command::Unpause {
                pid: 1,
                minor: 2,
                request: ResumeRequest::default()
            }
        );
        assert_eq!(
            command("unpause -p 1 -m 2 -a aio:/b.img"),
            Command::Unpause {
                pid: 1,
                minor: 2,
                request: ResumeRequest {
                    params: Some("aio:/b.img".to_owned()),
                    ..ResumeRequest::default()
                }
            }
        );
        assert_eq!(
            command("stats -p 1 -m 2"),
            Command::Stats { pid: 1, minor: 2 }
        );
        assert_eq!(
            command("nbd-listen -p 1 -m 2 -l 127.0.0.1:10809 -T /pki"),
            Command::NbdListen {
                pid: 1,
                minor: 2,
                spec: "127.0.0.1:10809 tls=/pki".into()
            }
        );
        assert_eq!(
            command("nbd-listen -p 1 -m 2 -l [::1]:0 -P"),
            Command::NbdListen {
                pid: 1,
                minor: 2,
                spec: "[::1]:0 plain".into()
            }
        );
        assert_eq!(
            command("recover -m 4"),
            Command::Recover {
                minor: 4,
                request: OpenRequest::default()
            }
        );
        let mut recovered = OpenRequest::new("aio:/c.img");
        recovered.flags = OpenFlags::RDONLY;
        assert_eq!(
            command("recover -m 4 -a aio:/c.img -R"),
            Command::Recover {
                minor: 4,
                request: recovered
            }
        );
        assert!(is_usage_error("recover -a aio:/c.img"));
        assert_eq!(command("major"), Command::Major);
        assert_eq!(command("major -b -c"), Command::Major);
        assert_eq!(command("check"), Command::Check);
    }

    #[test]
    fn attached_values_and_debug_anywhere() {
        assert_eq!(
            command("attach -p123 -m4"),
            Command::Attach { pid: 123, minor: 4 }
        );
        assert_eq!(
            command("--debug attach --debug -p123 -m 4 --debug"),
            Command::Attach { pid: 123, minor: 4 }
        );
        assert_eq!(
            command("open -Rp5 -m6 -avhd:/a.vhd").clone(),
            Command::Open {
                pid: 5,
                minor: 6,
                request: OpenRequest {
                    flags: OpenFlags::RDONLY,
                    ..OpenRequest::new("vhd:/a.vhd")
                },
                key_from_stdin: false,
            }
        );
    }

    #[test]
    fn missing_options_and_bad_values_are_usage_errors() {
        for line in [
            "free",
            "create",
            "create -R",
            "destroy -p 1",
            "attach -m 1",
            "detach -p 1",
            "open -p 1 -m 2",
            "open -m 2 -a vhd:/x",
            "close -m 2",
            "pause -p 1",
            "unpause -m 1",
            "stats -p 1",
            "attach -p abc -m 1",
            "attach -p -5 -m 1",
            "attach -p 1 -m",
            "free -m 1x",
            "close -p 1 -m 2 -t soon",
            "open -p 1 -m 2 -a vhd:/x -t 70000",
            "list -x",
            "allocate -d tapdev0",
            "spawn -c slice",
            "check -h",
            "attach -p 1 -m 2 --verbose",
            "open -p 1 -m 2 -a vhd:/x -e notanumber",
        ] {
            assert!(is_usage_error(line), "{line:?} should be a usage error");
        }
        let (status, out, err) = run_captured(parse(&args("attach -p 1")), false);
        assert_eq!(status, 22);
        assert!(out.is_empty());
        assert_eq!(err, "usage: attach <-p pid> <-m minor>\n");
        let (status, _, err) = run_captured(parse(&args("attach -x")), false);
        assert_eq!(status, 22);
        assert!(
            err.starts_with("tap-ctl: invalid option -- 'x'\nusage: attach"),
            "{err}"
        );
    }

    #[test]
    fn help_goes_to_stdout_with_status_zero() {
        for name in COMMANDS.iter().filter(|c| **c != "check") {
            let (status, out, err) = run_captured(parse(&args(&format!("{name} -h"))), false);
            assert_eq!(status, 0, "{name}");
            assert!(out.starts_with(&format!("usage: {name}")), "{name}: {out}");
            assert!(err.is_empty());
        }
        // -h wins even when required options are missing, but not over an earlier bad option.
        assert!(matches!(parse(&args("open -h")), Action::Help(_)));
        assert!(is_usage_error("open -x -h"));
    }

    #[test]
    fn changed_block_logs_travel_with_open_create_recover_and_unpause() {
        // SM's forms: open -D -C on activate, unpause -a -c at snapshot time.
        let Command::Open { request, .. } =
            command("open -p 1 -m 2 -a vhd:/sr/a.vhd -D -C /sr/a.cbtlog")
        else {
            panic!("open");
        };
        assert_eq!(request.log_path.as_deref(), Some("/sr/a.cbtlog"));
        assert!(request.flags.contains(OpenFlags::NO_O_DIRECT));
        assert_eq!(
            command("unpause -p 1 -m 2 -a vhd:/sr/b.vhd -c /sr/a.cbtlog"),
            Command::Unpause {
                pid: 1,
                minor: 2,
                request: ResumeRequest {
                    params: Some("vhd:/sr/b.vhd".to_owned()),
                    log_path: Some("/sr/a.cbtlog".to_owned()),
                    ..ResumeRequest::default()
                }
            }
        );
        let Command::Create { request } = command("create -a aio:/a.img -C /a.cbtlog") else {
            panic!("create");
        };
        assert_eq!(request.log_path.as_deref(), Some("/a.cbtlog"));
        let Command::Recover { request, .. } = command("recover -m 3 -C /a.cbtlog") else {
            panic!("recover");
        };
        assert_eq!(request.log_path.as_deref(), Some("/a.cbtlog"));
        // Relative paths are made absolute, as image paths are.
        let Command::Open { request, .. } = command("open -p 1 -m 2 -a aio:/a.img -C rel.cbtlog")
        else {
            panic!("open");
        };
        let log = request.log_path.unwrap();
        assert!(
            log.starts_with('/') && log.ends_with("/rel.cbtlog"),
            "{log}"
        );
        // The letters stay each command's own: -c is not open's, -C not unpause's.
        assert!(is_usage_error("open -p 1 -m 2 -a aio:/a.img -c /l"));
        assert!(is_usage_error("unpause -p 1 -m 2 -C /l"));
    }

    #[test]
    fn intellicache_forms_of_storage_manager() {
        // The parent's read cache, the persistent local leaf, the scratch local leaf.
        let Command::Open { request, .. } = command("open -p 1 -m 2 -a vhd:/l/p.vhdcache -r")
        else {
            panic!("open -r");
        };
        assert!(request.flags.contains(OpenFlags::ADD_LCACHE));
        assert_eq!(request.parent_minor, None);
        let Command::Open { request, .. } =
            command("open -p 1 -m 3 -a vhd:/l/c.vhdcache -r -e 2 -2 vhd:/s/c.vhd")
        else {
            panic!("open -r -e -2");
        };
        assert!(request.flags.contains(OpenFlags::ADD_LCACHE));
        assert!(!request.flags.contains(OpenFlags::STANDBY));
        assert_eq!(request.parent_minor, Some(2));
        assert_eq!(request.secondary.as_deref(), Some("vhd:/s/c.vhd"));
        let Command::Open { request, .. } =
            command("open -p 1 -m 4 -a vhd:/l/d.vhdcache -e 2 -2 vhd:/s/d.vhd -s")
        else {
            panic!("open -e -2 -s");
        };
        assert!(!request.flags.contains(OpenFlags::ADD_LCACHE));
        assert!(request.flags.contains(OpenFlags::STANDBY));
        assert_eq!(request.parent_minor, Some(2));
        let Command::Create { request } = command("create -a vhd:/l/e.vhdcache -r -e 7") else {
            panic!("create -r -e");
        };
        assert!(request.flags.contains(OpenFlags::ADD_LCACHE));
        assert_eq!(request.parent_minor, Some(7));
        assert!(is_usage_error("open -p 1 -m 2 -a vhd:/x -e x"));
    }

    #[test]
    fn unimplemented_flags_are_refused_with_eopnotsupp() {
        // -d (device name) is the one C option left unbuilt.
        let what = unsupported("create -a vhd:/x -d tapdev3").expect("-d refused");
        assert!(what.starts_with("option -d "), "{what}");
        // A usage error still wins over an unsupported flag.
        assert!(is_usage_error("create -d tapdev3"));
    }

    #[test]
    fn open_e_reads_a_32_or_64_byte_key_from_stdin() {
        // Issue 20: -E is no longer refused; the key is read when the command runs.
        assert!(matches!(
            command("open -p 1 -m 2 -a vhd:/x -E"),
            Command::Open {
                key_from_stdin: true,
                ..
            }
        ));
        assert_eq!(read_key(&mut &[7u8; 64][..]).unwrap().len(), 64);
        assert_eq!(read_key(&mut &[7u8; 32][..]).unwrap().len(), 32);
        for bad in [&[7u8; 33][..], &[7u8; 16][..], &[][..], &[7u8; 200][..]] {
            let message = read_key(&mut &bad[..]).unwrap_err();
            assert!(
                message.starts_with("Unsupported keysize, use either 256 bit or 512 bit key"),
                "{message}"
            );
            assert!(!message.contains("07"), "{message}");
        }
        // The C tool's exit status 1, before any tapdisk is asked.
        let (status, out, err) = run_captured(parse(&args("open -p 1 -m 2 -a vhd:/x -E")), false);
        assert_eq!(status, 1);
        assert!(out.is_empty());
        assert!(err.starts_with("Unsupported keysize"), "{err}");
    }

    #[test]
    fn secondary_images_and_standby() {
        let Command::Open { request, .. } = command("open -p 1 -m 2 -a vhd:/x -2 nbd:vbd/7/xvda")
        else {
            panic!("open parses to Open");
        };
        assert_eq!(request.secondary.as_deref(), Some("nbd:vbd/7/xvda"));
        assert!(!request.flags.contains(OpenFlags::STANDBY));
        let Command::Create { request } = command("create -a vhd:/x -2 aio:spare.img -s") else {
            panic!("create parses to Create");
        };
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            request.secondary,
            Some(format!("aio:{}", cwd.join("spare.img").display()))
        );
        assert!(request.flags.contains(OpenFlags::STANDBY));
        for (line, secondary) in [
            (
                "unpause -p 1 -m 2 -a vhd:/y -2 nbd:unix:/run/s.sock:exportname=vdi",
                "nbd:unix:/run/s.sock:exportname=vdi",
            ),
            ("unpause -p 1 -m 2 -2 null", "null"),
        ] {
            let Command::Unpause { request, .. } = command(line) else {
                panic!("unpause parses to Unpause");
            };
            assert_eq!(request.secondary.as_deref(), Some(secondary), "{line}");
        }
        // A standby needs a secondary; unpause has no -s.
        assert!(is_usage_error("open -p 1 -m 2 -a vhd:/x -s"));
        assert!(is_usage_error("create -a vhd:/x -s"));
        assert!(is_usage_error("unpause -p 1 -m 2 -2 null -s"));
    }

    #[test]
    fn relative_file_paths_are_made_absolute_and_other_locators_kept() {
        let cwd = std::env::current_dir().unwrap();
        let within = |path: &str| cwd.join(path).display().to_string();
        for (given, sent) in [
            ("aio:disk.img", format!("aio:{}", within("disk.img"))),
            ("vhd:../vm/a.vhd", format!("vhd:{}", within("../vm/a.vhd"))),
            ("x-chain:chain", format!("x-chain:{}", within("chain"))),
            ("vhd:/srv/a.vhd", "vhd:/srv/a.vhd".to_owned()),
            ("aio:", "aio:".to_owned()),
            ("no-type", "no-type".to_owned()),
            (
                "nbd:unix:/run/x.sock:exportname=vdi",
                "nbd:unix:/run/x.sock:exportname=vdi".to_owned(),
            ),
            ("nbd:fd-id", "nbd:fd-id".to_owned()),
            ("rbd:pool/image", "rbd:pool/image".to_owned()),
        ] {
            assert_eq!(absolute_params(given.to_owned()), sent, "{given}");
        }
        let Command::Open { request, .. } = command("open -p 1 -m 2 -a rbd:pool/img") else {
            panic!("open parses to Open");
        };
        assert_eq!(request.params, "rbd:pool/img");
    }

    #[test]
    fn failures_print_command_context_and_exit_with_errno() {
        // No tapdisk listens in the fresh control directory.
        let (status, out, err) = run_captured(parse(&args("attach -p 4 -m 1")), false);
        assert_eq!(status, libc::ENOENT);
        assert!(out.is_empty());
        assert!(
            err.starts_with("tap-ctl: attach: connecting to tapdisk 4 at "),
            "{err}"
        );
        assert!(err.ends_with(": No such file or directory\n"), "{err}");
        let (status, _, err) = run_captured(parse(&args("major")), false);
        assert_eq!(status, libc::ENOSYS);
        assert!(err.starts_with("tap-ctl: major: "), "{err}");
    }

    #[test]
    fn allocate_list_free_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let go = |line: &str, tty: bool| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut io = Io {
                input: &mut std::io::empty(),
                out: &mut out,
                err: &mut err,
                stdout_is_tty: tty,
            };
            let status = run(parse(&args(line)), &Config::new(dir.clone()), &mut io);
            (
                status,
                String::from_utf8(out).expect("utf8"),
                String::from_utf8(err).expect("utf8"),
            )
        };
        let (status, out, _) = go("allocate", false);
        assert_eq!(status, 0);
        assert_eq!(out, format!("{}\n", dir.marker_path(0).display()));
        go("allocate", false);
        assert_eq!(
            go("list", false),
            (0, "minor=0\nminor=1\n".to_owned(), String::new())
        );
        assert_eq!(go("list -m 1", false).1, "minor=1\n");
        assert_eq!(
            go("list", true).1,
            "       -    0    -          - -\n       -    1    -          - -\n"
        );
        assert_eq!(go("free -m 0", false), (0, String::new(), String::new()));
        let (status, _, err) = go("free -m 0", false);
        assert_eq!(status, libc::ENOENT);
        assert!(
            err.starts_with("tap-ctl: free: opening marker file "),
            "{err}"
        );
        assert_eq!(go("check", false).1, "ok\n");
    }

    #[test]
    fn manual_page_documents_exactly_the_accepted_options() {
        let page = include_str!("../../../docs/man/tap-ctl.8");
        let specs: Vec<(&str, &str)> = COMMANDS.iter().map(|&c| (c, option_spec(c))).collect();
        if let Err(problems) = getopt::manual::check_page(page, &specs, &['h']) {
            panic!("docs/man/tap-ctl.8 and the code disagree:\n{problems}");
        }
    }
}
