//! The io_uring engine: positioned reads, writes and `fdatasync` submitted to one io_uring per
//! open image, completed without a thread hand-off.
//!
//! How a request runs:
//! 1. the request's future takes the ring lock, queues one SQE and calls `io_uring_enter`; a
//!    buffered read that hits the page cache completes inside that call. Inside a
//!    [`SubmitBatch`] (a frontend's turn of its event loop: one poll of an NBD connection
//!    or of a blkif ring's task, one round of a ublk queue's ready tags) the entry is only queued, and the batch's end
//!    hands every entry its thread queued to the kernel with one `io_uring_enter` per ring;
//! 2. still under the lock, it reaps whatever completed (its own completion included) and
//!    wakes the owners of the others;
//! 3. completions that arrive later (device I/O, page-cache misses handled by the kernel's
//!    workers) signal an eventfd registered with the ring; a reaper task on the tokio reactor
//!    reaps them and wakes their futures.
//!
//! Buffers belong to the ring's slot table from submission until their completion has been
//! reaped, so a future dropped early (a cancelled request) never frees memory the kernel may
//! still write to; dropping the engine waits for every submitted operation first. Discard
//! and zeroing (rare, and often slow) run on the blocking pool through [`PreadEngine`].

use std::cell::RefCell;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;

use super::sync::PreadEngine;
use super::{pwrite_all, InlineReads, InlineWriteGate, IoEngine, IoFuture};
use crate::iobuf::IoBuf;

/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 256;

/// True when this kernel lets us create a ring that can read, write and fsync files.
pub fn supported() -> bool {
    let Ok(ring) = IoUring::new(8) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE]
        .iter()
        .all(|code| probe.is_supported(*code))
}

/// What a slot keeps alive while the kernel owns it.
enum Held {
    Nothing,
    Read(IoBuf),
    /// Never read: it only keeps the data alive while the kernel reads it.
    #[allow(dead_code)]
    Write(Arc<IoBuf>),
}

struct Slot {
    held: Held,
    result: Option<i32>,
    waker: Option<Waker>,
    /// The future went away: free the slot when the completion arrives.
    abandoned: bool,
    in_use: bool,
}

struct Ring {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Operations submitted and not yet reaped.
    submitted: usize,
    /// Owners to wake after a drain (kept to reuse its allocation).
    woken: Vec<Waker>,
}

impl Ring {
    /// Reaps completions, and keeps the eventfd armed exactly while operations are still in
    /// the kernel: completions found inline need no reaper wake-up.
    fn reap(&mut self) {
        loop {
            self.drain_completions();
            // Completions that found the completion queue full wait in the kernel's
            // overflow list and come back only with an `io_uring_enter` (nothing signals
            // the eventfd for them again): enter, then drain what it brought, for as long
            // as entering brings some.
            if self.ring.submission().cq_overflow()
                && self.enter().is_ok()
                && !self.ring.completion().is_empty()
            {
                continue;
            }
            let want_signal = self.submitted > 0;
            let completion = self.ring.completion();
            let signalled = !completion.eventfd_disabled();
            if want_signal == signalled {
                return;
            }
            if want_signal {
                completion.enable_eventfd();
                // A completion posted before the eventfd was armed sent no signal: look
                // again.
            } else {
                completion.disable_eventfd();
                return;
            }
        }
    }

    /// Moves every available completion into its slot and wakes its owner.
    fn drain_completions(&mut self) {
        let mut woken = std::mem::take(&mut self.woken);
        for cqe in self.ring.completion() {
            let Ok(index) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            self.submitted = self.submitted.saturating_sub(1);
            if slot.abandoned {
                slot.held = Held::Nothing;
                slot.abandoned = false;
                slot.in_use = false;
                self.free.push(index);
                continue;
            }
            slot.result = Some(cqe.result());
            if let Some(waker) = slot.waker.take() {
                woken.push(waker);
            }
        }
        for waker in woken.drain(..) {
            waker.wake();
        }
        self.woken = woken;
    }

    fn take_slot(&mut self) -> usize {
        if let Some(index) = self.free.pop() {
            return index;
        }
        self.slots.push(Slot {
            held: Held::Nothing,
            result: None,
            waker: None,
            abandoned: false,
            in_use: false,
        });
        self.slots.len() - 1
    }

    /// Queues `entry` (tagged with `index`) and, unless `defer`, tells the kernel.
    fn submit(&mut self, entry: squeue::Entry, defer: bool) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at is owned by its slot (`Held`) until the
            // completion is reaped: the heap memory of an `IoBuf` does not move when the
            // value moves, slots are only released after their completion, and dropping the
            // ring first waits for every submitted operation. The file descriptor belongs
            // to the engine, which outlives the ring (the ring holds its own reference to
            // the registered file, too).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Queue full: hand what is queued to the kernel and retry.
            self.enter()?;
        }
        self.submitted += 1;
        if defer {
            return Ok(());
        }
        self.enter()
    }

    /// Hands every queued entry to the kernel (the end of a [`SubmitBatch`]), then reaps.
    fn flush(&mut self) {
        // `io_uring_enter` may take fewer entries than queued (no memory for a request just
        // now): enter again until the queue is empty, as the entries' owners wait for them.
        let mut stalled = 0;
        while !self.ring.submission().is_empty() {
            let queued = self.ring.submission().len();
            if let Err(e) = self.enter() {
                tracing::warn!("io_uring: queued requests not submitted yet: {e}");
            }
            if self.ring.submission().len() >= queued {
                stalled += 1;
                if stalled > 1000 {
                    tracing::error!("io_uring: the kernel takes no more requests");
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.reap();
    }

    /// Hands the queued entries to the kernel. `EBUSY` means completions are waiting in
    /// the kernel's overflow list because nobody reaped the completion queue (the reaper
    /// task may not have run for a while): reap into the slots to make room, then enter
    /// again; each entry brings overflowed completions into the freed space.
    fn enter(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if self.ring.completion().is_empty() {
                        std::thread::yield_now();
                    }
                    self.drain_completions();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers of operations in flight: wait for them.
        while self.submitted > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let before = self.submitted;
            for _ in self.ring.completion() {
                self.submitted = self.submitted.saturating_sub(1);
            }
            if self.submitted == before {
                std::thread::yield_now();
            }
        }
    }
}

/// The entries of one thread's turn, handed to the kernel together.
///
/// While one is alive on a thread, the engine's operations started on that thread queue
/// their entries without `io_uring_enter`; when the outermost one is dropped, every ring
/// that got entries is entered once. The frontends open one around each turn of their
/// event loop, so that requests that arrived together reach the kernel together: one
/// system call for all of them instead of one each. A batch must not outlive the turn
/// (nothing may wait for an operation queued in it before it ends).
#[derive(Debug)]
#[must_use = "entries are submitted when the batch is dropped"]
pub struct SubmitBatch {
    /// Only the outermost batch of a thread submits.
    outermost: bool,
}

/// The current thread's open batch: the rings with entries waiting for its end.
#[derive(Default)]
struct ThreadBatch {
    open: bool,
    rings: Vec<Arc<Shared>>,
}

thread_local! {
    static BATCH: RefCell<ThreadBatch> = RefCell::default();
}

impl SubmitBatch {
    /// Opens a batch on this thread (or joins the one already open).
    pub fn begin() -> Self {
        let outermost = BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            !std::mem::replace(&mut batch.open, true)
        });
        Self { outermost }
    }

    /// Runs `turn` inside a batch.
    pub fn around<R>(turn: impl FnOnce() -> R) -> R {
        let _batch = Self::begin();
        turn()
    }

    /// `future` with each of its polls inside a batch: for a task whose every poll is a turn
    /// of its loop.
    pub fn each_poll<F: Future>(future: F) -> impl Future<Output = F::Output> {
        let mut future = Box::pin(future);
        std::future::poll_fn(move |cx| Self::around(|| future.as_mut().poll(cx)))
    }

    /// Whether a batch is open on this thread; if so, `shared` is entered at its end.
    fn defer(shared: &Arc<Shared>) -> bool {
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            if !batch.open {
                return false;
            }
            if !batch.rings.iter().any(|ring| Arc::ptr_eq(ring, shared)) {
                batch.rings.push(Arc::clone(shared));
            }
            true
        })
    }
}

impl Drop for SubmitBatch {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        // Taken out while the rings are entered: waking a completed operation's owner
        // must not find the batch borrowed.
        let mut rings = BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            batch.open = false;
            std::mem::take(&mut batch.rings)
        });
        for shared in rings.drain(..) {
            shared.lock().flush();
        }
        // Keep the allocation for the next turn.
        BATCH.with(|batch| {
            let mut batch = batch.borrow_mut();
            if batch.rings.is_empty() {
                batch.rings = rings;
            }
        });
    }
}

struct Shared {
    ring: Mutex<Ring>,
    /// Kept open for as long as the ring may reference it.
    file: Arc<File>,
    pending: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Positioned I/O on one file through io_uring.
pub struct UringEngine {
    shared: Arc<Shared>,
    /// Discard and zeroing.
    blocking: PreadEngine,
    reaper: tokio::task::AbortHandle,
    /// Buffered files: run writes inline, one at a time (see [`InlineWriteGate`]).
    inline_writes: Option<InlineWriteGate>,
    /// Buffered files: reads the page cache (or a memory filesystem) serves at once run on
    /// the calling thread (see [`InlineReads`]).
    inline_reads: InlineReads,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("pending", &self.pending())
            .finish()
    }
}

/// Creates a non-blocking eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UringEngine {
    /// An engine over `file`. Must run inside a tokio runtime (the reaper task is spawned
    /// on it). Fails when io_uring is unavailable.
    pub fn new(file: Arc<File>) -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let ring = IoUring::new(RING_ENTRIES)?;
        // The file is registered with the ring (entries name it as fixed file 0): the
        // kernel then looks it up once, not on every request.
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let notify = eventfd()?;
        ring.submitter().register_eventfd(notify.as_raw_fd())?;
        let notify = {
            let _context = runtime.enter();
            // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and owns the descriptor for
            // the `AsyncFd`'s whole life, so it stays open and unchanged until then.
            unsafe { AsyncFd::register_with_interest(notify, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?
        };
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                submitted: 0,
                woken: Vec::new(),
            }),
            file: Arc::clone(&file),
            pending: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let reaper = runtime
            .spawn(async move {
                loop {
                    let Ok(mut ready) = notify.readable().await else {
                        break;
                    };
                    // The counter is never read (a system call per wake-up saved): tokio
                    // watches the descriptor edge-triggered, and every signal the ring
                    // sends is a new edge, however high the counter stands. A signal that
                    // arrives between the wake-up and this clearing is not lost: tokio
                    // keeps readiness newer than the guard, and the reap below would
                    // find its completion anyway.
                    ready.clear_ready();
                    let Some(shared) = weak.upgrade() else {
                        break;
                    };
                    shared.lock().reap();
                }
            })
            .abort_handle();
        Ok(Self {
            shared,
            blocking: PreadEngine::shared(file),
            reaper,
            inline_writes: None,
            inline_reads: InlineReads::off(),
        })
    }

    /// Enables inline buffered writes (only for files opened without `O_DIRECT`).
    pub fn with_inline_writes(mut self, enabled: bool) -> Self {
        self.inline_writes = enabled.then(InlineWriteGate::default);
        self
    }

    /// Runs reads inline where they cannot wait for a device (see [`InlineReads`]);
    /// `buffered` when the file was opened without `O_DIRECT`.
    pub fn with_inline_reads(mut self, buffered: bool) -> Self {
        self.inline_reads = InlineReads::for_file(&self.shared.file, buffered);
        self
    }

    /// Submits one operation and waits for its result (a byte count or `-errno`).
    fn op(&self, entry: squeue::Entry, held: Held) -> Op {
        let defer = SubmitBatch::defer(&self.shared);
        let mut ring = self.shared.lock();
        let index = ring.take_slot();
        let slot = &mut ring.slots[index];
        slot.held = held;
        slot.result = None;
        slot.waker = None;
        slot.abandoned = false;
        slot.in_use = true;
        let entry = entry.user_data(index as u64);
        let state = match ring.submit(entry, defer) {
            Ok(()) => {
                self.shared.pending.fetch_add(1, Ordering::Relaxed);
                if !defer {
                    ring.reap();
                }
                OpState::Submitted(index)
            }
            Err(e) => {
                let slot = &mut ring.slots[index];
                let held = std::mem::replace(&mut slot.held, Held::Nothing);
                slot.in_use = false;
                ring.free.push(index);
                OpState::Failed(Some((e, held)))
            }
        };
        Op {
            shared: Arc::clone(&self.shared),
            state,
        }
    }

    /// The engine's file, as registered with its ring.
    fn fd(&self) -> types::Fixed {
        types::Fixed(0)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

enum OpState {
    Submitted(usize),
    Failed(Option<(io::Error, Held)>),
    Done,
}

/// One submitted operation: resolves to its raw result and the buffer it held.
struct Op {
    shared: Arc<Shared>,
    state: OpState,
}

impl Future for Op {
    type Output = (io::Result<u32>, Held);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let index = match &mut self.state {
            OpState::Submitted(index) => *index,
            OpState::Failed(failure) => {
                let (error, held) = failure
                    .take()
                    .unwrap_or_else(|| (io::Error::other("operation polled again"), Held::Nothing));
                self.state = OpState::Done;
                return Poll::Ready((Err(error), held));
            }
            OpState::Done => {
                return Poll::Ready((
                    Err(io::Error::other("operation polled again")),
                    Held::Nothing,
                ))
            }
        };
        let mut ring = self.shared.lock();
        if ring.slots[index].result.is_none() {
            ring.reap();
        }
        let slot = &mut ring.slots[index];
        let Some(result) = slot.result.take() else {
            match &slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        };
        let held = std::mem::replace(&mut slot.held, Held::Nothing);
        slot.in_use = false;
        slot.waker = None;
        ring.free.push(index);
        drop(ring);
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        self.state = OpState::Done;
        let result = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result.unsigned_abs())
        };
        Poll::Ready((result, held))
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpState::Submitted(index) = self.state {
            let mut ring = self.shared.lock();
            let slot = &mut ring.slots[index];
            if slot.result.is_some() {
                // Completed but never collected: release now.
                slot.held = Held::Nothing;
                slot.in_use = false;
                slot.result = None;
                ring.free.push(index);
            } else {
                slot.abandoned = true;
                slot.waker = None;
            }
            drop(ring);
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Largest single transfer handed to one SQE (page aligned, below 4 GiB).
const MAX_CHUNK: u32 = 0xFFFF_F000;

fn chunk_len(left: usize) -> u32 {
    u32::try_from(left).map_or(MAX_CHUNK, |len| len.min(MAX_CHUNK))
}

impl IoEngine for UringEngine {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        if let Some(result) =
            self.inline_reads
                .try_read(&self.shared.file, buf.as_mut_slice(), offset)
        {
            return Box::pin(std::future::ready(result.map(|()| buf)));
        }
        Box::pin(async move {
            let mut buf = buf;
            let mut done = 0usize;
            while done < buf.len() {
                let target = &mut buf.as_mut_slice()[done..];
                let entry =
                    opcode::Read::new(self.fd(), target.as_mut_ptr(), chunk_len(target.len()))
                        .offset(offset + done as u64)
                        .build();
                let (result, held) = self.op(entry, Held::Read(buf)).await;
                buf = match held {
                    Held::Read(buf) => buf,
                    _ => return Err(io::Error::other("io_uring read lost its buffer")),
                };
                match result {
                    Ok(0) => {
                        // End of file: the rest reads as zeros.
                        let len = buf.len();
                        buf.zero_range(done..len);
                        break;
                    }
                    Ok(n) => done += n as usize,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(buf)
        })
    }

    fn write_at(&self, buf: Arc<IoBuf>, offset: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if let Some(gate) = &self.inline_writes {
                let file = &self.shared.file;
                if let Some(result) = gate.try_run(|| pwrite_all(file, buf.as_slice(), offset)) {
                    return result;
                }
            }
            let mut done = 0usize;
            while done < buf.len() {
                let source = &buf.as_slice()[done..];
                let entry = opcode::Write::new(self.fd(), source.as_ptr(), chunk_len(source.len()))
                    .offset(offset + done as u64)
                    .build();
                let (result, _) = self.op(entry, Held::Write(Arc::clone(&buf))).await;
                match result {
                    Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                    Ok(n) => done += n as usize,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let entry = opcode::Fsync::new(self.fd())
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            self.op(entry, Held::Nothing).await.0.map(|_| ())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.blocking.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.blocking.zero_range(offset, len)
    }

    fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed) + self.blocking.pending()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn matches_the_pread_engine_and_survives_cancelled_requests() {
        if !supported() {
            eprintln!("skipped: io_uring unavailable");
            return;
        }
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(1 << 20).unwrap();
        let engine = UringEngine::new(Arc::clone(&file)).unwrap();
        let reference = PreadEngine::shared(Arc::clone(&file));
        let data = Arc::new(IoBuf::copy_from(&[0x3c; 65536]));
        engine.write_at(data, 8192).await.unwrap();
        engine.sync_data().await.unwrap();
        let ours = engine.read_at(IoBuf::zeroed(131072), 0).await.unwrap();
        let theirs = reference.read_at(IoBuf::zeroed(131072), 0).await.unwrap();
        assert_eq!(ours.as_slice(), theirs.as_slice());
        assert!(ours.as_slice()[8192..8192 + 65536]
            .iter()
            .all(|b| *b == 0x3c));
        // Past the end of the file: zeros.
        let tail = engine
            .read_at(IoBuf::zeroed(8192), (1 << 20) - 4096)
            .await
            .unwrap();
        assert!(tail.as_slice().iter().all(|b| *b == 0));
        // Many concurrent requests, half of them dropped before completion.
        let mut kept = Vec::new();
        for i in 0..64u64 {
            let future = engine.read_at(IoBuf::zeroed(4096), i * 4096);
            if i % 2 == 0 {
                kept.push(future);
            } else {
                // Polled once (submitted), then dropped whether or not it completed.
                let _ = tokio::time::timeout(std::time::Duration::ZERO, future).await;
            }
        }
        for future in kept {
            future.await.unwrap();
        }
        assert_eq!(engine.pending(), 0);
        drop(engine);
    }
}

/// Entries queued inside a [`SubmitBatch`] reach the kernel when it ends.
#[cfg(test)]
mod batch_tests {
    use super::*;

    fn queued(engine: &UringEngine) -> usize {
        engine.shared.lock().ring.submission().len()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_submits_its_entries_together_when_it_ends() {
        if !supported() {
            eprintln!("skipped: io_uring unavailable");
            return;
        }
        let file = Arc::new(tempfile::tempfile().unwrap());
        std::os::unix::fs::FileExt::write_all_at(&*file, &[0x77; 16384], 0).unwrap();
        let engine = UringEngine::new(file).unwrap();
        let waker = Waker::noop();
        let mut context = Context::from_waker(waker);
        let outer = SubmitBatch::begin();
        let inner = SubmitBatch::begin();
        let mut reads: Vec<_> = (0..4u64)
            .map(|i| engine.read_at(IoBuf::zeroed(4096), i * 4096))
            .collect();
        for read in &mut reads {
            assert!(read.as_mut().poll(&mut context).is_pending());
        }
        assert_eq!(queued(&engine), 4, "entered inside the batch");
        drop(inner);
        assert_eq!(queued(&engine), 4, "an inner batch submitted");
        drop(outer);
        assert_eq!(queued(&engine), 0, "the batch's end left entries queued");
        for read in reads {
            assert!(read.await.unwrap().as_slice().iter().all(|b| *b == 0x77));
        }
        // Outside a batch, every operation is entered at once.
        let mut read = engine.read_at(IoBuf::zeroed(4096), 0);
        let first = read.as_mut().poll(&mut context);
        assert_eq!(queued(&engine), 0);
        match first {
            // A page-cache hit completes inside the submitting call.
            Poll::Ready(result) => drop(result.unwrap()),
            Poll::Pending => drop(read.await.unwrap()),
        }
        // Inside one, without any operation: nothing to enter.
        SubmitBatch::around(|| ());
        assert_eq!(engine.pending(), 0);
    }
}

/// A ring whose completion queue overflows while its owner is not reaping.
#[cfg(test)]
mod overflow_tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::task::Waker;

    /// Polls `future` once with a waker that does nothing.
    fn poll_once<T>(future: &mut IoFuture<'_, T>) -> Poll<io::Result<T>> {
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn more_operations_in_flight_than_the_completion_queue_holds() {
        if !supported() {
            eprintln!("skipped: io_uring unavailable");
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _context = runtime.enter();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let blocks = 4096u64;
        std::fs::write(&path, vec![0x5au8; usize::try_from(blocks * 4096).unwrap()]).unwrap();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) => return eprintln!("skipped: no O_DIRECT here ({e})"),
        };
        file.sync_all().unwrap();
        let engine = UringEngine::new(Arc::new(file)).unwrap();
        // Every read is submitted, then the thread sleeps: nobody reaps (the reaper task
        // cannot run on this runtime's only thread), so completions pile up far beyond
        // the completion queue.
        let mut futures: Vec<IoFuture<'_, IoBuf>> = (0..blocks)
            .map(|i| engine.read_at(IoBuf::zeroed(4096), i * 4096))
            .collect();
        let mut done: Vec<Option<io::Result<IoBuf>>> = futures.iter().map(|_| None).collect();
        for (future, result) in futures.iter_mut().zip(&mut done) {
            if let Poll::Ready(r) = poll_once(future) {
                *result = Some(r);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        // More submissions while the completions are still unreaped.
        let mut more: Vec<IoFuture<'_, IoBuf>> = (0..blocks)
            .map(|i| engine.read_at(IoBuf::zeroed(4096), i * 4096))
            .collect();
        let mut more_done: Vec<Option<io::Result<IoBuf>>> = more.iter().map(|_| None).collect();
        runtime.block_on(async {
            std::future::poll_fn(|cx| {
                let mut pending = false;
                for (future, result) in futures
                    .iter_mut()
                    .zip(&mut done)
                    .chain(more.iter_mut().zip(&mut more_done))
                {
                    if result.is_none() {
                        match future.as_mut().poll(cx) {
                            Poll::Ready(r) => *result = Some(r),
                            Poll::Pending => pending = true,
                        }
                    }
                }
                if pending {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
        });
        for result in done.into_iter().chain(more_done) {
            let buf = result.unwrap().unwrap();
            assert!(buf.as_slice().iter().all(|b| *b == 0x5a));
        }
        assert_eq!(engine.pending(), 0);
    }
}
