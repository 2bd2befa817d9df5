//! The back end's side of a shared ring (Xen `io/ring.h`), over any [`RingMemory`].
//!
//! The shared pages start with `u32 req_prod @0, req_event @4, rsp_prod @8, rsp_event @12`
//! and hold the entries from byte 64. Indices run freely over `u32`; the slot of index `i` is
//! `i & (size - 1)`. The front end produces requests (`req_prod`) and consumes responses;
//! the back end keeps its private `req_cons` and `rsp_prod_pvt`.
//!
//! The rules kept here:
//! * never trust `req_prod`: a front end that claims more requests than the ring can hold
//!   unanswered (`req_prod - rsp_prod_pvt > size`) is broken or hostile, and the ring is
//!   given up ([`RingError::ProducerOverrun`]);
//! * read `req_prod`, then a read barrier, then the entries; copy each entry out once (the
//!   guest may rewrite it at any time);
//! * take at most as many requests as there are free response slots;
//! * before sleeping, `final_check_for_requests`: set `req_event = req_cons + 1`, full
//!   barrier, look again (`RING_FINAL_CHECK_FOR_REQUESTS`);
//! * publish responses with a write barrier before `rsp_prod`, then a full barrier, and
//!   notify only if the front end asked for it: `(new - rsp_event) < (new - old)`
//!   (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).

use std::sync::atomic::{fence, Ordering};

use crate::abi::{Abi, Response, MAX_ENTRY_SIZE, MAX_RING_ORDER, RING_HEADER};
use crate::PAGE_SIZE;

/// Offset of `req_prod`.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = 12;

/// Memory shared with a guest: the ring pages.
///
/// Words are 4-byte aligned and accessed as single 32-bit loads and stores (the guest may
/// change them at any moment). Implementations must make a load observe what the other side
/// stored once the fences of [`BackRing`] order it.
pub trait RingMemory {
    /// Bytes of shared memory (whole pages).
    fn bytes(&self) -> usize;
    /// Loads the aligned word at `offset`.
    fn load(&self, offset: usize) -> u32;
    /// Stores the aligned word at `offset`.
    fn store(&self, offset: usize, value: u32);

    /// Copies `out.len()` bytes (a multiple of 4) at `offset` (aligned) out, word by word.
    fn read_words(&self, offset: usize, out: &mut [u8]) {
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&self.load(offset + 4 * i).to_le_bytes());
        }
    }

    /// Copies `bytes` (a multiple of 4) to `offset` (aligned), word by word.
    fn write_words(&self, offset: usize, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks_exact(4).enumerate() {
            let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.store(offset + 4 * i, word);
        }
    }
}

/// Why a ring cannot be used (any further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The mapping is not 1, 2, 4 or 8 whole pages.
    #[error("a ring of {bytes} bytes: must be 1, 2, 4 or 8 pages")]
    BadSize { bytes: usize },
    /// The front end published more requests than fit unanswered.
    #[error(
        "front end overran the ring: req_prod {req_prod}, rsp_prod {rsp_prod}, ring size {size}"
    )]
    ProducerOverrun {
        req_prod: u32,
        rsp_prod: u32,
        size: u32,
    },
}

/// The indices of a ring, for statistics (`io_ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingState {
    /// Entries.
    pub size: u32,
    /// Shared `req_prod`.
    pub req_prod: u32,
    /// Private `req_cons`.
    pub req_cons: u32,
    /// Shared `req_event`.
    pub req_event: u32,
    /// Shared `rsp_prod`.
    pub rsp_prod: u32,
    /// Private `rsp_prod_pvt`.
    pub rsp_prod_pvt: u32,
    /// Shared `rsp_event`.
    pub rsp_event: u32,
}

/// The back end of one ring.
#[derive(Debug)]
pub struct BackRing<M> {
    memory: M,
    abi: Abi,
    size: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

/// A request entry copied out of the ring.
pub type Entry = [u8; MAX_ENTRY_SIZE];

impl<M: RingMemory> BackRing<M> {
    /// Attaches to the ring in `memory`, resuming where its shared `rsp_prod` says (0 for a
    /// fresh ring; `BACK_RING_ATTACH`).
    pub fn attach(memory: M, abi: Abi) -> Result<Self, RingError> {
        let bytes = memory.bytes();
        let pages = bytes / PAGE_SIZE;
        if bytes % PAGE_SIZE != 0 || !pages.is_power_of_two() || pages > 1 << MAX_RING_ORDER {
            return Err(RingError::BadSize { bytes });
        }
        let size = abi.ring_size(pages);
        let rsp_prod = memory.load(RSP_PROD);
        let ring = Self {
            memory,
            abi,
            size,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
        };
        ring.check_producer(ring.memory.load(REQ_PROD))?;
        Ok(ring)
    }

    /// The ABI.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Requests taken and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// The shared memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    fn check_producer(&self, req_prod: u32) -> Result<(), RingError> {
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.size {
            return Err(RingError::ProducerOverrun {
                req_prod,
                rsp_prod: self.rsp_prod_pvt,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Requests published and not yet taken, at most the free response slots
    /// (`RING_HAS_UNCONSUMED_REQUESTS`, with the producer checked).
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let req_prod = self.memory.load(REQ_PROD);
        self.check_producer(req_prod)?;
        let published = req_prod.wrapping_sub(self.req_cons);
        let free = self.size - self.outstanding();
        Ok(published.min(free))
    }

    /// Copies the next request out of the ring into `entry` if one is published and a
    /// response slot is free; `Ok(false)` otherwise. The copy is what must be parsed: the
    /// guest may change the slot afterwards.
    pub fn take_request(&mut self, entry: &mut Entry) -> Result<bool, RingError> {
        if self.unconsumed()? == 0 {
            return Ok(false);
        }
        // The entries must not be read before the req_prod that published them.
        fence(Ordering::Acquire);
        let size = self.abi.entry_size();
        let slot = usize::try_from(self.req_cons & (self.size - 1)).unwrap_or(0);
        self.memory
            .read_words(RING_HEADER + slot * size, &mut entry[..size]);
        entry[size..].fill(0);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(true)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: true if requests are waiting; otherwise asks the
    /// front end for a notification on its next request and looks once more.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.memory.store(REQ_EVENT, self.req_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }

    /// Writes a response into the next response slot (not yet visible to the guest).
    ///
    /// # Panics
    /// If no request is outstanding (a response without a request is a bug of the caller).
    pub fn put_response(&mut self, response: &Response) {
        assert!(
            self.outstanding() > 0,
            "response without an outstanding request"
        );
        let size = self.abi.response_size();
        let mut bytes = [0u8; 16];
        response.encode(self.abi, &mut bytes);
        let slot = usize::try_from(self.rsp_prod_pvt & (self.size - 1)).unwrap_or(0);
        self.memory
            .write_words(RING_HEADER + slot * self.abi.entry_size(), &bytes[..size]);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses written so far;
    /// true if the front end must be notified.
    pub fn push_responses(&mut self) -> bool {
        let old = self.memory.load(RSP_PROD);
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        // Responses before the index that publishes them.
        fence(Ordering::Release);
        self.memory.store(RSP_PROD, new);
        // The index before reading rsp_event.
        fence(Ordering::SeqCst);
        let rsp_event = self.memory.load(RSP_EVENT);
        new.wrapping_sub(rsp_event) < new.wrapping_sub(old)
    }

    /// The indices, for statistics.
    pub fn state(&self) -> RingState {
        RingState {
            size: self.size,
            req_prod: self.memory.load(REQ_PROD),
            req_cons: self.req_cons,
            req_event: self.memory.load(REQ_EVENT),
            rsp_prod: self.memory.load(RSP_PROD),
            rsp_prod_pvt: self.rsp_prod_pvt,
            rsp_event: self.memory.load(RSP_EVENT),
        }
    }
}
