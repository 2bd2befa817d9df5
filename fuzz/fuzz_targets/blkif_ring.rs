//! Fuzzes the blkif back end's ring consumer and request checks: the input is a guest's
//! ring (header and entries, any indices), the contents of its data and indirect pages and
//! how they are granted. The reference back end (`blkif::sim::MemoryBackend`) serves the
//! ring over the simulated grant table. Whatever the guest wrote, serving must not panic,
//! must answer every request it took (or give the ring up), and must never touch memory the
//! guest did not grant.
#![no_main]

use blkif::abi::Abi;
use blkif::request::Limits;
use blkif::ring::{BackRing, RingMemory};
use blkif::sim::{Grant, MemoryBackend, SimGuest};
use blkif::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// Data pages after the ring pages (what segments and indirect grants may name).
const DATA_PAGES: usize = 6;
const DISK_SECTORS: u64 = 256;

fuzz_target!(|input: &[u8]| {
    let [config, grants, rest @ ..] = input else {
        return;
    };
    let abi = match config % 3 {
        0 => Abi::Native,
        1 => Abi::X86_32,
        _ => Abi::X86_64,
    };
    let order = (config >> 2) & 3;
    let ring_pages = 1usize << order;
    let guest = SimGuest::new(ring_pages + DATA_PAGES + 1);
    // The last page is never granted: a guard any stray copy would hit.
    guest.set_grant((ring_pages + DATA_PAGES) as u32, Grant::None);
    for page in 0..DATA_PAGES {
        let grant = match (grants >> page) & 1 | ((config >> 4) & 2) {
            0 | 2 => Grant::ReadWrite,
            1 => Grant::ReadOnly,
            _ => Grant::None,
        };
        guest.set_grant((ring_pages + page) as u32, grant);
    }
    // Ring pages first (header with its indices, then entries), then the data pages.
    let mut offset = 0;
    for chunk in rest.chunks(PAGE_SIZE).take(ring_pages + DATA_PAGES) {
        guest.write(offset / PAGE_SIZE, 0, chunk);
        offset += PAGE_SIZE;
    }
    let grefs: Vec<u32> = (0..ring_pages as u32).collect();
    let Ok(memory) = guest.map_ring(&grefs) else {
        return;
    };
    let Ok(ring) = BackRing::attach(memory, abi) else {
        return;
    };
    let limits = Limits {
        disk_sectors: DISK_SECTORS,
        max_indirect_segments: if config & 0x80 != 0 { 4096 } else { 32 },
        discard: config & 0x40 != 0,
    };
    let disk = vec![0xa5u8; (DISK_SECTORS * 512) as usize];
    let mut backend = MemoryBackend::new(ring, &guest, disk, limits);
    if let Ok((served, _)) = backend.serve() {
        let ring = backend.ring();
        assert!(served <= ring.size());
        assert_eq!(ring.outstanding(), 0, "every request taken was answered");
    }
    assert_eq!(backend.disk.len(), (DISK_SECTORS * 512) as usize);
    // The guard page was never written.
    let mut guard = vec![0u8; PAGE_SIZE];
    guest.read(ring_pages + DATA_PAGES, 0, &mut guard);
    assert!(guard.iter().all(|b| *b == 0));
    let _ = backend.ring().memory().bytes();
});
