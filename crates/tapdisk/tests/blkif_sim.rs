//! The blkif frontend against simulated guests (no Xen needed): XENBLKIF_CONNECT /
//! DISCONNECT through the daemon's message handlers, then a front end driving the ring like
//! `xen-blkfront` while the requests go through a real VBD on an image file. Every ABI and
//! ring order, indirect descriptors, flush/barrier/discard, errors of the control messages,
//! a disconnect with requests in flight, statistics, and random workloads against a model.

// Test arithmetic on small, known values.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blkif::abi::{
    Abi, RawRequest, Response, Segment, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER, RSP_ERROR, RSP_OKAY,
};
use blkif::sim::{FrontRing, SimGuest};
use blkif::PAGE_SIZE;
use proptest::prelude::*;
use tapdisk::config::Config;
use tapdisk::control::ClientWatch;
use tapdisk::frontend::blkif::sim::{GuestPort, SimPlatform};
use tapdisk::frontend::blkif::stats::StatsLocation;
use tapdisk::frontend::blkif::XenBackend;
use tapdisk::server::{Reply, Tapdisk, Trailer};
use tapdisk_proto::{Blkif, Body, Message, MessageType, OpenFlags, Params};

const DOMID: u32 = 7;
const DEVID: u32 = 51712;
const PORT: u32 = 11;
const IMAGE_SECTORS: u64 = 8192; // 4 MiB
const MINOR: u16 = 3;

/// A tapdisk (message handlers only) with one open VBD on a raw image, and a guest.
struct World {
    _dir: tempfile::TempDir,
    image: PathBuf,
    shm: PathBuf,
    tapdisk: Tapdisk,
    platform: SimPlatform,
    guest: Arc<SimGuest>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    std::fs::create_dir_all(ctl.join("tapdisk")).unwrap();
    std::fs::write(ctl.join("tapdisk").join(format!("tapdisk-{MINOR}")), b"").unwrap();
    let shm = dir.path().join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let image = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..IMAGE_SECTORS * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(&image, bytes).unwrap();
    let platform = SimPlatform::default();
    let guest = SimGuest::new(8 + 128);
    platform.add_guest(DOMID, Arc::clone(&guest));
    let stats = StatsLocation {
        shm: shm.clone(),
        pid: 4242,
    };
    let config = Config {
        control_dir: ctl,
        ..Config::default()
    };
    let xen = XenBackend::new(platform.clone(), stats);
    let tapdisk = Tapdisk::with_xen(4242, Arc::new(config), xen);
    let world = World {
        _dir: dir,
        image,
        shm,
        tapdisk,
        platform,
        guest,
    };
    world.ok(MessageType::Attach, Body::Empty).await;
    let params = Params {
        flags: OpenFlags(OpenFlags::BLOCKDEV_NONE.0 | OpenFlags::NO_O_DIRECT.0),
        path: format!("aio:{}", world.image.display()),
        ..Params::default()
    };
    world.ok(MessageType::Open, Body::Params(params)).await;
    world
}

impl World {
    async fn send(&self, msg_type: MessageType, body: Body) -> Message {
        match self
            .tapdisk
            .handle(
                &Message::new(msg_type, MINOR, body),
                &Trailer::default(),
                ClientWatch::detached(),
            )
            .await
        {
            Reply::Message(message) => message,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    async fn ok(&self, msg_type: MessageType, body: Body) {
        let reply = self.send(msg_type, body).await;
        assert_eq!(Some(reply.msg_type), msg_type.success_reply(), "{reply:?}");
    }

    async fn errno(&self, msg_type: MessageType, body: Body) -> i32 {
        let reply = self.send(msg_type, body).await;
        assert_eq!(reply.msg_type, MessageType::Error, "{reply:?}");
        match reply.body {
            Body::Response { error, .. } => error,
            other => panic!("{other:?}"),
        }
    }

    /// Connects a ring of `1 << order` pages (guest pages 0..) and returns the front end.
    async fn connect(&self, abi: Abi, order: u32) -> Front {
        let pages = 1u32 << order;
        let grefs: Vec<u32> = (0..pages).collect();
        let ring = FrontRing::init(self.guest.map_ring(&grefs).unwrap(), abi);
        let port = self.platform.guest_port(DOMID, PORT);
        self.ok(MessageType::XenblkifConnect, Body::Blkif(blkif(abi, order)))
            .await;
        Front { ring, port }
    }

    async fn stats_text(&self) -> String {
        let request = Message::new(MessageType::Stats, MINOR, Body::Empty);
        match self
            .tapdisk
            .handle(&request, &Trailer::default(), ClientWatch::detached())
            .await
        {
            Reply::Stats(_, text) => text,
            other => panic!("{other:?}"),
        }
    }

    fn image_bytes(&self, sector: u64, sectors: u64) -> Vec<u8> {
        let all = std::fs::read(&self.image).unwrap();
        all[(sector * 512) as usize..((sector + sectors) * 512) as usize].to_vec()
    }
}

fn blkif(abi: Abi, order: u32) -> Blkif {
    let mut gref = [0u32; 8];
    for (i, g) in gref.iter_mut().enumerate().take(1 << order) {
        *g = i as u32;
    }
    Blkif {
        domid: DOMID,
        devid: DEVID,
        gref,
        order,
        proto: abi.proto(),
        port: PORT,
        ..Blkif::default()
    }
}

fn disconnect_body() -> Body {
    Body::Blkif(Blkif {
        domid: DOMID,
        devid: DEVID,
        ..Blkif::default()
    })
}

/// The guest's side: its ring and event channel.
struct Front {
    ring: FrontRing,
    port: GuestPort,
}

impl Front {
    /// Sends `requests` and waits for as many responses (in completion order).
    async fn exchange(&mut self, requests: &[RawRequest]) -> Vec<Response> {
        for request in requests {
            self.ring.put_request(request);
        }
        if self.ring.push_requests() {
            self.port.notify();
        }
        let mut responses = Vec::new();
        let collect = async {
            while responses.len() < requests.len() {
                while let Some(response) = self.ring.take_response() {
                    responses.push(response);
                }
                if responses.len() < requests.len() && !self.ring.final_check_for_responses() {
                    self.port.wait().await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), collect)
            .await
            .expect("responses within 20 s");
        responses
    }
}

const DATA: u32 = 8; // first data page

/// Waits (5 s at most) until the ring's task let go of the event channel.
async fn unbound(port: &GuestPort) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while port.is_bound() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the event channel is unbound after a disconnect");
}

fn whole(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

fn rw(operation: u8, id: u64, sector: u64, segments: Vec<Segment>) -> RawRequest {
    RawRequest::ReadWrite {
        operation,
        nr_segments: segments.len() as u8,
        handle: 0,
        id,
        sector,
        segments,
    }
}

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abi_and_ring_order_reads_and_writes_the_image() {
    for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
        for order in 0..=3 {
            let w = world().await;
            let mut front = w.connect(abi, order).await;
            // Read sectors 16..32 (image bytes are the sector number's low byte).
            let got = front
                .exchange(&[rw(OP_READ, 1, 16, vec![whole(DATA), whole(DATA + 1)])])
                .await;
            assert_eq!(
                got,
                [Response {
                    id: 1,
                    operation: OP_READ,
                    status: RSP_OKAY
                }]
            );
            let mut page = vec![0u8; PAGE_SIZE];
            w.guest.read(DATA as usize + 1, 0, &mut page);
            assert!(page
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (24 + i / 512) as u8));
            // Write a whole ring's worth of requests at once (wrap-around on the second).
            let size = front.ring.size();
            for round in 0..2u64 {
                w.guest
                    .write(DATA as usize + 2, 0, &page_of(0xc0 + round as u8));
                let writes: Vec<RawRequest> = (0..u64::from(size))
                    .map(|i| rw(OP_WRITE, 100 + i, 1000 + 8 * i, vec![whole(DATA + 2)]))
                    .collect();
                let responses = front.exchange(&writes).await;
                assert!(responses
                    .iter()
                    .all(|r| r.status == RSP_OKAY && r.operation == OP_WRITE));
                let mut ids: Vec<u64> = responses.iter().map(|r| r.id).collect();
                ids.sort_unstable();
                assert_eq!(ids, (100..100 + u64::from(size)).collect::<Vec<_>>());
                assert!(w
                    .image_bytes(1000, 8 * u64::from(size))
                    .iter()
                    .all(|b| *b == 0xc0 + round as u8));
            }
            w.ok(MessageType::XenblkifDisconnect, disconnect_body())
                .await;
            w.ok(MessageType::Close, Body::Empty).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_answer_as_the_c_tapdisk() {
    let w = world().await;
    let connect = |abi, order| Body::Blkif(blkif(abi, order));
    assert_eq!(
        w.errno(MessageType::XenblkifDisconnect, disconnect_body())
            .await,
        libc::ENODEV
    );
    let mut bad_order = blkif(Abi::Native, 0);
    bad_order.order = 4;
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, Body::Blkif(bad_order))
            .await,
        libc::EINVAL
    );
    let mut bad_proto = blkif(Abi::Native, 0);
    bad_proto.proto = 4;
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, Body::Blkif(bad_proto))
            .await,
        libc::EPROTONOSUPPORT
    );
    // A grant the guest never gave.
    let mut bad_gref = blkif(Abi::Native, 0);
    bad_gref.gref[0] = 100_000;
    let _port = w.platform.guest_port(DOMID, PORT);
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, Body::Blkif(bad_gref))
            .await,
        libc::EINVAL
    );
    // An unknown domain.
    let mut stranger = blkif(Abi::Native, 0);
    stranger.domid = 99;
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, Body::Blkif(stranger))
            .await,
        libc::ESRCH
    );
    let mut front = w.connect(Abi::X86_64, 1).await;
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, connect(Abi::X86_64, 1))
            .await,
        libc::EALREADY
    );
    // A stale statistics file of another ring makes its connect fail (EEXIST), as in C.
    std::fs::create_dir_all(w.shm.join("vbd3-7-51728")).unwrap();
    std::fs::write(w.shm.join("vbd3-7-51728/statistics"), b"").unwrap();
    let mut other = blkif(Abi::X86_64, 0);
    other.devid = 51728;
    other.gref[0] = 40;
    other.port = PORT + 1;
    let _other_port = w.platform.guest_port(DOMID, PORT + 1);
    assert_eq!(
        w.errno(MessageType::XenblkifConnect, Body::Blkif(other))
            .await,
        libc::EEXIST
    );
    assert!(
        !w.shm.join("td3-4242/vbd-7-51728").exists(),
        "no half-made files"
    );
    // The first ring still works; DISK_INFO answers from the cached geometry.
    let got = front
        .exchange(&[rw(OP_READ, 5, 0, vec![whole(DATA)])])
        .await;
    assert_eq!(got[0].status, RSP_OKAY);
    let info = w.send(MessageType::DiskInfo, Body::Empty).await;
    assert!(matches!(info.body, Body::Image(image) if image.sectors == IMAGE_SECTORS));
    // Statistics: the files exist, and tap-ctl stats shows the ring.
    assert!(w.shm.join("td3-4242/vbd-7-51712").exists());
    assert!(w.shm.join("vbd3-7-51712/statistics").exists());
    let text = w.stats_text().await;
    assert!(
        text.contains("\"xenbus\": { \"pool\": \"td-xenio-default\", \"domid\": 7, \"devid\": 51712, \"reqs\": [ 1, 1 ]"),
        "{text}"
    );
    let wrote = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let record = std::fs::read(w.shm.join("td3-4242/vbd-7-51712")).unwrap();
            // The task writes the records, then `io_ring`: wait for both.
            let ring_written = w.shm.join("vbd3-7-51712/io_ring").exists();
            if record[16..24] == 1u64.to_le_bytes()
                && record[32..40] == 8u64.to_le_bytes()
                && ring_written
            {
                break record;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        wrote.is_ok(),
        "the td3 record counts the read and io_ring is written"
    );
    // Disconnect removes the files; connecting again works.
    w.ok(MessageType::XenblkifDisconnect, disconnect_body())
        .await;
    assert!(!w.shm.join("td3-4242/vbd-7-51712").exists());
    assert!(!w.shm.join("vbd3-7-51712").exists());
    assert!(!w.stats_text().await.contains("xenbus"));
    unbound(&front.port).await;
    let _front = w.connect(Abi::X86_32, 0).await;
    w.ok(MessageType::Close, Body::Empty).await;
    assert!(!w.shm.join("vbd3-7-51712").exists(), "close disconnects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_requests_in_flight_completes_them_silently() {
    let w = world().await;
    let mut front = w.connect(Abi::Native, 0).await;
    w.ok(MessageType::Pause, Body::Empty).await;
    w.guest.write(DATA as usize, 0, &page_of(0x77));
    for i in 0..4 {
        front
            .ring
            .put_request(&rw(OP_WRITE, i, 8 * i, vec![whole(DATA)]));
    }
    front
        .ring
        .put_request(&rw(OP_READ, 9, 64, vec![whole(DATA + 1)]));
    front.ring.push_requests();
    front.port.notify();
    // Wait until the ring's task took them (they wait at the paused VBD's gate).
    tokio::time::timeout(Duration::from_secs(10), async {
        while !w.stats_text().await.contains("\"reqs\": [ 5, 0 ]") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(front.port.is_bound());
    w.ok(MessageType::XenblkifDisconnect, disconnect_body())
        .await;
    unbound(&front.port).await;
    let resume = Params::default();
    w.ok(MessageType::Resume, Body::Params(resume)).await;
    // CLOSE waits for the dead ring's requests; they complete without responses.
    w.ok(MessageType::Close, Body::Empty).await;
    assert!(
        front.ring.take_response().is_none(),
        "no response after disconnect"
    );
    assert!(
        w.image_bytes(0, 32).iter().all(|b| *b == 0x77),
        "the writes still happened"
    );
    let mut untouched = vec![0u8; PAGE_SIZE];
    w.guest.read(DATA as usize + 1, 0, &mut untouched);
    assert!(
        untouched.iter().all(|b| *b == 0),
        "no copy into the guest after disconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_barriers_discards_and_indirect_requests() {
    let w = world().await;
    let mut front = w.connect(Abi::X86_64, 2).await;
    w.guest.write(DATA as usize, 0, &page_of(0x3c));
    let requests = [
        rw(OP_WRITE, 1, 0, vec![whole(DATA)]),
        rw(OP_WRITE_BARRIER, 2, 8, vec![whole(DATA)]),
        rw(OP_READ, 3, 0, vec![whole(DATA + 1), whole(DATA + 2)]),
        rw(OP_FLUSH_DISKCACHE, 4, 0, vec![]),
        rw(OP_WRITE_BARRIER, 5, 0, vec![]),
        rw(OP_FLUSH_DISKCACHE, 6, 16, vec![whole(DATA)]),
    ];
    let mut responses = front.exchange(&requests).await;
    // The barrier orders: the write before it and the read after it see its data.
    responses.sort_by_key(|r| r.id);
    let ops: Vec<(u8, i16)> = responses.iter().map(|r| (r.operation, r.status)).collect();
    assert_eq!(
        ops,
        [
            (OP_WRITE, RSP_OKAY),
            (OP_WRITE_BARRIER, RSP_OKAY),
            (OP_READ, RSP_OKAY),
            (OP_FLUSH_DISKCACHE, RSP_OKAY),
            (OP_WRITE_BARRIER, RSP_OKAY),
            (OP_FLUSH_DISKCACHE, RSP_OKAY)
        ]
    );
    let mut read = vec![0u8; 2 * PAGE_SIZE];
    w.guest.read(DATA as usize + 1, 0, &mut read[..PAGE_SIZE]);
    w.guest.read(DATA as usize + 2, 0, &mut read[PAGE_SIZE..]);
    assert!(read.iter().all(|b| *b == 0x3c));
    assert!(w.image_bytes(16, 8).iter().all(|b| *b == 0x3c));
    // Discard: raw images punch holes that read back as zeros.
    let discard = RawRequest::Discard {
        flag: 0,
        handle: 0,
        id: 7,
        sector: 0,
        nr_sectors: 16,
    };
    assert_eq!(front.exchange(&[discard]).await[0].status, RSP_OKAY);
    assert!(w.image_bytes(0, 16).iter().all(|b| *b == 0));
    // An indirect write of 100 segments (one indirect page), then an indirect read back.
    let indirect_page = DATA + 10;
    let segments: Vec<Segment> = (0..100u32).map(|i| whole(DATA + 20 + i % 50)).collect();
    let mut table = vec![0u8; PAGE_SIZE];
    for (i, segment) in segments.iter().enumerate() {
        segment.encode(&mut table[i * 8..]);
    }
    w.guest.write(indirect_page as usize, 0, &table);
    for i in 0..50 {
        w.guest
            .write((DATA + 20 + i) as usize, 0, &page_of(i as u8 + 1));
    }
    let indirect = |indirect_op, id| RawRequest::Indirect {
        indirect_op,
        nr_segments: 100,
        id,
        sector: 2048,
        handle: 0,
        indirect_grefs: [indirect_page, 0, 0, 0, 0, 0, 0, 0],
    };
    let rsp = front.exchange(&[indirect(OP_WRITE, 8)]).await;
    assert_eq!(
        rsp,
        [Response {
            id: 8,
            operation: OP_WRITE,
            status: RSP_OKAY
        }]
    );
    for i in 0..100u64 {
        let want = (i % 50) as u8 + 1;
        assert!(
            w.image_bytes(2048 + 8 * i, 8).iter().all(|b| *b == want),
            "page {i}"
        );
    }
    // Over the advertised limit: an error response, and the ring lives on.
    let too_many = RawRequest::Indirect {
        indirect_op: OP_READ,
        nr_segments: 257,
        id: 9,
        sector: 0,
        handle: 0,
        indirect_grefs: [indirect_page; 8],
    };
    assert_eq!(front.exchange(&[too_many]).await[0].status, RSP_ERROR);
    let past_end = rw(OP_READ, 10, IMAGE_SECTORS - 4, vec![whole(DATA)]);
    assert_eq!(front.exchange(&[past_end]).await[0].status, RSP_ERROR);
    let discard_past_end = RawRequest::Discard {
        flag: 0,
        handle: 0,
        id: 11,
        sector: IMAGE_SECTORS,
        nr_sectors: 1,
    };
    let rsp = front.exchange(&[discard_past_end]).await;
    assert_eq!((rsp[0].operation, rsp[0].status), (OP_DISCARD, RSP_ERROR));
    assert!(w.stats_text().await.contains("\"map\": 3"));
    w.ok(MessageType::Close, Body::Empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_racing_ahead_stops_only_that_ring() {
    let w = world().await;
    let mut front = w.connect(Abi::Native, 0).await;
    front.ring.force_req_prod(1000);
    front.port.notify();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(front.ring.take_response().is_none());
    // The VBD and the daemon are fine: disconnect, connect again, serve.
    w.ok(MessageType::XenblkifDisconnect, disconnect_body())
        .await;
    unbound(&front.port).await;
    let mut front = w.connect(Abi::Native, 0).await;
    let got = front
        .exchange(&[rw(OP_READ, 1, 0, vec![whole(DATA)])])
        .await;
    assert_eq!(got[0].status, RSP_OKAY);
    w.ok(MessageType::Close, Body::Empty).await;
}

fn workload() -> impl Strategy<Value = Vec<(bool, u64, u8, u8)>> {
    prop::collection::vec((any::<bool>(), 0u64..256, 1u8..=11, any::<u8>()), 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Batches of writes and reads (each request up to 11 whole pages at a random sector)
    /// sent together, checked against a model of the image after each batch.
    #[test]
    fn random_batches_match_a_model(steps in workload(), abi_index in 0usize..3) {
        let abi = [Abi::Native, Abi::X86_32, Abi::X86_64][abi_index];
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let w = world().await;
            let mut model = std::fs::read(&w.image).unwrap();
            let mut front = w.connect(abi, 1).await;
            for (i, &(write, slot, pages, fill)) in steps.iter().enumerate() {
                let sector = slot * 24;
                let base = DATA + 11 * (i as u32 % 8);
                let segments: Vec<Segment> = (0..u32::from(pages)).map(|p| whole(base + p)).collect();
                if write {
                    for p in 0..u32::from(pages) {
                        w.guest.write((base + p) as usize, 0, &page_of(fill.wrapping_add(p as u8)));
                        let at = ((sector + 8 * u64::from(p)) * 512) as usize;
                        model[at..at + PAGE_SIZE].fill(fill.wrapping_add(p as u8));
                    }
                    let got = front.exchange(&[rw(OP_WRITE, i as u64, sector, segments)]).await;
                    assert_eq!(got[0].status, RSP_OKAY);
                } else {
                    let got = front.exchange(&[rw(OP_READ, i as u64, sector, segments)]).await;
                    assert_eq!(got[0].status, RSP_OKAY);
                    for p in 0..u32::from(pages) {
                        let mut page = vec![0u8; PAGE_SIZE];
                        w.guest.read((base + p) as usize, 0, &mut page);
                        let at = ((sector + 8 * u64::from(p)) * 512) as usize;
                        assert_eq!(&page[..], &model[at..at + PAGE_SIZE]);
                    }
                }
            }
            w.ok(MessageType::Close, Body::Empty).await;
            assert_eq!(std::fs::read(&w.image).unwrap(), model);
        });
    }
}
