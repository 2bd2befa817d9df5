//! Shared harness for the end-to-end tests: a private control directory per test, helpers
//! to run the real `tap-ctl` and `tapdisk` binaries, and cleanup of every process they start.

#![allow(dead_code)]

pub mod crash;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The built `tapdisk` binary.
pub fn tapdisk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tapdisk"))
}

/// The built binary `name` of the workspace (next to `tapdisk` in the target directory).
pub fn sibling_bin(name: &str) -> PathBuf {
    let path = tapdisk_bin().with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build every binary first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// The built `tap-ctl` binary.
pub fn tap_ctl_bin() -> PathBuf {
    sibling_bin("tap-ctl")
}

/// True when an external tool is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// True when every need (`(met, what)`) is met; otherwise prints which are not, naming the
/// test, so a test needing root or a device facility can skip itself.
pub fn needs_met(test: &str, needs: &[(bool, &str)]) -> bool {
    let missing: Vec<&str> = needs
        .iter()
        .filter_map(|&(met, what)| (!met).then_some(what))
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!("{test}: skipped, needs {}", missing.join(", "));
    false
}

/// Asserts that an external tool is installed (the setup step installs them all).
pub fn require(tool: &str) {
    assert!(
        have(tool),
        "{tool} is not installed: run scripts/setup.sh first"
    );
}

/// Environment variable of the test run (not of tapdisk): the I/O engine every test's
/// tapdisks use (written into their site configuration).
pub const TEST_ENGINE_ENV: &str = "TAPDISK_TEST_ENGINE";

/// A per-test control directory and the processes started in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub ctl_dir: PathBuf,
    /// The site configuration the tapdisks of this environment read (`TAPDISK_CONFIG`;
    /// empty unless the test writes one with [`Env::site_config`]), never `/etc`'s.
    pub config_file: PathBuf,
}

/// One row of `tap-ctl list`, parsed as XenServer's SM does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListRow {
    pub pid: Option<u32>,
    pub minor: Option<u32>,
    pub state: Option<u32>,
    pub args: Option<String>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("blktap-test")
            .tempdir()
            .unwrap();
        let ctl_dir = dir.path().join("ctl");
        let config_file = dir.path().join("tapdisk.toml");
        // scripts/crash-vhd.sh runs the crash tests once per I/O engine.
        let site = match std::env::var(TEST_ENGINE_ENV) {
            Ok(engine) => format!("[io]\nengine = \"{engine}\"\n"),
            Err(_) => String::new(),
        };
        std::fs::write(&config_file, site).unwrap();
        Self {
            dir,
            ctl_dir,
            config_file,
        }
    }

    /// Makes `text` the site configuration of tapdisks spawned from now on.
    pub fn site_config(&self, text: &str) {
        std::fs::write(&self.config_file, text).unwrap();
    }

    /// A `tap-ctl` command running against this environment's control directory and site
    /// configuration. VBDs get no kernel block device unless the test asks for one (`-b`, or
    /// `BLKTAP_BLOCK_DEVICE` set or removed on the returned command).
    pub fn tap_ctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tap_ctl_bin());
        cmd.args(args)
            .env("BLKTAP_CONTROL_DIR", &self.ctl_dir)
            .env("BLKTAP_TAPDISK", tapdisk_bin())
            .env("TAPDISK_CONFIG", &self.config_file)
            .env("BLKTAP_BLOCK_DEVICE", "none");
        cmd
    }

    pub fn tap_ctl(&self, args: &[&str]) -> Output {
        self.tap_ctl_cmd(args).output().unwrap()
    }

    /// Runs tap-ctl and returns its stdout, failing the test on a non-zero exit.
    pub fn tap_ctl_ok(&self, args: &[&str]) -> String {
        let out = self.tap_ctl(args);
        assert!(
            out.status.success(),
            "tap-ctl {args:?} failed with {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs tap-ctl expecting failure with `errno` as exit status; returns stderr.
    pub fn tap_ctl_err(&self, args: &[&str], errno: i32) -> String {
        let out = self.tap_ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(errno),
            "tap-ctl {args:?}: stderr {stderr}"
        );
        assert!(
            !stderr.trim().is_empty(),
            "tap-ctl {args:?} failed without a message"
        );
        stderr
    }

    /// A file of `len` bytes where byte i is `(i / 512 + seed) as u8`.
    pub fn raw_image(&self, name: &str, len: usize, seed: u8) -> PathBuf {
        let path = self.dir.path().join(name);
        let data: Vec<u8> = (0..len)
            .map(|i| (i / 512).to_le_bytes()[0].wrapping_add(seed))
            .collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    /// `tap-ctl create -a aio:<path>`; returns (pid, minor).
    pub fn create(&self, image: &Path, extra: &[&str]) -> (u32, u32) {
        let params = format!("aio:{}", image.display());
        let mut args = vec!["create", "-a", &params];
        args.extend_from_slice(extra);
        let out = self.tap_ctl_ok(&args);
        let marker = out.trim();
        let minor: u32 = marker
            .rsplit_once("tapdisk-")
            .expect("create prints the marker path")
            .1
            .parse()
            .unwrap();
        assert_eq!(
            Path::new(marker),
            self.ctl_dir
                .join("tapdisk")
                .join(format!("tapdisk-{minor}"))
        );
        let row = self
            .list()
            .into_iter()
            .find(|row| row.minor == Some(minor))
            .expect("created VBD is listed");
        (row.pid.expect("listed with a pid"), minor)
    }

    pub fn destroy(&self, pid: u32, minor: u32) {
        self.tap_ctl_ok(&["destroy", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    }

    /// `tap-ctl list` parsed as SM does: `split(' ', 3)`, `key=value`, state in hex.
    pub fn list(&self) -> Vec<ListRow> {
        self.tap_ctl_ok(&["list"])
            .lines()
            .map(parse_list_line)
            .collect()
    }

    /// A VBD started as SM starts one, step by step (SM never runs `create`): `allocate`
    /// (the minor is the marker path's trailing number), `spawn` (the pid), `attach -p -m`,
    /// `open -p -m -a PARAMS FLAGS...`. Returns (pid, minor).
    pub fn sm_launch(&self, params: &str, flags: &[&str]) -> (u32, u32) {
        let minor: u32 = self
            .tap_ctl_ok(&["allocate"])
            .trim()
            .rsplit_once("tapdisk-")
            .expect("allocate prints the marker path")
            .1
            .parse()
            .unwrap();
        let pid: u32 = self.tap_ctl_ok(&["spawn"]).trim().parse().unwrap();
        let (p, m) = (pid.to_string(), minor.to_string());
        self.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
        let mut open = vec!["open", "-p", &p, "-m", &m, "-a", params];
        open.extend_from_slice(flags);
        self.tap_ctl_ok(&open);
        (pid, minor)
    }

    /// `tap-ctl stats` of a VBD, its first line parsed as SM parses it (`json.loads`).
    pub fn stats_json(&self, pid: u32, minor: u32) -> serde_json::Value {
        let text = self.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
        serde_json::from_str(text.lines().next().expect("stats prints a line")).unwrap()
    }

    /// `qemu-io -c COMMAND` on the NBD export of `pid`/`minor`, asserting success (and, for
    /// `read -P`, that the pattern matched).
    pub fn qemu_io(&self, pid: u32, minor: u32, command: &str) {
        let out = run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            &self.nbd_uri(pid, minor),
            "-c",
            command,
        ]));
        assert!(
            !out.contains("Pattern verification failed"),
            "{command}: {out}"
        );
    }

    pub fn nbd_socket(&self, pid: u32, minor: u32) -> PathBuf {
        self.ctl_dir.join(format!("nbd{pid}.{minor}"))
    }

    pub fn nbd_uri(&self, pid: u32, minor: u32) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.nbd_socket(pid, minor).display()
        )
    }

    /// Pids of tapdisks with a control socket in this environment.
    pub fn tapdisk_pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.ctl_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("ctl")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Files left in the control directory (sockets and markers).
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for dir in [self.ctl_dir.clone(), self.ctl_dir.join("tapdisk")] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                        found.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        found.sort();
        found
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.tapdisk_pids() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// Parses one non-tty `tap-ctl list` line.
pub fn parse_list_line(line: &str) -> ListRow {
    let mut row = ListRow::default();
    let fields: HashMap<&str, &str> = line
        .splitn(4, ' ')
        .filter_map(|field| field.split_once('='))
        .collect();
    row.pid = fields.get("pid").map(|v| v.parse().unwrap());
    row.minor = fields.get("minor").map(|v| v.parse().unwrap());
    row.state = fields
        .get("state")
        .map(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap());
    row.args = fields.get("args").map(|v| (*v).to_owned());
    row
}

/// True while process `pid` exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(tapdisk::sys::process_alive)
}

/// Waits up to `limit` for `condition`.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Runs an external command, asserting success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The built `vhd-util` binary.
pub fn vhd_util_bin() -> PathBuf {
    sibling_bin("vhd-util")
}

/// Runs `vhd-util ARGS`, asserting success; returns stdout.
pub fn vhd_util_ok(args: &[&str]) -> String {
    run_ok(Command::new(vhd_util_bin()).args(args))
}

impl Env {
    /// `tap-ctl create -a <params>` for any `type:/path` (or `x-chain:/file`); returns
    /// (pid, minor).
    pub fn create_params(&self, params: &str, extra: &[&str]) -> (u32, u32) {
        let mut args = vec!["create", "-a", params];
        args.extend_from_slice(extra);
        let out = self.tap_ctl_ok(&args);
        let marker = out.trim();
        let minor: u32 = marker
            .lines()
            .next()
            .and_then(|line| line.rsplit_once("tapdisk-"))
            .expect("create prints the marker path")
            .1
            .trim()
            .parse()
            .unwrap();
        let row = self
            .list()
            .into_iter()
            .find(|row| row.minor == Some(minor))
            .expect("created VBD is listed");
        (row.pid.expect("listed with a pid"), minor)
    }
}

/// A small deterministic pseudo-random generator for test workloads.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value in `0..below`.
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// Runs fio's nbd engine against `uri` with crc32c verification (working files in `dir`;
/// `job` gives the workload: rw, block sizes, depth, size...) and asserts it reports no
/// error. Returns fio's JSON document.
pub fn fio_nbd_verify(dir: &Path, uri: &str, job: &[&str]) -> String {
    let mut cmd = Command::new("fio");
    cmd.current_dir(dir)
        .args(["--name=verify", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(job)
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]);
    let out = run_ok(&mut cmd);
    // fio's nbd engine prints a line before the JSON document.
    let json = out[out.find('{').expect("fio JSON output")..].to_owned();
    assert!(json.contains("\"error\" : 0"), "{job:?}: {json}");
    assert!(!json.contains("verify: bad"), "{job:?}: {json}");
    json
}

/// Kills a child process (fio, an NBD server) if the test fails half way.
pub struct ChildGuard(pub Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes `dir/ca-cert.pem` and a server certificate for localhost/127.0.0.1 signed by it
/// (`dir/server-cert.pem`, `dir/server-key.pem`), the layout qemu, nbdkit and libnbd use.
pub fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(dir).args(args));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=blktap test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&[
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
         extendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "server-cert.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

/// A tmpfs of `size` mounted for the test, unmounted when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&at),
        );
        Self(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
