//! tapdisk's configuration seen from outside: a site file that names an invalid value stops
//! tapdisk from starting with a message naming key, value and file; per-VBD open options
//! (`tap-ctl open -o`) reach a running tapdisk and are checked there; `tapdisk
//! --print-config` shows the configuration in effect.

mod common;

use std::process::Command;

use common::{tapdisk_bin, Env};

const MIB: usize = 1 << 20;

#[test]
fn an_invalid_site_file_is_refused_naming_key_value_and_file() {
    let env = Env::new();
    env.site_config("[ublk]\nqueues = 0\n");
    let stderr = env.tap_ctl_err(&["spawn"], libc::EINVAL);
    assert!(
        stderr.contains(&format!(
            "{}: ublk.queues = 0: expected 1 to 64",
            env.config_file.display()
        )),
        "{stderr}"
    );
    env.site_config("[ublk]\nqueus = 2\n");
    let stderr = env.tap_ctl_err(&["spawn"], libc::EINVAL);
    assert!(
        stderr.contains("line 2") && stderr.contains("queus"),
        "{stderr}"
    );
    env.site_config("[io]\nengine = \"fast\"\n");
    let stderr = env.tap_ctl_err(&["spawn"], libc::EINVAL);
    assert!(stderr.contains("fast"), "{stderr}");
    assert!(env.tapdisk_pids().is_empty());
}

#[test]
fn open_options_reach_a_running_tapdisk_and_are_checked_there() {
    let env = Env::new();
    let image = env.raw_image("disk.img", MIB, 1);
    let params = format!("aio:{}", image.display());
    let marker = env.tap_ctl_ok(&["allocate"]);
    let minor = marker.trim().rsplit_once("tapdisk-").unwrap().1.to_owned();
    let pid = env.tap_ctl_ok(&["spawn"]).trim().to_owned();
    env.tap_ctl_ok(&["attach", "-p", &pid, "-m", &minor]);
    let open = |extra: &[&str]| {
        let mut args = vec![
            "open",
            "-p",
            pid.as_str(),
            "-m",
            minor.as_str(),
            "-a",
            &params,
        ];
        args.extend_from_slice(extra);
        env.tap_ctl(&args)
    };
    for (option, wanted) in [
        (
            "ublk.queues=0",
            "open options: ublk.queues = 0: expected 1 to 64",
        ),
        ("ublk.depth=8000", "ublk.depth = 8000"),
        ("ublk.user_copy=sometimes", "sometimes"),
        ("io.engine=pread", "open options: line 1"),
    ] {
        let out = open(&["-o", option]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(libc::EINVAL), "{option}: {stderr}");
        assert!(stderr.contains(wanted), "{option}: {stderr}");
    }
    // Good options on an NBD-only VBD are accepted (they apply to a device when there is
    // one), and the refused opens left the VBD closed and usable.
    let out = open(&[
        "-o",
        "ublk.queues=4,ublk.depth=128,block_device.compat_symlinks=false",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.destroy(pid.parse().unwrap(), minor.parse().unwrap());
}

#[test]
fn print_config_shows_the_site_file_with_defaults_filled_in() {
    let env = Env::new();
    env.site_config("[block_device]\nopen = \"auto\"\n[ublk]\ndepth = 32\n");
    let out = Command::new(tapdisk_bin())
        .args(["--config"])
        .arg(&env.config_file)
        .arg("--print-config")
        .env("BLKTAP_CONTROL_DIR", &env.ctl_dir)
        .env_remove("TAPDISK_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        format!("# site file: {}", env.config_file.display()),
        format!("# control directory: {}", env.ctl_dir.display()),
        "open = \"auto\"".to_owned(),
        "create = \"auto\"".to_owned(),
        "depth = 32".to_owned(),
        "queues = 2".to_owned(),
        "engine = \"auto\"".to_owned(),
        "filter = \"info\"".to_owned(),
        "nbd_gather = true".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
}
