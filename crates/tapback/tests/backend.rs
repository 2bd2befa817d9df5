//! tapback's device state machine against an in-memory XenStore and a recording tapdisk:
//! the XenbusState handshake, the keys it reads and writes, CONNECT/DISCONNECT.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use blktapctl::{Blkif, ImageInfo};
use tapback::backend::{
    parse_nbd_socket, Features, Store, Tapback, Tapdisks, BACKEND_TOKEN, FRONTEND_TOKEN,
};

#[derive(Debug, Default)]
struct FakeStore {
    keys: BTreeMap<String, String>,
    watches: Vec<(String, String)>,
}

impl Store for FakeStore {
    fn read(&mut self, path: &str) -> io::Result<Option<String>> {
        Ok(self.keys.get(path).cloned())
    }
    fn directory(&mut self, path: &str) -> io::Result<Vec<String>> {
        let prefix = format!("{path}/");
        let mut children: Vec<String> = self
            .keys
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or("").to_owned())
            .collect();
        children.dedup();
        Ok(children)
    }
    fn write(&mut self, pairs: &[(String, String)]) -> io::Result<()> {
        for (k, v) in pairs {
            self.keys.insert(k.clone(), v.clone());
        }
        Ok(())
    }
    fn remove(&mut self, path: &str) -> io::Result<()> {
        let prefix = format!("{path}/");
        self.keys
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        Ok(())
    }
    fn watch(&mut self, path: &str, token: &str) -> io::Result<()> {
        self.watches.push((path.to_owned(), token.to_owned()));
        Ok(())
    }
    fn unwatch(&mut self, path: &str, token: &str) -> io::Result<()> {
        self.watches
            .retain(|w| w != &(path.to_owned(), token.to_owned()));
        Ok(())
    }
}

#[derive(Debug, Default)]
struct FakeTapdisks {
    connects: Vec<(u32, u32, Blkif)>,
    disconnects: Vec<(u32, u32, u32)>,
}

impl Tapdisks for FakeTapdisks {
    fn disk_info(&mut self, dir: &Path, pid: u32, minor: u32) -> io::Result<ImageInfo> {
        assert_eq!(dir, Path::new("/run/blktap-control"));
        assert_eq!((pid, minor), (4242, 2));
        Ok(ImageInfo {
            sectors: 131_072,
            sector_size: 512,
            info: 0,
        })
    }
    fn connect(&mut self, _: &Path, pid: u32, minor: u32, blkif: &Blkif) -> io::Result<()> {
        self.connects.push((pid, minor, blkif.clone()));
        Ok(())
    }
    fn disconnect(&mut self, _: &Path, pid: u32, domid: u32, devid: u32) -> io::Result<()> {
        self.disconnects.push((pid, domid, devid));
        Ok(())
    }
}

const ROOT: &str = "/local/domain/0/backend/vbd3";
const BE: &str = "/local/domain/0/backend/vbd3/5/51712";
const FE: &str = "/local/domain/5/device/vbd/51712";

fn tapback(extra: &[(&str, &str)]) -> Tapback<FakeStore, FakeTapdisks> {
    tapback_with(extra, true)
}

fn tapback_with(extra: &[(&str, &str)], with_frontend: bool) -> Tapback<FakeStore, FakeTapdisks> {
    let mut store = FakeStore::default();
    for (k, v) in [
        ("frontend", FE),
        ("frontend-id", "5"),
        ("mode", "w"),
        ("state", "1"),
        ("hotplug-status", "connected"),
        ("physical-device-path", "/run/blktap-control/nbd4242.2"),
    ] {
        store.keys.insert(format!("{BE}/{k}"), v.to_owned());
    }
    if with_frontend {
        store.keys.insert(format!("{FE}/state"), "1".to_owned());
    }
    for (k, v) in extra {
        store.keys.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut tapback = Tapback::new(store, FakeTapdisks::default(), ROOT, Features::default());
    tapback.start().unwrap();
    tapback.handle_event(ROOT, BACKEND_TOKEN);
    tapback
}

fn get(tapback: &mut Tapback<FakeStore, FakeTapdisks>, key: &str) -> Option<String> {
    tapback.store().keys.get(key).cloned()
}

fn front(tapback: &mut Tapback<FakeStore, FakeTapdisks>, pairs: &[(&str, &str)]) {
    for (k, v) in pairs {
        tapback
            .store()
            .keys
            .insert(format!("{FE}/{k}"), (*v).to_owned());
    }
    tapback.handle_event(&format!("{FE}/state"), FRONTEND_TOKEN);
}

#[test]
fn handshake_connect_and_close() {
    let mut t = tapback(&[]);
    assert_eq!(
        get(&mut t, &format!("{BE}/max-ring-page-order")).as_deref(),
        Some("3")
    );
    assert_eq!(
        get(&mut t, &format!("{BE}/kthread-pid")).as_deref(),
        Some("4242")
    );
    assert_eq!(
        get(&mut t, &format!("{BE}/state")).as_deref(),
        Some("2"),
        "InitWait"
    );
    assert!(t
        .store()
        .watches
        .contains(&(format!("{FE}/state"), FRONTEND_TOKEN.to_owned())));
    front(
        &mut t,
        &[
            ("ring-ref", "77"),
            ("event-channel", "9"),
            ("protocol", "x86_64-abi"),
            ("state", "3"),
        ],
    );
    let (pid, minor, blkif) = t_connects(&mut t).pop().unwrap();
    assert_eq!((pid, minor), (4242, 2));
    assert_eq!(
        (
            blkif.domid,
            blkif.devid,
            blkif.gref[0],
            blkif.order,
            blkif.proto,
            blkif.port
        ),
        (5, 51712, 77, 0, 3, 9)
    );
    for (k, v) in [
        ("state", "4"),
        ("sectors", "131072"),
        ("sector-size", "512"),
        ("info", "0"),
        ("feature-barrier", "1"),
        ("feature-flush-cache", "1"),
        ("feature-discard", "1"),
        ("feature-max-indirect-segments", "256"),
    ] {
        assert_eq!(get(&mut t, &format!("{BE}/{k}")).as_deref(), Some(v), "{k}");
    }
    // Connected (4) again: no second CONNECT.
    front(&mut t, &[("state", "4")]);
    assert_eq!(t_connects(&mut t).len(), 1);
    front(&mut t, &[("state", "5")]);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("5"));
    front(&mut t, &[("state", "6")]);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("6"));
    assert_eq!(t_disconnects(&mut t), [(4242, 5, 51712)]);
}

fn t_connects(t: &mut Tapback<FakeStore, FakeTapdisks>) -> Vec<(u32, u32, Blkif)> {
    t.tapdisks_mut().connects.clone()
}

fn t_disconnects(t: &mut Tapback<FakeStore, FakeTapdisks>) -> Vec<(u32, u32, u32)> {
    t.tapdisks_mut().disconnects.clone()
}

#[test]
fn multi_page_rings_read_only_and_native_default() {
    let mut t = tapback(&[(&format!("{BE}/mode"), "r")]);
    front(
        &mut t,
        &[
            ("ring-page-order", "2"),
            ("ring-ref0", "10"),
            ("ring-ref1", "11"),
            ("ring-ref2", "12"),
            ("ring-ref3", "13"),
            ("event-channel", "4"),
            ("state", "3"),
        ],
    );
    let (_, _, blkif) = t_connects(&mut t).pop().unwrap();
    assert_eq!(blkif.order, 2);
    assert_eq!(&blkif.gref[..5], [10, 11, 12, 13, 0]);
    assert_eq!(blkif.proto, 1, "no protocol key: native");
    assert_eq!(
        get(&mut t, &format!("{BE}/info")).as_deref(),
        Some("4"),
        "VDISK_READONLY"
    );
}

#[test]
fn nothing_happens_before_hotplug_is_connected() {
    let mut t = tapback(&[(&format!("{BE}/hotplug-status"), "")]);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("1"));
    assert_eq!(get(&mut t, &format!("{BE}/kthread-pid")), None);
    t.store()
        .keys
        .insert(format!("{BE}/hotplug-status"), "connected".to_owned());
    t.handle_event(&format!("{BE}/hotplug-status"), BACKEND_TOKEN);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("2"));
}

#[test]
fn a_vanished_front_end_removes_the_back_end_and_disconnects() {
    let mut t = tapback(&[]);
    front(
        &mut t,
        &[("ring-ref", "1"), ("event-channel", "2"), ("state", "4")],
    );
    assert_eq!(t_connects(&mut t).len(), 1);
    t.store().keys.retain(|k, _| !k.starts_with(FE));
    t.handle_event(&format!("{FE}/state"), FRONTEND_TOKEN);
    assert!(
        t.store().keys.keys().all(|k| !k.starts_with(BE)),
        "back end removed"
    );
    assert_eq!(t_disconnects(&mut t), [(4242, 5, 51712)]);
    assert!(t.store().watches.iter().all(|(p, _)| !p.starts_with(FE)));
    // The removal's own event finds nothing left to do.
    t.handle_event(BE, BACKEND_TOKEN);
    assert_eq!(t_disconnects(&mut t).len(), 1);
}

#[test]
fn a_back_end_written_before_its_front_end_waits_for_it() {
    let mut t = tapback_with(&[], false);
    t.handle_event(&format!("{BE}/state"), BACKEND_TOKEN);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("1"));
    assert!(
        get(&mut t, &format!("{BE}/frontend")).is_some(),
        "back end kept"
    );
    t.store().keys.insert(format!("{FE}/state"), "1".to_owned());
    t.handle_event(&format!("{FE}/state"), FRONTEND_TOKEN);
    assert_eq!(get(&mut t, &format!("{BE}/state")).as_deref(), Some("2"));
}

#[test]
fn bad_front_end_keys_do_not_connect() {
    let mut t = tapback(&[]);
    front(
        &mut t,
        &[("ring-ref", "x"), ("event-channel", "2"), ("state", "3")],
    );
    front(
        &mut t,
        &[("ring-ref", "3"), ("protocol", "arm-abi"), ("state", "3")],
    );
    front(
        &mut t,
        &[
            ("protocol", "x86_32-abi"),
            ("ring-page-order", "9"),
            ("state", "3"),
        ],
    );
    assert!(t_connects(&mut t).is_empty());
    front(&mut t, &[("ring-page-order", "0"), ("state", "3")]);
    assert_eq!(t_connects(&mut t)[0].2.proto, 2);
}

#[test]
fn nbd_socket_paths() {
    assert_eq!(
        parse_nbd_socket("/run/blktap-control/nbd12.3"),
        Some(("/run/blktap-control".into(), 12, 3))
    );
    assert_eq!(parse_nbd_socket("/run/blktap-control/nbd-old12.3"), None);
    assert_eq!(parse_nbd_socket("nbd:unix:/x"), None);
}
