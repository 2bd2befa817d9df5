//! A simulated guest for tests and fuzzing off Xen.
//!
//! [`SimGuest`] is a guest's memory: pages of atomic words (so a back end and a simulated
//! front end may touch them from different threads, as a real guest and dom0 do) and a grant
//! table in which grant reference `n` is page `n`, granted read-write, read-only or not at
//! all. It gives a back end what Xen gives dom0: the ring pages mapped ([`SimRing`], a
//! [`RingMemory`]) and grant copies ([`SimCopier`], a [`GrantCopy`]) that fail with the
//! hypervisor's status codes for bad references, read-only pages and copies past a page's
//! end. [`FrontRing`] is the front end's side of the ring, as `xen-blkfront` drives it, and
//! [`MemoryBackend`] a synchronous back end over a disk in memory (the reference model).

use std::sync::atomic::{fence, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use crate::abi::{Abi, RawRequest, Response, RING_HEADER, RSP_ERROR, RSP_OKAY};
use crate::grant::{
    self, FromGuest, GrantCopy, ToGuest, GNTST_BAD_COPY_ARG, GNTST_BAD_GNTREF, GNTST_OKAY,
    GNTST_PERMISSION_DENIED,
};
use crate::request::{parse, Action, Limits, Reason, Request};
use crate::ring::{
    BackRing, Entry, RingError, RingMemory, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD,
};
use crate::{PAGE_SIZE, SECTOR_SIZE};

const WORDS_PER_PAGE: usize = PAGE_SIZE / 4;

/// How a page is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Grant {
    /// Not granted: any use fails with `GNTST_bad_gntref`.
    None = 0,
    /// Granted read-only: the back end may copy from it only.
    ReadOnly = 1,
    /// Granted read-write.
    ReadWrite = 2,
}

/// A guest's memory and grant table.
#[derive(Debug)]
pub struct SimGuest {
    words: Box<[AtomicU32]>,
    grants: Box<[AtomicU8]>,
}

impl SimGuest {
    /// A guest of `pages` zeroed pages, every one granted read-write.
    pub fn new(pages: usize) -> Arc<Self> {
        Arc::new(Self {
            words: (0..pages * WORDS_PER_PAGE)
                .map(|_| AtomicU32::new(0))
                .collect(),
            grants: (0..pages)
                .map(|_| AtomicU8::new(Grant::ReadWrite as u8))
                .collect(),
        })
    }

    /// Pages of memory.
    pub fn pages(&self) -> usize {
        self.grants.len()
    }

    /// Changes how page `gref` is granted.
    pub fn set_grant(&self, gref: u32, grant: Grant) {
        if let Some(slot) = usize::try_from(gref).ok().and_then(|i| self.grants.get(i)) {
            slot.store(grant as u8, Ordering::SeqCst);
        }
    }

    fn grant(&self, gref: u32) -> Grant {
        match usize::try_from(gref)
            .ok()
            .and_then(|i| self.grants.get(i))
            .map(|g| g.load(Ordering::SeqCst))
        {
            Some(2) => Grant::ReadWrite,
            Some(1) => Grant::ReadOnly,
            _ => Grant::None,
        }
    }

    fn byte(&self, address: usize) -> u8 {
        let word = self.words[address / 4].load(Ordering::Relaxed);
        word.to_le_bytes()[address % 4]
    }

    fn set_byte(&self, address: usize, value: u8) {
        let shift = 8 * (address % 4);
        let mask = !(0xffu32 << shift);
        let word = &self.words[address / 4];
        // fetch_update never fails with a closure that always returns Some.
        let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some((w & mask) | (u32::from(value) << shift))
        });
    }

    /// The guest reads its own memory: `out.len()` bytes of page `page` at `offset`.
    ///
    /// # Panics
    /// If the range is outside the guest's memory.
    pub fn read(&self, page: usize, offset: usize, out: &mut [u8]) {
        let base = page * PAGE_SIZE + offset;
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.byte(base + i);
        }
    }

    /// The guest writes its own memory.
    ///
    /// # Panics
    /// If the range is outside the guest's memory.
    pub fn write(&self, page: usize, offset: usize, bytes: &[u8]) {
        let base = page * PAGE_SIZE + offset;
        for (i, byte) in bytes.iter().enumerate() {
            self.set_byte(base + i, *byte);
        }
    }

    /// Maps the ring pages `grefs` as dom0 would (each must be granted read-write).
    pub fn map_ring(self: &Arc<Self>, grefs: &[u32]) -> Result<SimRing, i16> {
        let mut pages = Vec::with_capacity(grefs.len());
        for &gref in grefs {
            if self.grant(gref) != Grant::ReadWrite {
                return Err(GNTST_BAD_GNTREF);
            }
            pages.push(usize::try_from(gref).map_err(|_| GNTST_BAD_GNTREF)?);
        }
        Ok(SimRing {
            guest: Arc::clone(self),
            pages,
        })
    }

    /// A grant copier into this guest's pages.
    pub fn copier(self: &Arc<Self>) -> SimCopier {
        SimCopier {
            guest: Arc::clone(self),
            copies: 0,
            calls: 0,
        }
    }

    /// The status a copy of `len` bytes at `offset` of grant `gref` gets.
    fn check_copy(&self, gref: u32, offset: u16, len: usize, write: bool) -> i16 {
        match self.grant(gref) {
            Grant::None => GNTST_BAD_GNTREF,
            _ if usize::from(offset) + len > PAGE_SIZE => GNTST_BAD_COPY_ARG,
            Grant::ReadOnly if write => GNTST_PERMISSION_DENIED,
            _ => GNTST_OKAY,
        }
    }
}

/// Ring pages of a [`SimGuest`], mapped.
#[derive(Debug, Clone)]
pub struct SimRing {
    guest: Arc<SimGuest>,
    pages: Vec<usize>,
}

impl SimRing {
    fn word(&self, offset: usize) -> &AtomicU32 {
        let page = self.pages[offset / PAGE_SIZE];
        &self.guest.words[page * WORDS_PER_PAGE + (offset % PAGE_SIZE) / 4]
    }
}

impl RingMemory for SimRing {
    fn bytes(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    fn load(&self, offset: usize) -> u32 {
        self.word(offset).load(Ordering::Relaxed)
    }

    fn store(&self, offset: usize, value: u32) {
        self.word(offset).store(value, Ordering::Relaxed);
    }
}

/// Grant copies into a [`SimGuest`], counting calls and copies (batching is observable).
#[derive(Debug)]
pub struct SimCopier {
    guest: Arc<SimGuest>,
    /// Copies done.
    pub copies: u64,
    /// Batched calls made.
    pub calls: u64,
}

impl GrantCopy for SimCopier {
    fn copy_from_guest(&mut self, copies: &mut [FromGuest<'_>]) -> std::io::Result<()> {
        self.calls += 1;
        for copy in copies {
            self.copies += 1;
            copy.status = self
                .guest
                .check_copy(copy.gref, copy.offset, copy.dest.len(), false);
            if copy.status == GNTST_OKAY {
                let page = usize::try_from(copy.gref).unwrap_or(usize::MAX);
                self.guest.read(page, usize::from(copy.offset), copy.dest);
            }
        }
        Ok(())
    }

    fn copy_to_guest(&mut self, copies: &mut [ToGuest<'_>]) -> std::io::Result<()> {
        self.calls += 1;
        for copy in copies {
            self.copies += 1;
            copy.status = self
                .guest
                .check_copy(copy.gref, copy.offset, copy.src.len(), true);
            if copy.status == GNTST_OKAY {
                let page = usize::try_from(copy.gref).unwrap_or(usize::MAX);
                self.guest.write(page, usize::from(copy.offset), copy.src);
            }
        }
        Ok(())
    }
}

/// The front end's side of a ring (`FRONT_RING_INIT` over a fresh `SHARED_RING_INIT`).
#[derive(Debug)]
pub struct FrontRing {
    ring: SimRing,
    abi: Abi,
    size: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// Initialises the shared ring in `ring` (indices 0, events 1) and attaches to it.
    pub fn init(ring: SimRing, abi: Abi) -> Self {
        Self::init_at(ring, abi, 0)
    }

    /// As [`FrontRing::init`], with every index starting at `start` (to test wrap-around).
    pub fn init_at(ring: SimRing, abi: Abi, start: u32) -> Self {
        for offset in (0..RING_HEADER).step_by(4) {
            ring.store(offset, 0);
        }
        ring.store(REQ_PROD, start);
        ring.store(RSP_PROD, start);
        ring.store(REQ_EVENT, start.wrapping_add(1));
        ring.store(RSP_EVENT, start.wrapping_add(1));
        let size = abi.ring_size(ring.bytes() / PAGE_SIZE);
        Self {
            ring,
            abi,
            size,
            req_prod_pvt: start,
            rsp_cons: start,
        }
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Slots free for new requests.
    pub fn free_slots(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Writes `entry` (raw bytes, at most one entry) into the next request slot.
    ///
    /// # Panics
    /// If the ring is full.
    pub fn put_bytes(&mut self, entry: &[u8]) {
        assert!(self.free_slots() > 0, "ring full");
        let size = self.abi.entry_size();
        let mut padded = vec![0u8; size];
        let n = entry.len().min(size);
        padded[..n].copy_from_slice(&entry[..n]);
        let slot = usize::try_from(self.req_prod_pvt & (self.size - 1)).unwrap_or(0);
        self.ring.write_words(RING_HEADER + slot * size, &padded);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Writes `request` into the next request slot (not yet published).
    pub fn put_request(&mut self, request: &RawRequest) {
        let mut entry = vec![0u8; self.abi.entry_size()];
        request.encode(self.abi, &mut entry);
        self.put_bytes(&entry);
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes; true if the back end must be
    /// notified.
    pub fn push_requests(&mut self) -> bool {
        let old = self.ring.load(REQ_PROD);
        let new = self.req_prod_pvt;
        fence(Ordering::Release);
        self.ring.store(REQ_PROD, new);
        fence(Ordering::SeqCst);
        let event = self.ring.load(REQ_EVENT);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Sets the shared `req_prod` to anything (a misbehaving front end).
    pub fn force_req_prod(&mut self, value: u32) {
        self.ring.store(REQ_PROD, value);
    }

    /// Takes the next published response.
    pub fn take_response(&mut self) -> Option<Response> {
        let rsp_prod = self.ring.load(RSP_PROD);
        if rsp_prod == self.rsp_cons {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::try_from(self.rsp_cons & (self.size - 1)).unwrap_or(0);
        let mut bytes = [0u8; 16];
        let len = self.abi.response_size();
        self.ring.read_words(
            RING_HEADER + slot * self.abi.entry_size(),
            &mut bytes[..len],
        );
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(Response::decode(&bytes))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: true if responses wait; otherwise asks for a
    /// notification on the next one and looks again.
    pub fn final_check_for_responses(&mut self) -> bool {
        if self.ring.load(RSP_PROD) != self.rsp_cons {
            return true;
        }
        self.ring.store(RSP_EVENT, self.rsp_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        self.ring.load(RSP_PROD) != self.rsp_cons
    }
}

/// A synchronous back end over a disk in memory: the reference that tests compare the real
/// one with, and what the fuzz target drives. Serves every request it can take, in order.
#[derive(Debug)]
pub struct MemoryBackend {
    ring: BackRing<SimRing>,
    copier: SimCopier,
    /// The disk (a whole number of sectors).
    pub disk: Vec<u8>,
    limits: Limits,
    /// Requests refused, with why.
    pub rejected: Vec<Reason>,
}

impl MemoryBackend {
    /// A back end on `ring` (already attached) for `guest`, serving `disk`.
    pub fn new(
        ring: BackRing<SimRing>,
        guest: &Arc<SimGuest>,
        disk: Vec<u8>,
        limits: Limits,
    ) -> Self {
        Self {
            ring,
            copier: guest.copier(),
            disk,
            limits,
            rejected: Vec::new(),
        }
    }

    /// The ring.
    pub fn ring(&self) -> &BackRing<SimRing> {
        &self.ring
    }

    /// Serves what is published (and then what a final check finds); returns the requests
    /// answered and whether the front end must be notified.
    pub fn serve(&mut self) -> Result<(u32, bool), RingError> {
        let mut entry: Entry = [0; crate::abi::MAX_ENTRY_SIZE];
        let mut served = 0;
        loop {
            while self.ring.take_request(&mut entry)? {
                let response = match parse(self.ring.abi(), &entry, &self.limits, &mut self.copier)
                {
                    Ok(request) => {
                        let status = self.execute(&request);
                        request.response(status)
                    }
                    Err(rejection) => {
                        self.rejected.push(rejection.reason);
                        rejection.response
                    }
                };
                self.ring.put_response(&response);
                served += 1;
            }
            if !self.ring.final_check_for_requests()? {
                break;
            }
        }
        Ok((served, self.ring.push_responses()))
    }

    fn range(sector: u64, bytes: usize) -> std::ops::Range<usize> {
        let start = usize::try_from(sector * SECTOR_SIZE).unwrap_or(usize::MAX);
        start..start + bytes
    }

    fn execute(&mut self, request: &Request) -> i16 {
        let ok = match &request.action {
            Action::Read { sector, segments } => {
                let bytes = grant::total_bytes(segments);
                let data = self.disk[Self::range(*sector, bytes)].to_vec();
                matches!(grant::scatter(&mut self.copier, segments, &data), Ok(true))
            }
            Action::Write {
                sector, segments, ..
            } => {
                let mut data = vec![0u8; grant::total_bytes(segments)];
                let copied = matches!(
                    grant::gather(&mut self.copier, segments, &mut data),
                    Ok(true)
                );
                if copied {
                    let range = Self::range(*sector, data.len());
                    self.disk[range].copy_from_slice(&data);
                }
                copied
            }
            Action::Flush => true,
            Action::Discard { sector, sectors } => {
                let bytes = usize::try_from(sectors * SECTOR_SIZE).unwrap_or(usize::MAX);
                self.disk[Self::range(*sector, bytes)].fill(0);
                true
            }
        };
        if ok {
            RSP_OKAY
        } else {
            RSP_ERROR
        }
    }
}
