//! One ublk queue: the thread that fetches its requests from the driver, hands them to the
//! VBD on tapdisk's tokio runtime, and commits the results.
//!
//! libublk runs every queue on its own thread with its own io_uring and a single-threaded
//! executor holding one task per tag. A tag's task waits for a request, then:
//! 1. moves write data out of the request (`UBLK_F_USER_COPY`: a read of `/dev/ublkcN` at the
//!    tag's offset, queued on the queue's ring; plain copy: from the buffer registered for the
//!    tag) into a VBD buffer;
//! 2. spawns the VBD call on the tokio runtime and awaits its result through a oneshot channel
//!    (the queue thread never blocks a tokio worker, and tokio never blocks the queue thread);
//!    or, with `TAPDISK_UBLK_BRIDGE=inline`, polls the call right on the queue thread inside
//!    the runtime's context, with a waker that also wakes the queue thread;
//! 3. moves read data back into the request the same way, and commits the result, which also
//!    fetches the tag's next request.
//!
//! The queue thread sleeps in `io_uring_enter` while it waits for the driver. A finished VBD
//! call must wake it, so each queue owns an eventfd that completed calls write to and that a
//! listener task keeps a `POLL_ADD` armed on: the poll completion ends the wait, and the
//! executor then runs the tasks whose results arrived.
//!
//! Results: the byte count for reads and writes, 0 for flush and discard, `-errno` on failure
//! (the VBD has already retried what was worth retrying), `-EOPNOTSUPP` for operations the
//! device does not advertise.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::sys;
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};

use super::config::Bridge;
use crate::driver::SECTOR_SIZE;
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

/// What every queue of one device shares.
#[derive(Debug)]
pub struct QueueContext {
    /// The VBD all queues submit to.
    pub vbd: Arc<Vbd>,
    /// tapdisk's runtime, where VBD calls run.
    pub runtime: tokio::runtime::Handle,
    /// Data moves by `pread`/`pwrite`-style ring operations on `/dev/ublkcN`.
    pub user_copy: bool,
    /// Largest request in bytes (the size of each tag's buffer in plain copy mode).
    pub max_io_bytes: usize,
    /// The device id, for logs.
    pub minor: u16,
    /// How VBD calls reach the runtime.
    pub bridge: Bridge,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Wakes a queue thread waiting in `io_uring_enter`.
#[derive(Debug)]
struct Wakeup {
    eventfd: OwnedFd,
}

impl Wakeup {
    fn new() -> io::Result<Self> {
        let eventfd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        Ok(Self { eventfd })
    }

    /// Makes the queue's armed poll complete.
    fn notify(&self) {
        // EAGAIN only when the counter is saturated, which means a wake-up is pending anyway.
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }

    /// Resets the counter so the next poll waits again.
    fn drain(&self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.eventfd, &mut counter);
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

/// A VBD call polled on the queue thread ([`Bridge::Inline`]): whoever completes its I/O
/// (a blocking-pool thread, the io_uring reaper, the timer) wakes the queue thread too.
struct WakeThrough<T> {
    work: Pin<Box<dyn Future<Output = io::Result<T>> + Send>>,
    wakeup: Arc<Wakeup>,
}

impl<T> Future for WakeThrough<T> {
    type Output = io::Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let waker = Waker::from(Arc::new(KickingWaker {
            task: cx.waker().clone(),
            wakeup: Arc::clone(&self.wakeup),
        }));
        self.work.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

impl QueueContext {
    /// Runs `work` in the tokio runtime and waits for it without blocking this thread or a
    /// tokio worker: as a spawned task ([`Bridge::Spawn`]) or polled right here inside the
    /// runtime's context ([`Bridge::Inline`]).
    async fn on_runtime<T, F>(&self, wakeup: &Arc<Wakeup>, work: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = io::Result<T>> + Send + 'static,
    {
        if self.bridge == Bridge::Inline {
            // The queue thread entered the runtime's context once, in `serve_queue`.
            return WakeThrough {
                work: Box::pin(work),
                wakeup: Arc::clone(wakeup),
            }
            .await;
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

/// Serves queue `qid` of `dev` until the device stops. Runs on the queue's own thread.
pub fn serve_queue(qid: u16, dev: &UblkDev, context: &Arc<QueueContext>) {
    let minor = context.minor;
    // Inline VBD calls use tokio's blocking pool and timers from this thread.
    let _runtime = context.runtime.enter();
    let wakeup = match Wakeup::new() {
        Ok(wakeup) => Arc::new(wakeup),
        Err(e) => {
            tracing::error!(minor, qid, "ublk queue: cannot create its eventfd: {e}");
            return;
        }
    };
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(e) => {
            tracing::error!(minor, qid, "ublk queue: setup failed: {e}");
            return;
        }
    };
    let executor = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let queue = Rc::clone(&queue);
            let context = Arc::clone(context);
            let wakeup = Arc::clone(&wakeup);
            executor.spawn(async move {
                match serve_tag(&queue, tag, &context, &wakeup).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!(minor, qid, tag, "ublk tag stopped: {e}"),
                }
            })
        })
        .collect();
    let listener = executor.spawn(listen_for_wakeups(Arc::clone(&wakeup), minor));
    let run = Rc::clone(&executor);
    smol::block_on(executor.run(async {
        let run_ready_tasks = || while run.try_tick() {};
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

/// One tag's loop: fetch a request, serve it, commit, repeat until the queue goes down.
async fn serve_tag(
    queue: &UblkQueue<'_>,
    tag: u16,
    context: &QueueContext,
    wakeup: &Arc<Wakeup>,
) -> Result<(), UblkError> {
    let mut buffer =
        (!context.user_copy).then(|| libublk::helpers::IoBuf::<u8>::new(context.max_io_bytes));
    queue
        .submit_io_prep_cmd(tag, descriptor(buffer.as_ref()), 0, buffer.as_ref())
        .await?;
    loop {
        let request = Request::from_descriptor(queue.get_iod(tag));
        let outcome = serve_request(queue, tag, request, buffer.as_mut(), context, wakeup).await;
        let value = completion_value(&outcome);
        queue
            .submit_io_commit_cmd(tag, descriptor(buffer.as_ref()), value)
            .await?;
    }
}

/// The buffer descriptor of a tag: its registered buffer, or none with user copy.
fn descriptor(buffer: Option<&libublk::helpers::IoBuf<u8>>) -> BufDesc<'_> {
    match buffer {
        Some(buffer) => BufDesc::Slice(buffer.as_slice()),
        None => BufDesc::Slice(&[]),
    }
}

/// Copies between a request's pages and `data` with a ring operation on `/dev/ublkcN`
/// (registered as the ring's fixed file 0). `to_request` writes into the request (reads),
/// otherwise the request's data is read (writes).
async fn user_copy(
    queue: &UblkQueue<'_>,
    tag: u16,
    data: &mut IoBuf,
    to_request: bool,
) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| errno(libc::EINVAL))?;
    let position = UblkIOCtx::ublk_user_copy_pos(queue.get_qid(), tag, 0);
    let operation = if to_request {
        opcode::Write::new(types::Fixed(0), data.as_slice().as_ptr(), len)
            .offset(position)
            .build()
    } else {
        opcode::Read::new(types::Fixed(0), data.as_mut_slice().as_mut_ptr(), len)
            .offset(position)
            .build()
    };
    // The buffer stays borrowed until the completion arrives: this future is awaited to the
    // end (tag tasks are never cancelled while the queue runs).
    let done = ublk_submit_sqe_async(operation, UblkUringData::Target as u64)
        .await
        .map_err(|e| io::Error::other(format!("user copy not submitted: {e}")))?;
    match u32::try_from(done) {
        Ok(moved) if moved == len => Ok(()),
        Ok(_) => Err(errno(libc::EIO)),
        Err(_) => Err(errno(done.checked_neg().unwrap_or(libc::EIO))),
    }
}

/// Serves one request; `Ok` carries the value to commit for a success.
async fn serve_request(
    queue: &UblkQueue<'_>,
    tag: u16,
    request: Request,
    buffer: Option<&mut libublk::helpers::IoBuf<u8>>,
    context: &QueueContext,
    wakeup: &Arc<Wakeup>,
) -> io::Result<usize> {
    let vbd = Arc::clone(&context.vbd);
    let sector = request.sector;
    match request.op {
        sys::UBLK_IO_OP_READ => {
            let bytes = request.data_bytes(context.max_io_bytes)?;
            let mut data = context
                .on_runtime(wakeup, async move {
                    vbd.read(sector, IoBuf::zeroed(bytes)).await
                })
                .await?;
            match buffer {
                Some(buffer) => buffer.as_mut_slice()[..bytes].copy_from_slice(data.as_slice()),
                None => user_copy(queue, tag, &mut data, true).await?,
            }
            Ok(bytes)
        }
        sys::UBLK_IO_OP_WRITE => {
            let bytes = request.data_bytes(context.max_io_bytes)?;
            let mut data = IoBuf::zeroed(bytes);
            match buffer {
                Some(buffer) => data
                    .as_mut_slice()
                    .copy_from_slice(&buffer.as_slice()[..bytes]),
                None => user_copy(queue, tag, &mut data, false).await?,
            }
            let fua = request.fua;
            context
                .on_runtime(wakeup, async move {
                    vbd.write(sector, data).await?;
                    if fua {
                        vbd.flush().await?;
                    }
                    Ok(())
                })
                .await?;
            Ok(bytes)
        }
        sys::UBLK_IO_OP_FLUSH => {
            context
                .on_runtime(wakeup, async move { vbd.flush().await })
                .await?;
            Ok(0)
        }
        sys::UBLK_IO_OP_DISCARD => {
            let count = u64::from(request.sectors);
            context
                .on_runtime(wakeup, async move { vbd.discard(sector, count).await })
                .await?;
            Ok(0)
        }
        _ => Err(errno(libc::EOPNOTSUPP)),
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
                sector: 1234,
                sectors: 8
            }
        );
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
        assert_eq!(rustix::io::read(&wakeup.eventfd, &mut counter).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(counter), 2);
        // Drained: reading again would block.
        wakeup.drain();
        assert_eq!(
            rustix::io::read(&wakeup.eventfd, &mut counter).unwrap_err(),
            rustix::io::Errno::AGAIN
        );
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
        };
        let wakeup = Arc::new(Wakeup::new().unwrap());
        // As on a queue thread: inside the runtime's context, driven by a foreign executor.
        let entered = runtime.enter();
        let value = smol::block_on(context.on_runtime(&wakeup, async {
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
        let error = smol::block_on(context.on_runtime(&wakeup, async move {
            vbd.read(0, IoBuf::zeroed(512)).await
        }))
        .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ESHUTDOWN));
        // The blocking pool is reachable from here too (drivers use it).
        let value = smol::block_on(context.on_runtime(&wakeup, async {
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
