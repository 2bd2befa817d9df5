//! `tap-ctl stats`: typed statistics of a VBD, serialised as tapdisk's `tapdisk-stats.c`
//! lays its JSON out (`{ "key": value, ... }`, `[ a, b ]`, images leaf first), the shape and
//! field names SM and xapi parse.
//!
//! Drivers report [`DriverStats`] ([`crate::driver::ImageDriver::stats`]); the VBD adds what
//! is its own: the name, the block device, sector counters, requests in flight and the
//! request limit each image's `"reqs"` shows; Xen guest rings add a `"xenbus"` object each.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::driver::{DriverDetail, DriverStats};
use crate::image::Image;
use crate::lcache::{LocalCache, LocalCacheStats};
use crate::vbd::Vbd;

/// The C stack's `DISK_TYPE_LOG`: the changed-block log's driver type in stats.
pub const LOG_DISK_TYPE: u32 = 9;

/// The C stack's `DISK_TYPE_LCACHE`: the local cache's driver type in stats.
pub const LCACHE_DISK_TYPE: u32 = 11;

/// Request slots reported as each driver's `"reqs": { "max": ... }`.
pub const MAX_REQUESTS: usize = 352;

/// The stats object of one VBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VbdStats {
    /// `type:/path` of the image, empty while closed.
    pub name: String,
    /// The kernel block device serving the VBD, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blockdev: Option<String>,
    /// Why the VBD has no kernel block device although its site default asked for one
    /// (none available, or it failed to start); the VBD is served over NBD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blockdev_error: Option<String>,
    /// Sectors read and written.
    pub secs: [u64; 2],
    /// The image chain, leaf first.
    pub images: Vec<ImageStats>,
    /// The connected Xen guest rings, one `"xenbus"` key each.
    #[serde(flatten)]
    pub xenbus: XenbusRings,
    /// Sectors written to the secondary since the leaf ran out of space (the C name).
    #[serde(rename = "FIXME_enospc_redirect_count")]
    pub enospc_redirect_count: u64,
    /// 1 once the secondary (the storage-migration mirror) failed and is no longer
    /// written, else 0; an integer, as xapi parses it.
    pub nbd_mirror_failed: u64,
    /// Requests in flight.
    pub reqs_outstanding: usize,
    /// Always `"false"` (no read cache), a string as in the C stack.
    pub read_caching: &'static str,
    /// IntelliCache's local cache (`-r`): hits, misses, sectors filled (a blktap-rs
    /// addition; absent without a local cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_cache: Option<LocalCacheStats>,
}

/// The `"xenbus"` objects of a VBD's connected guest rings. As in the C tapdisk, each ring
/// adds its own `"xenbus"` key to the VBD's object, so several rings repeat the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XenbusRings(pub Vec<XenbusStats>);

impl Serialize for XenbusRings {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for ring in &self.0 {
            map.serialize_entry("xenbus", ring)?;
        }
        map.end()
    }
}

/// One guest ring (`td-blkif.c`'s stats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XenbusStats {
    /// The context's name, always `td-xenio-default`.
    pub pool: &'static str,
    /// The guest's domain.
    pub domid: u32,
    /// Its xenbus device id.
    pub devid: u32,
    /// Requests taken from the ring, and completed.
    pub reqs: [u64; 2],
    /// Event-channel notifications received, and batches of responses published.
    pub kicks: [u64; 2],
    /// Failures by where they happened.
    pub errors: XenbusErrors,
}

/// `"errors"` of a guest ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct XenbusErrors {
    /// Always 0 (never counted in C either).
    pub msg: u64,
    /// Requests refused at intake (bad fields, grant copy failures).
    pub map: u64,
    /// Requests the VBD refused.
    pub vbd: u64,
    /// Requests the image chain failed.
    pub img: u64,
}

/// One image of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageStats {
    /// The image's path.
    pub name: String,
    /// Sectors completed, failed or not: reads, writes (the C tapdisk's meaning).
    pub hits: [u64; 2],
    /// Sectors of failed requests: reads, writes.
    pub fail: [u64; 2],
    /// Its driver.
    pub driver: DriverInfo,
}

/// An image's driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriverInfo {
    /// The C stack's `DISK_TYPE_*` number.
    #[serde(rename = "type")]
    pub disk_type: u32,
    /// The driver's name (`aio`, `vhd`, `nbd`).
    pub name: &'static str,
    /// Its status, `null` when it reports none.
    pub status: Option<DriverStatus>,
}

/// A driver's status as shown: the VBD's request limit, then the driver's own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriverStatus {
    /// Request slots and those pending in the engine.
    pub reqs: Requests,
    /// The I/O engine.
    pub engine: &'static str,
    /// Driver-specific fields.
    #[serde(flatten)]
    pub detail: DriverDetail,
}

/// `"reqs"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Requests {
    /// [`MAX_REQUESTS`].
    pub max: usize,
    /// Pending in the engine.
    pub pending: usize,
}

impl From<DriverStats> for DriverStatus {
    fn from(stats: DriverStats) -> Self {
        Self {
            reqs: Requests {
                max: MAX_REQUESTS,
                pending: stats.pending,
            },
            engine: stats.engine,
            detail: stats.detail,
        }
    }
}

/// A `[reads, writes]` counter pair now.
fn loaded(counter: &[std::sync::atomic::AtomicU64; 2]) -> [u64; 2] {
    [
        counter[0].load(Ordering::Relaxed),
        counter[1].load(Ordering::Relaxed),
    ]
}

impl ImageStats {
    /// The statistics of `image` now.
    fn of(image: &Image) -> Self {
        let disk_type = image.driver.disk_type();
        Self {
            name: image.driver.path().to_string_lossy().into_owned(),
            hits: loaded(&image.counters.hits),
            fail: loaded(&image.counters.fail),
            driver: DriverInfo {
                disk_type: disk_type.number(),
                name: disk_type.name(),
                status: image.driver.stats().map(DriverStatus::from),
            },
        }
    }
}

impl VbdStats {
    /// The statistics of `vbd` now; `blockdev` is its kernel block device, if any.
    pub fn of(vbd: &Vbd, blockdev: Option<&Path>) -> Self {
        let counters = vbd.counters();
        let images = vbd.chain().map_or_else(Vec::new, |chain| {
            // The changed-block log is the first image, above the leaf, as in the C stack.
            let log = chain.log().map(|log| ImageStats {
                name: log.path().to_string_lossy().into_owned(),
                hits: loaded(&log.counters().hits),
                fail: loaded(&log.counters().fail),
                driver: DriverInfo {
                    disk_type: LOG_DISK_TYPE,
                    name: "log",
                    status: None,
                },
            });
            let mut images: Vec<ImageStats> = chain.images().iter().map(ImageStats::of).collect();
            if let Some(secondary) = chain.secondary() {
                if let Some(at) = secondary.listed_at() {
                    images.insert(at.min(images.len()), ImageStats::of(secondary.image()));
                }
            }
            // The local cache sits right below the leaf, named after it, as in the C stack.
            if let Some(cache) = chain.local_cache() {
                let stats = cache.stats();
                images.insert(
                    1.min(images.len()),
                    ImageStats {
                        name: cache.path().to_string_lossy().into_owned(),
                        hits: [stats.misses, stats.fills],
                        fail: [0, stats.fill_errors],
                        driver: DriverInfo {
                            disk_type: LCACHE_DISK_TYPE,
                            name: "lc",
                            status: None,
                        },
                    },
                );
            }
            log.into_iter().chain(images).collect()
        });
        let local_cache = vbd
            .chain()
            .and_then(|chain| chain.local_cache().map(LocalCache::stats));
        let secondary = vbd.secondary_state();
        Self {
            name: vbd.params().unwrap_or_default(),
            blockdev: blockdev.map(|path| path.to_string_lossy().into_owned()),
            blockdev_error: None,
            secs: [
                counters.secs[0].load(Ordering::Relaxed),
                counters.secs[1].load(Ordering::Relaxed),
            ],
            images,
            xenbus: XenbusRings::default(),
            enospc_redirect_count: secondary
                .as_ref()
                .map_or(0, |state| state.redirected_sectors()),
            nbd_mirror_failed: secondary
                .as_ref()
                .map_or(0, |state| u64::from(state.mirror_failed())),
            reqs_outstanding: vbd.in_flight(),
            read_caching: "false",
            local_cache,
        }
    }
}

/// JSON laid out as `tapdisk-stats.c` writes it: `{ "key": value, ... }` and `[ a, b ]`,
/// with a space inside every bracket (so empty ones are `{  }` and `[  ]`).
struct TapdiskLayout;

impl serde_json::ser::Formatter for TapdiskLayout {
    fn begin_array<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b"[ ")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b" ]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        out: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(out, first)
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b"{ ")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b" }")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        out: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(out, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, out: &mut W) -> io::Result<()> {
        out.write_all(b": ")
    }
}

/// `", "` before every element of an array or object but the first.
fn separator<W: ?Sized + io::Write>(out: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        out.write_all(b", ")
    }
}

/// `value` as `tap-ctl stats` text.
pub fn to_text<T: Serialize + ?Sized>(value: &T) -> io::Result<String> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, TapdiskLayout);
    value.serialize(&mut serializer).map_err(io::Error::other)?;
    String::from_utf8(out).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::vhd::VhdStats;
    use crate::iobuf::IoBuf;
    use crate::testing::{fake_vbd, FakeImage};
    use crate::vbd::DEFAULT_REQUEST_TIMEOUT;

    #[tokio::test]
    async fn open_vbd_stats_text_as_the_c_stack_lays_it_out() {
        let vbd = fake_vbd(
            FakeImage::new(8).at("/srv/disk.img"),
            DEFAULT_REQUEST_TIMEOUT,
        );
        vbd.write(0, IoBuf::zeroed(1024)).await.unwrap();
        vbd.read(0, IoBuf::zeroed(512)).await.unwrap();
        let stats = VbdStats::of(&vbd, Some(Path::new("/dev/ublkb9")));
        assert_eq!(
            to_text(&stats).unwrap(),
            "{ \"name\": \"aio:/srv/disk.img\", \"blockdev\": \"/dev/ublkb9\", \"secs\": [ 1, 2 ], \
             \"images\": [ { \"name\": \"/srv/disk.img\", \"hits\": [ 1, 2 ], \"fail\": [ 0, 0 ], \
             \"driver\": { \"type\": 0, \"name\": \"aio\", \"status\": { \"reqs\": { \"max\": 352, \
             \"pending\": 0 }, \"engine\": \"fake\", \"mapped\": false } } } ], \
             \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \
             \"read_caching\": \"false\" }"
        );
        // Every VBD of the process (cookie 0xFFFF): a list of them.
        let all = to_text(&[stats.clone(), stats]).unwrap();
        assert!(
            all.starts_with("[ { \"name\": ") && all.ends_with(" } ]"),
            "{all}"
        );
        assert!(all.contains(" }, { \"name\": "), "{all}");
    }

    #[tokio::test]
    async fn the_changed_block_log_is_shown_first_as_the_c_log_driver() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("disk.cbtlog");
        std::fs::write(&log, cbt::LogFile::new(4096).unwrap().to_bytes()).unwrap();
        let chain = crate::image::ImageChain::from_drivers(vec![Box::new(
            FakeImage::new(8).at("/srv/disk.img"),
        )])
        .unwrap()
        .with_log(&log)
        .unwrap();
        let vbd = Vbd::new(2);
        let request = crate::vbd::OpenRequest {
            params: "aio:/srv/disk.img".into(),
            options: crate::driver::OpenOptions::default(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            log: Some(log.clone()),
            secondary: None,
            intellicache: crate::lcache::IntelliCache::default(),
        };
        vbd.install(chain, request).unwrap();
        vbd.write(0, IoBuf::zeroed(1024)).await.unwrap();
        vbd.read(0, IoBuf::zeroed(512)).await.unwrap();
        let text = to_text(&VbdStats::of(&vbd, None)).unwrap();
        let expected = format!(
            "\"images\": [ {{ \"name\": \"{}\", \"hits\": [ 1, 2 ], \"fail\": [ 0, 0 ], \
             \"driver\": {{ \"type\": 9, \"name\": \"log\", \"status\": null }} }}, \
             {{ \"name\": \"/srv/disk.img\", ",
            log.display()
        );
        assert!(text.contains(&expected), "{text}");
    }

    /// `hits` and `fail` count sectors, as the C tapdisk's (issue 23): `hits` every sector
    /// of a completed request, failed or not, `fail` those that failed; `EBUSY` (retried)
    /// counts nowhere.
    #[tokio::test]
    async fn hits_and_fail_count_sectors_as_the_c_tapdisk() {
        let image = FakeImage::new(512).at("/srv/disk.img");
        let faults = image.faults();
        let vbd = fake_vbd(image, std::time::Duration::from_millis(1500));
        // 128 KiB read and written: [ 256, 256 ] in the C tapdisk.
        vbd.write(0, IoBuf::zeroed(128 << 10)).await.unwrap();
        vbd.read(0, IoBuf::zeroed(128 << 10)).await.unwrap();
        let hits = |vbd: &Vbd| {
            let stats = VbdStats::of(vbd, None);
            (stats.images[0].hits, stats.images[0].fail)
        };
        assert_eq!(hits(&vbd), ([256, 256], [0, 0]));
        // A 4 KiB read failing with EIO: 8 sectors in both.
        faults.fail_reads(1, libc::EIO);
        vbd.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
        assert_eq!(hits(&vbd), ([264, 256], [8, 0]));
        // EBUSY once, then success: only the completed attempt counts.
        faults.fail_writes(1, libc::EBUSY);
        vbd.write(0, IoBuf::zeroed(4096)).await.unwrap();
        assert_eq!(hits(&vbd), ([264, 264], [8, 0]));
    }

    #[test]
    fn every_guest_ring_adds_a_xenbus_key_after_the_images() {
        let ring = |domid, reqs| XenbusStats {
            pool: "td-xenio-default",
            domid,
            devid: 51712,
            reqs,
            kicks: [3, 2],
            errors: XenbusErrors {
                msg: 0,
                map: 1,
                vbd: 0,
                img: 0,
            },
        };
        let mut stats = VbdStats::of(&Vbd::new(4), None);
        stats.xenbus = XenbusRings(vec![ring(5, [7, 6]), ring(6, [0, 0])]);
        assert_eq!(
            to_text(&stats).unwrap(),
            "{ \"name\": \"\", \"secs\": [ 0, 0 ], \"images\": [  ], \"xenbus\": { \"pool\": \
             \"td-xenio-default\", \"domid\": 5, \"devid\": 51712, \"reqs\": [ 7, 6 ], \"kicks\": \
             [ 3, 2 ], \"errors\": { \"msg\": 0, \"map\": 1, \"vbd\": 0, \"img\": 0 } }, \
             \"xenbus\": { \"pool\": \"td-xenio-default\", \"domid\": 6, \"devid\": 51712, \
             \"reqs\": [ 0, 0 ], \"kicks\": [ 3, 2 ], \"errors\": { \"msg\": 0, \"map\": 1, \
             \"vbd\": 0, \"img\": 0 } }, \"FIXME_enospc_redirect_count\": 0, \
             \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \"read_caching\": \"false\" }"
        );
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(to_text("a\"b\\c\n\u{1}").unwrap(), r#""a\"b\\c\n\u0001""#);
    }

    #[test]
    fn closed_vbd_stats_text() {
        let vbd = Vbd::new(4);
        assert_eq!(
            to_text(&VbdStats::of(&vbd, None)).unwrap(),
            "{ \"name\": \"\", \"secs\": [ 0, 0 ], \"images\": [  ], \"FIXME_enospc_redirect_count\": 0, \
             \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \"read_caching\": \"false\" }"
        );
        assert_eq!(to_text::<[VbdStats]>(&[]).unwrap(), "[  ]");
        assert!(to_text(&VbdStats::of(&vbd, Some(Path::new("/dev/loop3"))))
            .unwrap()
            .contains("\"blockdev\": \"/dev/loop3\""));
    }

    #[test]
    fn driver_status_text_as_the_c_stack_lays_it_out() {
        let raw = DriverStatus::from(DriverStats {
            pending: 3,
            engine: "io_uring",
            detail: DriverDetail::Raw { mapped: false },
        });
        assert_eq!(
            to_text(&raw).unwrap(),
            "{ \"reqs\": { \"max\": 352, \"pending\": 3 }, \"engine\": \"io_uring\", \"mapped\": false }"
        );
        let vhd = DriverStatus::from(DriverStats {
            pending: 0,
            engine: "pread",
            detail: DriverDetail::Vhd {
                vhd: VhdStats {
                    kind: "dynamic",
                    allocated_blocks: 2,
                    allocations: 1,
                    bitmap_writes: 5,
                    bitmap_loads: 4,
                    cached_bitmaps: 2,
                },
            },
        });
        assert_eq!(
            to_text(&vhd).unwrap(),
            "{ \"reqs\": { \"max\": 352, \"pending\": 0 }, \"engine\": \"pread\", \"vhd\": { \
             \"type\": \"dynamic\", \"allocated_blocks\": 2, \"allocations\": 1, \
             \"bitmap_writes\": 5, \"bitmap_loads\": 4, \"cached_bitmaps\": 2 } }"
        );
    }
}
