//! The library as C programs use it: installed with `scripts/install-libblktapctl.sh` into a
//! staging directory, `tests/c/client.c` compiled with `cc` against the installed header and
//! library (flags from the installed `libblktapctl.pc`), then run under valgrind (any
//! invalid access or leak fails it) for the calls libxl makes (find, create, find again,
//! destroy) and those tapback makes (list_pid, info), against the real tapdisk in a control
//! directory of the test's own; its listing must be what `tap-ctl list` prints. Also: the
//! library's soname and that it exports every function of the C stack's `tap-ctl.h`.
//!
//! Needs `cc`, `pkg-config` and `valgrind` (scripts/setup.sh installs them) and the
//! workspace built (`cargo build --workspace`: the binaries and the cdylib).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every function the C stack's `include/tap-ctl.h` declares.
const C_HEADER_FUNCTIONS: [&str; 36] = [
    "tap_ctl_version",
    "tap_ctl_kernel_version",
    "tap_ctl_check_blktap",
    "tap_ctl_check_version",
    "tap_ctl_connect",
    "tap_ctl_connect_id",
    "tap_ctl_read_raw",
    "tap_ctl_read_message",
    "tap_ctl_write_message",
    "tap_ctl_send_and_receive",
    "tap_ctl_connect_send_and_receive",
    "tap_ctl_connect_send_receive_ex",
    "tap_ctl_socket_name",
    "tap_ctl_list",
    "tap_ctl_list_pid",
    "tap_ctl_list_free",
    "tap_ctl_find_minor",
    "tap_ctl_allocate",
    "tap_ctl_free",
    "tap_ctl_create",
    "tap_ctl_destroy",
    "tap_ctl_spawn",
    "tap_ctl_get_pid",
    "tap_ctl_attach",
    "tap_ctl_detach",
    "tap_ctl_open",
    "tap_ctl_close",
    "tap_ctl_pause",
    "tap_ctl_unpause",
    "tap_ctl_stats",
    "tap_ctl_stats_fwrite",
    "tap_ctl_blk_major",
    "tap_ctl_connect_xenblkif",
    "tap_ctl_disconnect_xenblkif",
    "tap_ctl_info",
    "parse_params",
];

/// Our additions, declared in our header's extension section.
const EXTENSIONS: [&str; 2] = ["tap_ctl_set_control_dir", "tap_ctl_set_tapdisk"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory's profile directory (this test runs from its `deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn built(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build every target first (`cargo build --workspace`: the binaries and the cdylib)",
        path.display()
    );
    path
}

fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is not installed: run scripts/setup.sh first");
}

fn checked(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The library installed under `stage` (PREFIX /usr), as a package would stage it.
fn install(stage: &Path) -> PathBuf {
    let script = crate_dir().join("../../scripts/install-libblktapctl.sh");
    let output = Command::new(script)
        .arg(built("libblktapctl_c.so"))
        .env("DESTDIR", stage)
        .env("PREFIX", "/usr")
        .env_remove("LIBDIR")
        .env_remove("INCLUDEDIR")
        .output()
        .unwrap();
    checked("install-libblktapctl.sh", output);
    stage.join("usr/lib")
}

/// A test's control directory, the client program and what to run it with.
struct Client {
    dir: tempfile::TempDir,
    ctl_dir: PathBuf,
    program: PathBuf,
    libdir: PathBuf,
    site_config: PathBuf,
    /// (pid, minor) of the VBD the test created, destroyed on drop if the test failed.
    vbd: Option<(u32, u32)>,
}

impl Client {
    fn build() -> Self {
        for tool in ["cc", "pkg-config", "valgrind"] {
            require(tool);
        }
        let dir = tempfile::Builder::new()
            .prefix("libblktapctl")
            .tempdir()
            .unwrap();
        let stage = dir.path().join("stage");
        let libdir = install(&stage);
        let pkg_config = |flag: &str| {
            let output = Command::new("pkg-config")
                .args([flag, "libblktapctl"])
                .env("PKG_CONFIG_LIBDIR", libdir.join("pkgconfig"))
                .env("PKG_CONFIG_SYSROOT_DIR", &stage)
                .output()
                .unwrap();
            checked("pkg-config", output)
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let program = dir.path().join("client");
        let output = Command::new("cc")
            .args([
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-g",
                "-pthread",
            ])
            .args(pkg_config("--cflags"))
            .arg("-o")
            .arg(&program)
            .arg(crate_dir().join("tests/c/client.c"))
            .args(pkg_config("--libs"))
            .output()
            .unwrap();
        checked("cc", output);
        let site_config = dir.path().join("tapdisk.toml");
        std::fs::write(&site_config, "").unwrap();
        let ctl_dir = dir.path().join("ctl");
        Self {
            dir,
            ctl_dir,
            program,
            libdir,
            site_config,
            vbd: None,
        }
    }

    /// Runs the client with `args` under valgrind; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let output = Command::new("valgrind")
            .args([
                "-q",
                "--error-exitcode=99",
                "--leak-check=full",
                "--show-leak-kinds=definite,indirect,possible",
                "--errors-for-leak-kinds=definite,indirect,possible",
            ])
            .arg(format!(
                "--suppressions={}",
                crate_dir().join("tests/c/valgrind.supp").display()
            ))
            .arg(&self.program)
            .arg(&self.ctl_dir)
            .arg(built("tapdisk"))
            .args(args)
            .env("LD_LIBRARY_PATH", &self.libdir)
            .env("TAPDISK_CONFIG", &self.site_config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let stdout = checked(&format!("client {args:?} under valgrind"), output);
        assert!(
            stderr.is_empty(),
            "client {args:?} wrote on stderr: {stderr}"
        );
        stdout
    }

    fn tap_ctl(&self, args: &[&str]) -> String {
        let output = Command::new(built("tap-ctl"))
            .args(args)
            .env("BLKTAP_CONTROL_DIR", &self.ctl_dir)
            .env("BLKTAP_TAPDISK", built("tapdisk"))
            .env("TAPDISK_CONFIG", &self.site_config)
            .output()
            .unwrap();
        checked(&format!("tap-ctl {args:?}"), output)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some((pid, minor)) = self.vbd {
            let _ = Command::new(built("tap-ctl"))
                .args(["destroy", "-p", &pid.to_string(), "-m", &minor.to_string()])
                .env("BLKTAP_CONTROL_DIR", &self.ctl_dir)
                .output();
        }
    }
}

/// `key=value` of a `minor=.. device=..` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn libxl_and_tapback_sequences_in_c_under_valgrind() {
    let mut client = Client::build();
    let image = client.dir.path().join("disk.img");
    std::fs::write(&image, vec![0x5a; 8 << 20]).unwrap();
    let image_arg = image.to_str().unwrap();

    // libxl: find (absent), create, find again; the library prints nothing of its own.
    let created = client.run(&["create", image_arg]);
    let created = created.trim_end();
    assert_eq!(created.lines().count(), 1, "{created}");
    let minor: u32 = field(created, "minor").parse().unwrap();
    let device = Path::new(field(created, "device"));

    // tap_ctl_list and `tap-ctl list` give the same rows.
    let listed = client.tap_ctl(&["list"]);
    assert_eq!(client.run(&["list"]), listed);
    let row = listed
        .lines()
        .find(|line| line.contains(&format!("minor={minor} ")))
        .unwrap_or_else(|| panic!("minor {minor} not in {listed}"));
    assert_eq!(
        row,
        format!(
            "pid={} minor={minor} state=0 args=aio:{image_arg}",
            field(row, "pid")
        )
    );
    let pid: u32 = field(row, "pid").parse().unwrap();
    client.vbd = Some((pid, minor));

    // The device tap_ctl_create returned is what `tap-ctl create` would print: the block
    // device serving the VBD, else its marker file.
    if device.starts_with("/dev") {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = std::fs::metadata(device).unwrap().file_type();
        assert!(
            kind.is_block_device(),
            "{} is no block device",
            device.display()
        );
    } else {
        assert_eq!(
            device,
            client.ctl_dir.join(format!("tapdisk/tapdisk-{minor}"))
        );
    }

    // tapback: list_pid and info of that VBD.
    let tapback = client.run(&["tapback", &pid.to_string(), &minor.to_string()]);
    assert_eq!(
        tapback,
        format!("{row}\nsectors=16384 sector_size=512 info=0\n")
    );

    // libxl: destroy, then the image is found nowhere.
    client.run(&["destroy", &pid.to_string(), &minor.to_string(), image_arg]);
    client.vbd = None;
    assert_eq!(client.tap_ctl(&["list"]), "");
}

#[test]
fn argument_checks_and_simple_calls_in_c_under_valgrind() {
    let client = Client::build();
    assert_eq!(client.run(&["checks"]), "checks passed\n");
}

#[test]
fn soname_and_every_header_function_exported() {
    require("nm");
    require("readelf");
    let library = built("libblktapctl_c.so");
    let dynamic = checked(
        "readelf -d",
        Command::new("readelf")
            .arg("-d")
            .arg(&library)
            .output()
            .unwrap(),
    );
    assert!(
        dynamic.contains("Library soname: [libblktapctl.so.0]"),
        "{dynamic}"
    );

    let symbols = checked(
        "nm -D --defined-only",
        Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&library)
            .output()
            .unwrap(),
    );
    let defined = |kind: &[&str], name: &str| {
        symbols.lines().any(|line| {
            let mut fields = line.split_whitespace().rev();
            fields.next() == Some(name) && fields.next().is_some_and(|k| kind.contains(&k))
        })
    };
    let header = std::fs::read_to_string(crate_dir().join("include/blktap/tap-ctl.h")).unwrap();
    for name in C_HEADER_FUNCTIONS.iter().chain(&EXTENSIONS) {
        assert!(defined(&["T"], name), "{name} is not exported:\n{symbols}");
        assert!(
            header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")),
            "{name} is not declared in our header"
        );
    }
    assert!(
        defined(&["D", "B"], "tap_ctl_debug"),
        "tap_ctl_debug is not exported:\n{symbols}"
    );
    // Nothing else is exported (no Rust symbols, no helpers).
    let mut exported: Vec<&str> = symbols
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .collect();
    exported.sort_unstable();
    let mut expected: Vec<&str> = C_HEADER_FUNCTIONS
        .iter()
        .chain(&EXTENSIONS)
        .copied()
        .chain(["tap_ctl_debug"])
        .collect();
    expected.sort_unstable();
    assert_eq!(exported, expected);
}
