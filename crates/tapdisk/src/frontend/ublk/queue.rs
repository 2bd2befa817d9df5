//! One ublk queue: the thread that fetches its requests from the driver, runs them through
//! the VBD, and commits the results.
//!
//! libublk runs every queue on its own thread with its own io_uring and a single-threaded
//! executor holding one task per tag. A tag's task waits for a request, then:
//! 1. finds the write data: with `UBLK_F_USER_COPY`, a plain `pread` of `/dev/ublkcN` at the
//!    tag's offset into a VBD buffer; in plain copy mode it is already in the tag's own
//!    buffer (the driver copied it there before delivering the request), which the VBD call
//!    gets as it is;
//! 2. runs the VBD call. By default ([`Bridge::Inline`]) its future is polled right here, on
//!    the queue thread, inside the runtime's context: a read the image serves at once (page
//!    cache, memory file system) completes within the first poll, without any thread
//!    hand-off; I/O that completes elsewhere (the blocking pool, the io_uring engine's
//!    reaper, a retry timer) wakes the task and kicks the queue thread. With
//!    `tuning.ublk_bridge = "spawn"` the call is spawned on the runtime instead and its result
//!    comes back through a oneshot channel;
//!    With user copy, a read of an image held in memory skips the VBD call's read: the
//!    `pwrite` below takes the data straight from the image's mapped pages
//!    ([`Vbd::read_mapped`]), one copy made by the kernel;
//! 3. delivers read data: a plain `pwrite` of `/dev/ublkcN` with user copy; in plain copy
//!    mode the read went straight into the tag's buffer, which the driver copies into the
//!    request's pages when the result is committed. Then it commits the result, which also
//!    fetches the tag's next request.
//!
//! The transfers on `/dev/ublkcN` are synchronous on purpose: the character device does not
//! support non-blocking I/O, so io_uring would hand every transfer to one of its worker
//! threads, two thread switches for a copy of a few KiB.
//!
//! The queue thread sleeps in `io_uring_enter` while it waits for the driver. A VBD call
//! finished on another thread must wake it, so each queue owns an eventfd that such
//! completions write to and that a listener task keeps a `POLL_ADD` armed on: the poll
//! completion ends the wait, and the executor then runs the tasks whose results arrived.
//!
//! Results: the byte count for reads and writes, 0 for flush, discard and write-zeroes (which
//! writes zeros itself where the image cannot zero fast), `-errno` on failure
//! (the VBD has already retried what was worth retrying), `-EOPNOTSUPP` for operations the
//! device does not advertise.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::sys;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

use super::chardev::borrow_char_device;
use super::config::Bridge;
use crate::driver::{ZeroFlags, SECTOR_SIZE};
use crate::engine::mapped::MappedBytes;
use crate::engine::uring::SubmitBatch;
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

/// What every queue of one device shares.
#[derive(Debug)]
pub struct QueueContext {
    /// The VBD all queues submit to.
    pub vbd: Arc<Vbd>,
    /// tapdisk's runtime, where VBD calls run.
    pub runtime: tokio::runtime::Handle,
    /// Data moves by `pread`/`pwrite` on `/dev/ublkcN` (`UBLK_F_USER_COPY`).
    pub user_copy: bool,
    /// Largest request in bytes (the size of each tag's buffer in plain copy mode).
    pub max_io_bytes: usize,
    /// The device id, for logs.
    pub minor: u16,
    /// How VBD calls reach the runtime.
    pub bridge: Bridge,
    /// CPUs queue threads move to once the device runs (libublk pins each to its queue's
    /// CPUs first); `None` keeps libublk's pinning.
    pub cpus: Option<rustix::thread::CpuSet>,
    /// Leave out of [`Self::cpus`] the CPUs libublk pinned the queue thread to (the queue's
    /// own, where its submitters run), unless nothing else is left.
    pub avoid_queue_cpus: bool,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Wakes a queue thread waiting in `io_uring_enter`.
///
/// Completions often arrive in bunches (an engine's reaper wakes every tag whose I/O it
/// found done): only the first of them since the queue thread last drained writes the
/// eventfd, the others see `kicked` set and know the queue thread will run their tags.
#[derive(Debug)]
struct Wakeup {
    eventfd: OwnedFd,
    /// The eventfd was written and the queue thread has not drained it yet.
    kicked: AtomicBool,
}

impl Wakeup {
    fn new() -> io::Result<Self> {
        let eventfd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Self {
            eventfd,
            kicked: AtomicBool::new(false),
        })
    }

    /// Makes the queue's armed poll complete (called after the task to run was woken).
    fn notify(&self) {
        if self.kicked.swap(true, Ordering::AcqRel) {
            return;
        }
        // EAGAIN only when the counter is saturated, which means a wake-up is pending anyway.
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }

    /// Resets the counter so the next poll waits again. Runs on the queue thread among its
    /// ready tasks, which it keeps running until none is left: a task woken before `kicked`
    /// is cleared (its kick skipped, or read away here) runs in this same round; one woken
    /// after writes the eventfd again.
    fn drain(&self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.eventfd, &mut counter);
        self.kicked.store(false, Ordering::Release);
    }
}

/// Keeps a `POLL_ADD` on the wake-up eventfd armed in the queue's ring.
async fn listen_for_wakeups(wakeup: Arc<Wakeup>, minor: u16) {
    loop {
        let poll = opcode::PollAdd::new(
            types::Fd(wakeup.eventfd.as_raw_fd()),
            u32::from(libc::POLLIN.unsigned_abs()),
        )
        .build();
        match ublk_submit_sqe_async(poll, UblkUringData::Target as u64).await {
            Ok(events) if events >= 0 => wakeup.drain(),
            Ok(error) if error == -libc::ECANCELED => return,
            Ok(error) => {
                tracing::warn!(minor, "ublk queue wake-up poll failed: {}", errno(-error));
                wakeup.drain();
            }
            Err(e) => {
                tracing::warn!(minor, "ublk queue wake-up poll not submitted: {e}");
                return;
            }
        }
    }
}

/// Wakes a tag's task and the queue thread (which may be sleeping in `io_uring_enter`).
struct KickingWaker {
    task: Waker,
    wakeup: Arc<Wakeup>,
}

impl Wake for KickingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.task.wake_by_ref();
        self.wakeup.notify();
    }
}

/// The waker a tag hands to the VBD calls it polls itself: made once per tag (the task's
/// waker never changes), not once per request.
#[derive(Default)]
struct TagWaker {
    /// The task's own waker and the kicking waker wrapping it.
    made: Option<(Waker, Waker)>,
}

impl TagWaker {
    /// The kicking waker for `task`.
    fn for_task(&mut self, task: &Waker, wakeup: &Arc<Wakeup>) -> &Waker {
        let made = match self.made.take() {
            Some((own, kicking)) if own.will_wake(task) => (own, kicking),
            _ => {
                let kicking = Waker::from(Arc::new(KickingWaker {
                    task: task.clone(),
                    wakeup: Arc::clone(wakeup),
                }));
                (task.clone(), kicking)
            }
        };
        &self.made.insert(made).1
    }
}

/// Polls `work` on this thread ([`Bridge::Inline`]); whoever completes its I/O elsewhere
/// wakes the queue thread too.
async fn poll_here<F: Future>(work: F, waker: &mut TagWaker, wakeup: &Arc<Wakeup>) -> F::Output {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        let kicking = waker.for_task(cx.waker(), wakeup);
        work.as_mut().poll(&mut Context::from_waker(kicking))
    })
    .await
}

impl QueueContext {
    /// Moves the calling queue thread to [`Self::cpus`], once (`moved` records it). Only
    /// called once a request arrived: libublk pins queue threads before it starts the
    /// device, and would otherwise undo this.
    fn spread_out(&self, moved: &Cell<bool>, qid: u16) {
        let Some(cpus) = &self.cpus else { return };
        if moved.replace(true) {
            return;
        }
        let target = if self.avoid_queue_cpus {
            rustix::thread::sched_getaffinity(None)
                .map_or(*cpus, |queue_cpus| cpus_other_than(cpus, &queue_cpus))
        } else {
            *cpus
        };
        if let Err(e) = rustix::thread::sched_setaffinity(None, &target) {
            tracing::warn!(
                minor = self.minor,
                qid,
                "ublk queue: CPU affinity not widened: {e}"
            );
        }
    }

    /// Runs a VBD call without blocking this thread or a tokio worker: polled right here
    /// inside the runtime's context ([`Bridge::Inline`]) or spawned as a tokio task
    /// ([`Bridge::Spawn`]).
    async fn call<T, F>(&self, waker: &mut TagWaker, wakeup: &Arc<Wakeup>, work: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = io::Result<T>> + Send + 'static,
    {
        if self.bridge == Bridge::Inline {
            // The queue thread entered the runtime's context once, in `serve_queue`.
            return poll_here(work, waker, wakeup).await;
        }
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let wakeup = Arc::clone(wakeup);
        self.runtime.spawn(async move {
            let result = work.await;
            let _ = sender.send(result);
            wakeup.notify();
        });
        // A dropped sender means the runtime is shutting down.
        receiver
            .await
            .unwrap_or_else(|_| Err(errno(libc::ESHUTDOWN)))
    }
}

/// The CPUs of `allowed` that are not in `queue_cpus`; all of `allowed` if none are left.
fn cpus_other_than(
    allowed: &rustix::thread::CpuSet,
    queue_cpus: &rustix::thread::CpuSet,
) -> rustix::thread::CpuSet {
    let mut others = *allowed;
    for cpu in 0..rustix::thread::CpuSet::MAX_CPU {
        if queue_cpus.is_set(cpu) {
            others.unset(cpu);
        }
    }
    if others.count() == 0 {
        *allowed
    } else {
        others
    }
}

/// Serves queue `qid` of `dev` until the device stops. Runs on the queue's own thread.
pub fn serve_queue(qid: u16, dev: &UblkDev, context: &Arc<QueueContext>) {
    let minor = context.minor;
    // VBD calls polled here use tokio's blocking pool, timers and I/O driver.
    let _runtime = context.runtime.enter();
    let wakeup = match Wakeup::new() {
        Ok(wakeup) => Arc::new(wakeup),
        Err(e) => {
            tracing::error!(minor, qid, "ublk queue: cannot create its eventfd: {e}");
            return;
        }
    };
    let device = if context.user_copy {
        match borrow_char_device(dev) {
            Some(device) => Some(device),
            None => {
                tracing::error!(minor, qid, "ublk queue: no character device for user copy");
                return;
            }
        }
    } else {
        None
    };
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(e) => {
            tracing::error!(minor, qid, "ublk queue: setup failed: {e}");
            return;
        }
    };
    if device.is_none() {
        // Plain copy: the tags' buffers are ours (see `TagData::Registered`), not libublk's,
        // so tell the device start, which waits for every queue's buffers, that they exist.
        dev.notify_buffer_registration_complete(false);
    }
    let executor = Rc::new(smol::LocalExecutor::new());
    let moved = Rc::new(Cell::new(false));
    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let queue = Rc::clone(&queue);
            let moved = Rc::clone(&moved);
            let context = Arc::clone(context);
            let wakeup = Arc::clone(&wakeup);
            let data = match device {
                Some(device) => TagData::UserCopy(UserCopyWindow {
                    device,
                    position: UblkIOCtx::ublk_user_copy_pos(qid, tag, 0),
                }),
                None => TagData::Registered(IoBuf::zeroed(context.max_io_bytes)),
            };
            executor.spawn(async move {
                match serve_tag(&queue, tag, data, &context, &wakeup, &moved).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!(minor, qid, tag, "ublk tag stopped: {e}"),
                }
            })
        })
        .collect();
    let listener = executor.spawn(listen_for_wakeups(Arc::clone(&wakeup), minor));
    let run = Rc::clone(&executor);
    smol::block_on(executor.run(async {
        // Every engine ring the tags' requests queued entries on is entered once per
        // round, as the driver's commands of the round are.
        let run_ready_tasks = || SubmitBatch::around(|| while run.try_tick() {});
        let all_done = || tasks.iter().all(smol::Task::is_finished);
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(20), run_ready_tasks, all_done).await
        {
            tracing::error!(minor, qid, "ublk queue: event loop failed: {e}");
        }
    }));
    drop(listener);
    tracing::debug!(minor, qid, "ublk queue stopped");
}

/// A request as the driver described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `UBLK_IO_OP_*`.
    pub op: u32,
    /// Forced unit access (write through).
    pub fua: bool,
    /// Write-zeroes must keep the range allocated (`UBLK_IO_F_NOUNMAP`).
    pub no_unmap: bool,
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
}

impl Request {
    /// Decodes an I/O descriptor.
    pub fn from_descriptor(iod: &sys::ublksrv_io_desc) -> Self {
        Self {
            op: iod.op_flags & 0xff,
            fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
            no_unmap: iod.op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
            sector: iod.start_sector,
            sectors: iod.nr_sectors,
        }
    }

    /// Data bytes of a read or write, checked against the largest request (`EINVAL` beyond).
    pub fn data_bytes(&self, max_io_bytes: usize) -> io::Result<usize> {
        let bytes = u64::from(self.sectors) * SECTOR_SIZE;
        usize::try_from(bytes)
            .ok()
            .filter(|bytes| *bytes <= max_io_bytes)
            .ok_or_else(|| errno(libc::EINVAL))
    }
}

/// The value committed for a finished request.
pub fn completion_value(outcome: &io::Result<usize>) -> i32 {
    match outcome {
        Ok(bytes) => i32::try_from(*bytes).unwrap_or(-libc::EOVERFLOW),
        Err(e) => -e
            .raw_os_error()
            .filter(|code| *code > 0)
            .unwrap_or(libc::EIO),
    }
}

/// Where one tag's request data is moved from and to.
enum TagData<'d> {
    /// Plain copy: a buffer that can hold the largest request, whose address the driver got
    /// with the tag's last fetch or commit. The driver copies a write's data into it before
    /// delivering the request, and a read's data out of it when the result is committed;
    /// VBD calls get the buffer itself, so a read lands where the driver takes it from.
    Registered(IoBuf),
    /// User copy: `pread`/`pwrite` on the character device at the tag's offset.
    UserCopy(UserCopyWindow<'d>),
}

impl TagData<'_> {
    /// The buffer descriptor sent with the tag's fetch and commit commands.
    fn descriptor(&self) -> BufDesc<'_> {
        match self {
            // The allocation stays alive (in `self`) until the next command names another,
            // and the driver only touches it while the tag's request is with the driver.
            Self::Registered(buffer) => BufDesc::RawAddress(buffer.as_slice().as_ptr()),
            Self::UserCopy(_) => BufDesc::Slice(&[]),
        }
    }
}

/// Plain copy: takes the tag's buffer out of `slot` for a VBD call, `bytes` long (the
/// request's write data, or room for its read).
fn lend(slot: &mut IoBuf, bytes: usize) -> io::Result<IoBuf> {
    if bytes > slot.capacity() {
        // `data_bytes` checked `bytes` against the largest request, the buffer's size.
        return Err(errno(libc::EINVAL));
    }
    let mut lent = std::mem::replace(slot, IoBuf::zeroed(0));
    let _ = lent.resize_within(bytes);
    Ok(lent)
}

/// Plain copy: puts `buffer` back into `slot` after a VBD call. Its first bytes are what the
/// driver copies into a read's request; it must also hold the next request, whatever its
/// size, so a smaller one (a driver may answer with a buffer of its own) is copied into a
/// fresh one.
fn give_back(slot: &mut IoBuf, mut buffer: IoBuf, max_io_bytes: usize) {
    if buffer.resize_within(max_io_bytes).is_none() {
        let mut large = IoBuf::zeroed(max_io_bytes);
        large.as_mut_slice()[..buffer.len()].copy_from_slice(buffer.as_slice());
        buffer = large;
    }
    *slot = buffer;
}

/// User copy: the tag's window in `/dev/ublkcN`, where `pread` gives a write's data and
/// `pwrite` fills a read's request.
#[derive(Clone, Copy)]
struct UserCopyWindow<'d> {
    device: BorrowedFd<'d>,
    position: u64,
}

impl UserCopyWindow<'_> {
    /// Fills `data` with the current request's write data.
    fn take_from_request(&self, data: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = self.position + done as u64;
            match rustix::io::pread(self.device, &mut data[done..], at) {
                Ok(0) => return Err(short_copy("read", done, data.len())),
                Ok(moved) => done += moved,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(copy_failed("read", self.position, e)),
            }
        }
        Ok(())
    }

    /// Puts `data` into the current request (the result of a read).
    fn give_to_request(&self, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = self.position + done as u64;
            match rustix::io::pwrite(self.device, &data[done..], at) {
                Ok(0) => return Err(short_copy("write", done, data.len())),
                Ok(moved) => done += moved,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(copy_failed("write", self.position, e)),
            }
        }
        Ok(())
    }
}

/// A user copy that moved fewer bytes than the request holds.
fn short_copy(what: &str, done: usize, len: usize) -> io::Error {
    tracing::error!("ublk user copy: {what} stopped after {done} of {len} bytes");
    errno(libc::EIO)
}

/// A user copy the driver refused (the request was aborted, or the offset is wrong).
fn copy_failed(what: &str, position: u64, error: impl Into<io::Error>) -> io::Error {
    let error = error.into();
    tracing::error!("ublk user copy: {what} at {position:#x} of the character device: {error}");
    error
}

/// One tag's loop: fetch a request, serve it, commit, repeat until the queue goes down.
async fn serve_tag(
    queue: &UblkQueue<'_>,
    tag: u16,
    mut data: TagData<'_>,
    context: &QueueContext,
    wakeup: &Arc<Wakeup>,
    moved: &Cell<bool>,
) -> Result<(), UblkError> {
    let mut tag_waker = TagWaker::default();
    // The last read's buffer, used again by the next read of the same size.
    let mut spare: Option<IoBuf> = None;
    queue
        .submit_io_prep_cmd(tag, data.descriptor(), 0, None)
        .await?;
    context.spread_out(moved, queue.get_qid());
    loop {
        let request = Request::from_descriptor(queue.get_iod(tag));
        let mut work = TagWork {
            data: &mut data,
            spare: &mut spare,
            waker: &mut tag_waker,
            context,
            wakeup,
        };
        let outcome = work.serve(request).await;
        let value = completion_value(&outcome);
        queue
            .submit_io_commit_cmd(tag, data.descriptor(), value)
            .await?;
    }
}

/// What serving one request of a tag uses.
struct TagWork<'a, 'd> {
    data: &'a mut TagData<'d>,
    spare: &'a mut Option<IoBuf>,
    waker: &'a mut TagWaker,
    context: &'a QueueContext,
    wakeup: &'a Arc<Wakeup>,
}

impl TagWork<'_, '_> {
    /// Serves one request; `Ok` carries the value to commit for a success.
    async fn serve(&mut self, request: Request) -> io::Result<usize> {
        let vbd = Arc::clone(&self.context.vbd);
        let sector = request.sector;
        match request.op {
            sys::UBLK_IO_OP_READ => {
                let bytes = request.data_bytes(self.context.max_io_bytes)?;
                match self.data {
                    TagData::Registered(_) => self.read_in_place(sector, bytes).await,
                    TagData::UserCopy(window) => {
                        let window = *window;
                        self.read_and_copy(window, sector, bytes).await
                    }
                }
                .map(|()| bytes)
            }
            sys::UBLK_IO_OP_WRITE => {
                let bytes = request.data_bytes(self.context.max_io_bytes)?;
                let buffer = Arc::new(match self.data {
                    TagData::Registered(slot) => lend(slot, bytes)?,
                    TagData::UserCopy(window) => {
                        let mut buffer = IoBuf::zeroed(bytes);
                        window.take_from_request(buffer.as_mut_slice())?;
                        buffer
                    }
                });
                let shared = Arc::clone(&buffer);
                let fua = request.fua;
                let work = async move {
                    vbd.write_shared(sector, shared).await?;
                    if fua {
                        vbd.flush().await?;
                    }
                    Ok(())
                };
                let outcome = self.context.call(self.waker, self.wakeup, work).await;
                if let TagData::Registered(slot) = self.data {
                    // The VBD has let go of the buffer unless a driver kept a reference.
                    let max = self.context.max_io_bytes;
                    let buffer = Arc::try_unwrap(buffer).unwrap_or_else(|_| IoBuf::zeroed(max));
                    give_back(slot, buffer, max);
                }
                outcome.map(|()| bytes)
            }
            sys::UBLK_IO_OP_FLUSH => {
                let work = async move { vbd.flush().await };
                self.context.call(self.waker, self.wakeup, work).await?;
                Ok(0)
            }
            sys::UBLK_IO_OP_DISCARD => {
                let count = u64::from(request.sectors);
                let work = async move { vbd.discard(sector, count).await };
                self.context.call(self.waker, self.wakeup, work).await?;
                Ok(0)
            }
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                let count = u64::from(request.sectors);
                let flags = ZeroFlags {
                    may_deallocate: !request.no_unmap,
                };
                let work = async move {
                    match vbd.write_zeroes(sector, count, flags).await {
                        // This range cannot be zeroed fast after all: write zeros.
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            vbd.fill_zeroes(sector, count).await
                        }
                        other => other,
                    }
                };
                self.context.call(self.waker, self.wakeup, work).await?;
                Ok(0)
            }
            _ => Err(errno(libc::EOPNOTSUPP)),
        }
    }

    /// Plain copy: reads into the tag's own buffer, which the driver copies the data from.
    async fn read_in_place(&mut self, sector: u64, bytes: usize) -> io::Result<()> {
        let TagData::Registered(slot) = &mut *self.data else {
            return Err(errno(libc::EINVAL));
        };
        let buffer = lend(slot, bytes)?;
        let vbd = Arc::clone(&self.context.vbd);
        let work = async move { vbd.read(sector, buffer).await };
        let outcome = self.context.call(self.waker, self.wakeup, work).await;
        let max = self.context.max_io_bytes;
        let (buffer, outcome) = match outcome {
            Ok(buffer) => (buffer, Ok(())),
            Err(e) => (IoBuf::zeroed(max), Err(e)),
        };
        if let TagData::Registered(slot) = &mut *self.data {
            give_back(slot, buffer, max);
        }
        outcome
    }

    /// User copy: reads into a buffer of this tag's, then writes it into the request.
    async fn read_and_copy(
        &mut self,
        window: UserCopyWindow<'_>,
        sector: u64,
        bytes: usize,
    ) -> io::Result<()> {
        // An image in memory: the kernel copies straight from its pages into the request.
        let deliver = |data: &MappedBytes| {
            data.write_all_at(window.device, window.position)
                .map_err(|e| copy_failed("write from the image's memory", window.position, e))
        };
        if let Some(outcome) = self.context.vbd.read_mapped(sector, bytes, deliver) {
            return outcome;
        }
        // Every byte of a read buffer is overwritten (the image chain zero-fills what no
        // image holds), so the previous read's buffer can be used again.
        let buffer = self
            .spare
            .take()
            .filter(|spare| spare.len() == bytes)
            .unwrap_or_else(|| IoBuf::zeroed(bytes));
        let vbd = Arc::clone(&self.context.vbd);
        let work = async move { vbd.read(sector, buffer).await };
        let data = self.context.call(self.waker, self.wakeup, work).await?;
        window.give_to_request(data.as_slice())?;
        *self.spare = Some(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode() {
        let iod = sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            nr_sectors: 8,
            start_sector: 1234,
            addr: 0,
        };
        let request = Request::from_descriptor(&iod);
        assert_eq!(
            request,
            Request {
                op: sys::UBLK_IO_OP_WRITE,
                fua: true,
                no_unmap: false,
                sector: 1234,
                sectors: 8
            }
        );
        let zeroes = Request::from_descriptor(&sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP,
            ..Default::default()
        });
        assert_eq!(zeroes.op, sys::UBLK_IO_OP_WRITE_ZEROES);
        assert!(zeroes.no_unmap && !zeroes.fua);
        assert_eq!(request.data_bytes(4096).unwrap(), 4096);
        assert_eq!(
            request.data_bytes(4095).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        let flush = Request::from_descriptor(&sys::ublksrv_io_desc {
            op_flags: sys::UBLK_IO_OP_FLUSH,
            ..Default::default()
        });
        assert!(!flush.fua);
        assert_eq!(flush.data_bytes(0).unwrap(), 0);
    }

    #[test]
    fn completion_values() {
        assert_eq!(completion_value(&Ok(4096)), 4096);
        assert_eq!(completion_value(&Ok(0)), 0);
        assert_eq!(completion_value(&Err(errno(libc::ENOSPC))), -libc::ENOSPC);
        assert_eq!(completion_value(&Err(io::Error::other("x"))), -libc::EIO);
        assert_eq!(completion_value(&Ok(usize::MAX)), -libc::EOVERFLOW);
    }

    #[test]
    fn wakeups_coalesce_and_drain() {
        let wakeup = Wakeup::new().unwrap();
        wakeup.notify();
        wakeup.notify();
        let mut counter = [0u8; 8];
        // One write for both: the second saw the first's kick still pending.
        assert_eq!(rustix::io::read(&wakeup.eventfd, &mut counter).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(counter), 1);
        wakeup.notify();
        assert_eq!(
            rustix::io::read(&wakeup.eventfd, &mut counter).unwrap_err(),
            rustix::io::Errno::AGAIN,
            "kicked again before the queue thread drained"
        );
        // Drained: reading again would block, and the next wake-up writes again.
        wakeup.drain();
        assert_eq!(
            rustix::io::read(&wakeup.eventfd, &mut counter).unwrap_err(),
            rustix::io::Errno::AGAIN
        );
        wakeup.notify();
        assert_eq!(rustix::io::read(&wakeup.eventfd, &mut counter).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(counter), 1);
    }

    #[test]
    fn user_copy_moves_data_at_the_tag_position() {
        let file = tempfile::tempfile().unwrap();
        let device = std::os::fd::AsFd::as_fd(&file);
        let window = UserCopyWindow {
            device,
            position: 8192,
        };
        let data = TagData::UserCopy(window);
        assert!(matches!(data.descriptor(), BufDesc::Slice(s) if s.is_empty()));
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        window.give_to_request(&pattern).unwrap();
        let mut on_disk = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 8192).unwrap();
        assert_eq!(on_disk, pattern);
        let mut back = vec![0u8; 4096];
        window.take_from_request(&mut back).unwrap();
        assert_eq!(back, pattern);
        // A request shorter than asked for (here: the end of the file) is an I/O error.
        let mut too_long = vec![0u8; 8192];
        let error = window.take_from_request(&mut too_long).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn plain_copy_lends_the_tag_buffer_and_keeps_its_address() {
        let max = 3 * 4096;
        let mut slot = IoBuf::zeroed(max);
        let address = slot.as_slice().as_ptr();
        let data = TagData::Registered(slot.clone());
        assert!(matches!(data.descriptor(), BufDesc::RawAddress(_)));
        // A request of one page: the VBD gets the tag's own memory, one page long.
        let mut lent = lend(&mut slot, 4096).unwrap();
        assert_eq!(lent.len(), 4096);
        assert_eq!(lent.as_slice().as_ptr(), address);
        lent.as_mut_slice().fill(0xa5);
        give_back(&mut slot, lent, max);
        assert_eq!(slot.len(), max);
        assert_eq!(slot.as_slice().as_ptr(), address);
        assert_eq!(&slot.as_slice()[..4096], &[0xa5; 4096]);
        // Larger than the buffer: refused, and the buffer stays.
        let error = lend(&mut slot, max + 4096).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(slot.as_slice().as_ptr(), address);
        // A driver answering with a smaller buffer of its own: its data moves into one
        // that holds the largest request.
        give_back(&mut slot, IoBuf::copy_from(&[7u8; 512]), max);
        assert_eq!(slot.len(), max);
        assert_eq!(&slot.as_slice()[..512], &[7u8; 512]);
    }

    /// Counts wake-ups of a task.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_tag_makes_its_kicking_waker_once() {
        let wakeup = Arc::new(Wakeup::new().unwrap());
        let counter = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&counter));
        let mut tag_waker = TagWaker::default();
        let first = tag_waker.for_task(&task, &wakeup).clone();
        let second = tag_waker.for_task(&task, &wakeup).clone();
        assert!(first.will_wake(&second), "the kicking waker was made again");
        // Waking it wakes the task and kicks the queue thread's eventfd.
        second.wake_by_ref();
        assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut value = [0u8; 8];
        assert_eq!(rustix::io::read(&wakeup.eventfd, &mut value).unwrap(), 8);
        // Another task gets its own.
        let other = Waker::from(Arc::new(CountingWaker(
            std::sync::atomic::AtomicUsize::new(0),
        )));
        let third = tag_waker.for_task(&other, &wakeup).clone();
        assert!(!third.will_wake(&second));
    }

    #[test]
    fn queue_threads_widen_their_affinity_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mine = rustix::thread::sched_getaffinity(None).unwrap();
        let context = QueueContext {
            vbd: Arc::new(Vbd::new(0)),
            runtime: runtime.handle().clone(),
            user_copy: true,
            max_io_bytes: 4096,
            minor: 0,
            bridge: Bridge::Inline,
            cpus: Some(mine),
            avoid_queue_cpus: false,
        };
        let moved = Cell::new(false);
        context.spread_out(&moved, 0);
        assert!(moved.get());
        assert_eq!(rustix::thread::sched_getaffinity(None).unwrap(), mine);
        let unpinned = QueueContext {
            cpus: None,
            ..context
        };
        let untouched = Cell::new(false);
        unpinned.spread_out(&untouched, 0);
        assert!(!untouched.get());
    }

    #[test]
    fn other_cpus_leave_out_the_queue_cpus_unless_none_remain() {
        use rustix::thread::CpuSet;
        let set = |cpus: &[usize]| {
            let mut set = CpuSet::new();
            cpus.iter().for_each(|cpu| set.set(*cpu));
            set
        };
        assert_eq!(
            cpus_other_than(&set(&[0, 1, 2, 3]), &set(&[1])),
            set(&[0, 2, 3])
        );
        assert_eq!(
            cpus_other_than(&set(&[0, 1]), &set(&[0, 1, 5])),
            set(&[0, 1])
        );
        assert_eq!(cpus_other_than(&set(&[2, 3]), &set(&[0])), set(&[2, 3]));
    }

    #[test]
    fn runtime_calls_complete_off_the_runtime() {
        runtime_calls_complete(Bridge::Spawn);
        runtime_calls_complete(Bridge::Inline);
    }

    fn runtime_calls_complete(bridge: Bridge) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let context = QueueContext {
            vbd: Arc::new(Vbd::new(0)),
            runtime: runtime.handle().clone(),
            user_copy: false,
            max_io_bytes: 4096,
            minor: 0,
            bridge,
            cpus: None,
            avoid_queue_cpus: false,
        };
        let wakeup = Arc::new(Wakeup::new().unwrap());
        // As on a queue thread: inside the runtime's context, driven by a foreign executor.
        let entered = runtime.enter();
        let value = smol::block_on(context.call(&mut TagWaker::default(), &wakeup, async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            Ok(7)
        }))
        .unwrap();
        assert_eq!(value, 7);
        // The queue thread was woken (the kick may trail the result by a moment).
        let mut counter = [0u8; 8];
        let kicked = (0..200).any(|_| {
            let read = rustix::io::read(&wakeup.eventfd, &mut counter).is_ok();
            if !read {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            read
        });
        assert!(kicked, "{bridge:?}: no wake-up");
        // A closed VBD answers ESHUTDOWN, as every frontend sees it.
        let vbd = Arc::clone(&context.vbd);
        let error = smol::block_on(context.call(&mut TagWaker::default(), &wakeup, async move {
            vbd.read(0, IoBuf::zeroed(512)).await
        }))
        .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ESHUTDOWN));
        // The blocking pool is reachable from here too (drivers use it).
        let value = smol::block_on(context.call(&mut TagWaker::default(), &wakeup, async {
            tokio::task::spawn_blocking(|| 5)
                .await
                .map_err(io::Error::other)
        }))
        .unwrap();
        assert_eq!(value, 5);
        drop(entered);
        runtime.shutdown_background();
    }
}
