//! The back end's ring and request checks against a simulated guest: every ABI and ring
//! order, index wrap-around, the notification rules, indirect descriptors, hostile
//! requests, and random request sequences against a model disk.

// Test arithmetic on small, known values.
#![allow(clippy::cast_possible_truncation)]

use blkif::abi::{
    Abi, RawRequest, Response, Segment, DISCARD_SECURE, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ,
    OP_WRITE, OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY,
};
use blkif::request::{Limits, Reason};
use blkif::ring::{BackRing, RingError};
use blkif::sim::{FrontRing, Grant, MemoryBackend, SimGuest};
use blkif::PAGE_SIZE;
use proptest::prelude::*;
use std::sync::Arc;

const DISK_SECTORS: u64 = 2048; // 1 MiB

/// A guest whose first `1 << order` pages are the ring, the rest data pages.
struct Setup {
    guest: Arc<SimGuest>,
    front: FrontRing,
    back: MemoryBackend,
}

fn setup(abi: Abi, order: u32, start: u32, limits: Limits) -> Setup {
    let ring_pages = 1usize << order;
    let guest = SimGuest::new(ring_pages + 64);
    let grefs: Vec<u32> = (0..ring_pages as u32).collect();
    let front = FrontRing::init_at(guest.map_ring(&grefs).unwrap(), abi, start);
    let back_ring = BackRing::attach(guest.map_ring(&grefs).unwrap(), abi).unwrap();
    let disk = vec![0u8; (limits.disk_sectors * 512) as usize];
    let back = MemoryBackend::new(back_ring, &guest, disk, limits);
    Setup { guest, front, back }
}

fn limits() -> Limits {
    Limits {
        disk_sectors: DISK_SECTORS,
        max_indirect_segments: 1024,
        discard: true,
    }
}

/// The first data page of the guest.
fn data_page(setup: &Setup) -> u32 {
    (setup.guest.pages() - 64) as u32
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

fn whole(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

/// Sends one request and returns its response.
fn exchange(setup: &mut Setup, request: &RawRequest) -> Response {
    setup.front.put_request(request);
    setup.front.push_requests();
    let (served, _) = setup.back.serve().unwrap();
    assert_eq!(served, 1);
    setup.front.take_response().expect("a response")
}

#[test]
fn every_abi_and_ring_order_moves_data() {
    for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
        for order in 0..=3 {
            let mut s = setup(abi, order, 0, limits());
            let page = data_page(&s);
            let pattern: Vec<u8> = (0..2 * PAGE_SIZE)
                .map(|i| (i * 7 + order as usize) as u8)
                .collect();
            s.guest.write(page as usize, 0, &pattern[..PAGE_SIZE]);
            s.guest.write(page as usize + 1, 0, &pattern[PAGE_SIZE..]);
            let write = rw(OP_WRITE, 1, 64, vec![whole(page), whole(page + 1)]);
            assert_eq!(
                exchange(&mut s, &write).status,
                RSP_OKAY,
                "{abi:?} order {order}"
            );
            assert_eq!(
                &s.back.disk[64 * 512..64 * 512 + 2 * PAGE_SIZE],
                &pattern[..]
            );
            let read = rw(OP_READ, 2, 64, vec![whole(page + 2), whole(page + 3)]);
            let rsp = exchange(&mut s, &read);
            assert_eq!(
                rsp,
                Response {
                    id: 2,
                    operation: OP_READ,
                    status: RSP_OKAY
                }
            );
            let mut back = vec![0u8; 2 * PAGE_SIZE];
            s.guest.read(page as usize + 2, 0, &mut back[..PAGE_SIZE]);
            s.guest.read(page as usize + 3, 0, &mut back[PAGE_SIZE..]);
            assert_eq!(back, pattern);
            assert_eq!(s.back.ring().size(), 32 << order);
        }
    }
}

#[test]
fn indices_wrap_around() {
    for start in [u32::MAX - 40, u32::MAX, 0x7fff_fff0] {
        let mut s = setup(Abi::X86_64, 0, start, limits());
        let page = data_page(&s);
        // Three ring's worth of requests, in batches that fill the ring.
        let mut id = 0;
        for _ in 0..6 {
            while s.front.free_slots() > 0 {
                s.front
                    .put_request(&rw(OP_READ, id, id % 100, vec![whole(page)]));
                id += 1;
            }
            s.front.push_requests();
            let (served, _) = s.back.serve().unwrap();
            assert_eq!(served, 32);
            for _ in 0..32 {
                assert_eq!(s.front.take_response().unwrap().status, RSP_OKAY);
            }
        }
        assert_eq!(id, 6 * 32);
        assert_eq!(s.back.ring().outstanding(), 0);
    }
}

#[test]
fn notifications_follow_the_event_indices() {
    let mut s = setup(Abi::Native, 0, 0, limits());
    let page = data_page(&s);
    // A fresh ring asks for a notification on the first request and the first response.
    s.front.put_request(&rw(OP_READ, 1, 0, vec![whole(page)]));
    assert!(s.front.push_requests());
    let (_, notify) = s.back.serve().unwrap();
    assert!(notify, "first response notifies (rsp_event = 1)");
    // The back end's final check asked for the next request: the front end notifies again.
    s.front.put_request(&rw(OP_READ, 2, 0, vec![whole(page)]));
    assert!(s.front.push_requests());
    // The front end has not re-armed rsp_event: no notification for this response.
    let (_, notify) = s.back.serve().unwrap();
    assert!(!notify);
    assert!(s.front.take_response().is_some());
    assert!(s.front.take_response().is_some());
    // Re-armed (final check on an empty ring): the next response notifies.
    assert!(!s.front.final_check_for_responses());
    s.front.put_request(&rw(OP_READ, 3, 0, vec![whole(page)]));
    s.front.push_requests();
    let (_, notify) = s.back.serve().unwrap();
    assert!(notify);
    // Requests pushed before the back end re-armed req_event need no notification...
    let mut quiet = setup(Abi::Native, 0, 0, limits());
    quiet
        .front
        .put_request(&rw(OP_READ, 1, 0, vec![whole(page)]));
    quiet
        .front
        .put_request(&rw(OP_READ, 2, 0, vec![whole(page)]));
    assert!(quiet.front.push_requests());
    quiet
        .front
        .put_request(&rw(OP_READ, 3, 0, vec![whole(page)]));
    assert!(
        !quiet.front.push_requests(),
        "req_event still 1: already notified"
    );
    // ...and the back end still finds them all.
    assert_eq!(quiet.back.serve().unwrap().0, 3);
}

#[test]
fn a_producer_racing_ahead_stops_the_ring() {
    let mut s = setup(Abi::X86_64, 0, 0, limits());
    s.front.force_req_prod(33);
    assert_eq!(
        s.back.serve().unwrap_err(),
        RingError::ProducerOverrun {
            req_prod: 33,
            rsp_prod: 0,
            size: 32
        }
    );
    // Exactly a full ring is fine (32 garbage requests, each answered).
    let mut full = setup(Abi::X86_64, 0, 0, limits());
    full.front.force_req_prod(32);
    assert_eq!(full.back.serve().unwrap().0, 32);
    // And attaching to a ring already overrun fails.
    let guest = SimGuest::new(1);
    let mut front = FrontRing::init(guest.map_ring(&[0]).unwrap(), Abi::Native);
    front.force_req_prod(1000);
    assert!(BackRing::attach(guest.map_ring(&[0]).unwrap(), Abi::Native).is_err());
}

#[test]
fn hostile_requests_get_error_responses_and_the_ring_lives_on() {
    let mut s = setup(
        Abi::X86_64,
        1,
        0,
        Limits {
            discard: false,
            ..limits()
        },
    );
    let page = data_page(&s);
    s.guest.set_grant(page + 1, Grant::None);
    s.guest.set_grant(page + 2, Grant::ReadOnly);
    let seg = |gref, first_sect, last_sect| Segment {
        gref,
        first_sect,
        last_sect,
    };
    let many: Vec<Segment> = (0..11).map(|_| whole(page)).collect();
    let cases: Vec<(RawRequest, i16)> = vec![
        (rw(OP_READ, 1, 0, vec![]), RSP_ERROR),
        (rw(OP_WRITE, 2, 0, vec![]), RSP_ERROR),
        (
            RawRequest::ReadWrite {
                operation: OP_READ,
                nr_segments: 12,
                handle: 0,
                id: 3,
                sector: 0,
                segments: many.clone(),
            },
            RSP_ERROR,
        ),
        (
            RawRequest::ReadWrite {
                operation: OP_WRITE,
                nr_segments: 255,
                handle: 0,
                id: 4,
                sector: 0,
                segments: many,
            },
            RSP_ERROR,
        ),
        (rw(OP_READ, 5, 0, vec![seg(page, 4, 3)]), RSP_ERROR),
        (rw(OP_READ, 6, 0, vec![seg(page, 0, 8)]), RSP_ERROR),
        (rw(OP_READ, 7, 0, vec![seg(page, 9, 200)]), RSP_ERROR),
        (
            rw(OP_READ, 8, DISK_SECTORS - 7, vec![whole(page)]),
            RSP_ERROR,
        ),
        (rw(OP_WRITE, 9, u64::MAX - 3, vec![whole(page)]), RSP_ERROR),
        (rw(OP_READ, 10, 0, vec![whole(page + 1)]), RSP_ERROR),
        (rw(OP_READ, 11, 0, vec![whole(page + 2)]), RSP_ERROR),
        (rw(OP_WRITE, 12, 0, vec![whole(u32::MAX)]), RSP_ERROR),
        (rw(OP_READ, 13, 0, vec![whole(1 << 20)]), RSP_ERROR),
        (
            RawRequest::Other {
                operation: 4,
                id: 14,
            },
            RSP_EOPNOTSUPP,
        ),
        (
            RawRequest::Other {
                operation: 200,
                id: 15,
            },
            RSP_EOPNOTSUPP,
        ),
        (
            RawRequest::Discard {
                flag: 0,
                handle: 0,
                id: 16,
                sector: 0,
                nr_sectors: 8,
            },
            RSP_EOPNOTSUPP,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_WRITE_BARRIER,
                nr_segments: 1,
                id: 17,
                sector: 0,
                handle: 0,
                indirect_grefs: [page; 8],
            },
            RSP_ERROR,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: 0,
                id: 18,
                sector: 0,
                handle: 0,
                indirect_grefs: [page; 8],
            },
            RSP_ERROR,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: 1025,
                id: 19,
                sector: 0,
                handle: 0,
                indirect_grefs: [page; 8],
            },
            RSP_ERROR,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: u16::MAX,
                id: 20,
                sector: 0,
                handle: 0,
                indirect_grefs: [page; 8],
            },
            RSP_ERROR,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: 4,
                id: 21,
                sector: 0,
                handle: 0,
                indirect_grefs: [page + 1, 0, 0, 0, 0, 0, 0, 0],
            },
            RSP_ERROR,
        ),
        (
            RawRequest::Indirect {
                indirect_op: OP_READ,
                nr_segments: 4,
                id: 22,
                sector: 0,
                handle: 0,
                indirect_grefs: [u32::MAX, 0, 0, 0, 0, 0, 0, 0],
            },
            RSP_ERROR,
        ),
    ];
    // The indirect page the last cases point at holds garbage segments (last_sect 0xff).
    s.guest.write(page as usize, 0, &[0xff; PAGE_SIZE]);
    for (request, status) in &cases {
        let rsp = exchange(&mut s, request);
        let (id, operation) = match request {
            RawRequest::ReadWrite { id, operation, .. } => (*id, *operation),
            RawRequest::Other { id, operation } => (*id, *operation),
            RawRequest::Discard { id, .. } => (*id, OP_DISCARD),
            RawRequest::Indirect {
                id, indirect_op, ..
            } => (*id, *indirect_op),
        };
        assert_eq!(
            rsp,
            Response {
                id,
                operation,
                status: *status
            },
            "{request:?}"
        );
    }
    // An indirect request whose page holds garbage segments.
    let garbage = RawRequest::Indirect {
        indirect_op: OP_READ,
        nr_segments: 3,
        id: 30,
        sector: 0,
        handle: 0,
        indirect_grefs: [page, 0, 0, 0, 0, 0, 0, 0],
    };
    assert_eq!(exchange(&mut s, &garbage).status, RSP_ERROR);
    assert!(matches!(
        s.back.rejected.last(),
        Some(Reason::BadSegment { index: 0, .. })
    ));
    // Raw garbage in a slot: an unknown operation byte.
    s.front.put_bytes(&[0x7f; 112]);
    s.front.push_requests();
    s.back.serve().unwrap();
    assert_eq!(s.front.take_response().unwrap().status, RSP_EOPNOTSUPP);
    // The ring still works, and nothing was written.
    assert!(s.back.disk.iter().all(|b| *b == 0));
    assert_eq!(
        exchange(&mut s, &rw(OP_READ, 99, 0, vec![whole(page + 3)])).status,
        RSP_OKAY
    );
}

#[test]
fn flushes_barriers_and_discards() {
    let mut s = setup(Abi::X86_32, 0, 0, limits());
    let page = data_page(&s);
    s.guest.write(page as usize, 0, &[0x5a; PAGE_SIZE]);
    let flush = rw(OP_FLUSH_DISKCACHE, 1, 0, vec![]);
    assert_eq!(
        exchange(&mut s, &flush),
        Response {
            id: 1,
            operation: OP_FLUSH_DISKCACHE,
            status: RSP_OKAY
        }
    );
    let barrier = rw(OP_WRITE_BARRIER, 2, 8, vec![whole(page)]);
    assert_eq!(exchange(&mut s, &barrier).operation, OP_WRITE_BARRIER);
    assert!(s.back.disk[8 * 512..16 * 512].iter().all(|b| *b == 0x5a));
    let flush_with_data = rw(OP_FLUSH_DISKCACHE, 3, 16, vec![whole(page)]);
    assert_eq!(exchange(&mut s, &flush_with_data).status, RSP_OKAY);
    assert!(s.back.disk[16 * 512..24 * 512].iter().all(|b| *b == 0x5a));
    let discard = RawRequest::Discard {
        flag: 0,
        handle: 0,
        id: 4,
        sector: 10,
        nr_sectors: 4,
    };
    assert_eq!(exchange(&mut s, &discard).status, RSP_OKAY);
    assert!(s.back.disk[10 * 512..14 * 512].iter().all(|b| *b == 0));
    assert!(s.back.disk[14 * 512..16 * 512].iter().all(|b| *b == 0x5a));
    let secure = RawRequest::Discard {
        flag: DISCARD_SECURE,
        handle: 0,
        id: 5,
        sector: 10,
        nr_sectors: 4,
    };
    assert_eq!(exchange(&mut s, &secure).status, RSP_EOPNOTSUPP);
    let past_end = RawRequest::Discard {
        flag: 0,
        handle: 0,
        id: 6,
        sector: DISK_SECTORS,
        nr_sectors: 1,
    };
    assert_eq!(exchange(&mut s, &past_end).status, RSP_ERROR);
}

#[test]
fn indirect_requests_span_several_pages() {
    for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
        let mut s = setup(abi, 0, 0, limits());
        let page = data_page(&s);
        // Two indirect pages (600 segments, alternating two data pages, 1 sector each).
        let (ind0, ind1, data0, data1) = (page, page + 1, page + 2, page + 3);
        let segments: Vec<Segment> = (0..600u32)
            .map(|i| Segment {
                gref: if i % 2 == 0 { data0 } else { data1 },
                first_sect: (i % 8) as u8,
                last_sect: (i % 8) as u8,
            })
            .collect();
        let mut table = vec![0u8; 2 * PAGE_SIZE];
        for (i, segment) in segments.iter().enumerate() {
            segment.encode(&mut table[i * 8..]);
        }
        s.guest.write(ind0 as usize, 0, &table[..PAGE_SIZE]);
        s.guest.write(ind1 as usize, 0, &table[PAGE_SIZE..]);
        let data0_bytes: Vec<u8> = (0..PAGE_SIZE).map(|i| (i / 512) as u8).collect();
        let data1_bytes: Vec<u8> = (0..PAGE_SIZE).map(|i| 0x80 | (i / 512) as u8).collect();
        s.guest.write(data0 as usize, 0, &data0_bytes);
        s.guest.write(data1 as usize, 0, &data1_bytes);
        let request = |indirect_op, id| RawRequest::Indirect {
            indirect_op,
            nr_segments: 600,
            id,
            sector: 100,
            handle: 0,
            indirect_grefs: [ind0, ind1, 0, 0, 0, 0, 0, 0],
        };
        let rsp = exchange(&mut s, &request(OP_WRITE, 7));
        assert_eq!(
            rsp,
            Response {
                id: 7,
                operation: OP_WRITE,
                status: RSP_OKAY
            },
            "{abi:?}"
        );
        for i in 0..600usize {
            let sector = &s.back.disk[(100 + i) * 512..(101 + i) * 512];
            let want = if i % 2 == 0 {
                (i % 8) as u8
            } else {
                0x80 | (i % 8) as u8
            };
            assert!(sector.iter().all(|b| *b == want), "sector {i}");
        }
        // Too many for the limit.
        let mut small = setup(
            abi,
            0,
            0,
            Limits {
                max_indirect_segments: 32,
                ..limits()
            },
        );
        let page = data_page(&small);
        let over = RawRequest::Indirect {
            indirect_op: OP_READ,
            nr_segments: 33,
            id: 1,
            sector: 0,
            handle: 0,
            indirect_grefs: [page; 8],
        };
        assert_eq!(exchange(&mut small, &over).status, RSP_ERROR);
    }
}

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Step {
    Write {
        sector: u64,
        segments: Vec<(u8, u8)>,
        fill: u8,
        indirect: bool,
    },
    Read {
        sector: u64,
        segments: Vec<(u8, u8)>,
        indirect: bool,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Flush,
}

fn segments() -> impl Strategy<Value = Vec<(u8, u8)>> {
    prop::collection::vec(
        (0u8..8).prop_flat_map(|first| (Just(first), first..8)),
        1..40,
    )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u64..DISK_SECTORS, segments(), any::<u8>(), any::<bool>()).prop_map(
            |(sector, segments, fill, indirect)| Step::Write {
                sector,
                segments,
                fill,
                indirect
            }
        ),
        (0u64..DISK_SECTORS, segments(), any::<bool>()).prop_map(|(sector, segments, indirect)| {
            Step::Read {
                sector,
                segments,
                indirect,
            }
        }),
        (0u64..DISK_SECTORS, 0u64..64)
            .prop_map(|(sector, sectors)| Step::Discard { sector, sectors }),
        Just(Step::Flush),
    ]
}

/// Where a random request's pages are: one data page per segment from `first`, and the
/// indirect page.
struct Pages {
    first: u32,
    indirect: u32,
}

/// Builds the request for `segments` (each on its own data page); long or `indirect` ones go
/// through the indirect page.
fn build(
    guest: &SimGuest,
    (operation, id, sector): (u8, u64, u64),
    segments: &[(u8, u8)],
    indirect: bool,
    pages: &Pages,
) -> RawRequest {
    let (first_page, indirect_page) = (pages.first, pages.indirect);
    let segs: Vec<Segment> = segments
        .iter()
        .enumerate()
        .map(|(i, &(first_sect, last_sect))| Segment {
            gref: first_page + i as u32,
            first_sect,
            last_sect,
        })
        .collect();
    if indirect || segs.len() > 11 {
        let mut table = vec![0u8; PAGE_SIZE];
        for (i, segment) in segs.iter().enumerate() {
            segment.encode(&mut table[i * 8..]);
        }
        guest.write(indirect_page as usize, 0, &table);
        RawRequest::Indirect {
            indirect_op: operation,
            nr_segments: segs.len() as u16,
            id,
            sector,
            handle: 0,
            indirect_grefs: [indirect_page, 0, 0, 0, 0, 0, 0, 0],
        }
    } else {
        rw(operation, id, sector, segs)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_workloads_match_a_model_disk(
        abi in prop_oneof![Just(Abi::Native), Just(Abi::X86_32), Just(Abi::X86_64)],
        order in 0u32..=3,
        steps in prop::collection::vec(step(), 1..30),
    ) {
        let mut s = setup(abi, order, 0, limits());
        let base = data_page(&s);
        let pages = Pages { first: base, indirect: base + 63 };
        let mut model = vec![0u8; (DISK_SECTORS * 512) as usize];
        for (id, step) in steps.iter().enumerate() {
            let id = id as u64;
            match step {
                Step::Write { sector, segments, fill, indirect } => {
                    let total: u64 = segments.iter().map(|(f, l)| u64::from(l - f) + 1).sum();
                    let mut offset = (*sector * 512) as usize;
                    for (i, &(first, last)) in segments.iter().enumerate() {
                        let page: Vec<u8> = (0..PAGE_SIZE).map(|b| fill.wrapping_add((b / 512) as u8).wrapping_add(i as u8)).collect();
                        s.guest.write((base + i as u32) as usize, 0, &page);
                        if sector + total <= DISK_SECTORS {
                            let bytes = &page[first as usize * 512..(last as usize + 1) * 512];
                            model[offset..offset + bytes.len()].copy_from_slice(bytes);
                            offset += bytes.len();
                        }
                    }
                    let request = build(&s.guest, (OP_WRITE, id, *sector), segments, *indirect, &pages);
                    let rsp = exchange(&mut s, &request);
                    let want = if sector + total <= DISK_SECTORS { RSP_OKAY } else { RSP_ERROR };
                    prop_assert_eq!(rsp.status, want);
                }
                Step::Read { sector, segments, indirect } => {
                    let total: u64 = segments.iter().map(|(f, l)| u64::from(l - f) + 1).sum();
                    let request = build(&s.guest, (OP_READ, id, *sector), segments, *indirect, &pages);
                    let rsp = exchange(&mut s, &request);
                    if sector + total > DISK_SECTORS {
                        prop_assert_eq!(rsp.status, RSP_ERROR);
                        continue;
                    }
                    prop_assert_eq!(rsp.status, RSP_OKAY);
                    let mut offset = (*sector * 512) as usize;
                    for (i, &(first, last)) in segments.iter().enumerate() {
                        let len = (usize::from(last - first) + 1) * 512;
                        let mut got = vec![0u8; len];
                        s.guest.read((base + i as u32) as usize, first as usize * 512, &mut got);
                        prop_assert_eq!(&got[..], &model[offset..offset + len]);
                        offset += len;
                    }
                }
                Step::Discard { sector, sectors } => {
                    let request = RawRequest::Discard { flag: 0, handle: 0, id, sector: *sector, nr_sectors: *sectors };
                    let rsp = exchange(&mut s, &request);
                    if sector + sectors <= DISK_SECTORS {
                        prop_assert_eq!(rsp.status, RSP_OKAY);
                        model[(*sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
                    } else {
                        prop_assert_eq!(rsp.status, RSP_ERROR);
                    }
                }
                Step::Flush => {
                    let rsp = exchange(&mut s, &rw(OP_FLUSH_DISKCACHE, id, 0, vec![]));
                    prop_assert_eq!(rsp.status, RSP_OKAY);
                }
            }
        }
        prop_assert_eq!(&s.back.disk, &model);
    }
}
