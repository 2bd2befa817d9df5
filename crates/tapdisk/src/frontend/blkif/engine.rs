//! The task that serves one guest ring: intake, requests through the VBD, responses.
//!
//! One tokio task per ring owns the ring, its grant copier and its event channel, and polls
//! the ring's requests (VBD futures) itself, so the ring's state needs no lock:
//!
//! 1. intake: copy each published request out of the ring, check it (`blkif::request`),
//!    answer a bad one at once, copy a write's data from the guest (one batched grant copy)
//!    and start it on the [`Vbd`] (so pause, retry and counters apply as for every
//!    frontend); then `final_check_for_requests` before sleeping;
//! 2. completion: copy a read's data to the guest, write the response; once no other
//!    completion is ready, publish the responses and notify if the guest asked for it;
//! 3. ordering: a WRITE_BARRIER waits until every earlier request has completed, and no
//!    request is taken until it has completed (its data written and flushed).
//!    FLUSH_DISKCACHE flushes what completed before it (with data: written, then flushed).
//!
//! A disconnect ([`super::BlkifRing::disconnect`]) removes the statistics files, and the task
//! unbinds the event channel at once; requests still in flight complete silently (no copy,
//! no response), then the ring is unmapped and the task ends. A front end that breaks the ring
//! protocol (a producer index running ahead) gets no more requests taken; what it already
//! sent is still answered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkif::abi::{RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use blkif::grant;
use blkif::request::{parse, Action, Limits, Request};
use blkif::ring::{BackRing, Entry, RingError};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::platform::{EventChannel, Platform};
use super::stats::{RingCounters, SharedFiles};
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

/// How often the statistics files are rewritten (`io_ring` every fifth time).
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// A request's outcome: read data on success.
struct Completion {
    request: Request,
    started: Instant,
    result: io::Result<Option<IoBuf>>,
}

type Pending = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// Everything one ring's task owns.
pub struct RingTask<P: Platform> {
    pub(super) ring: BackRing<P::Memory>,
    pub(super) copier: P::Copier,
    pub(super) channel: Option<P::Channel>,
    pub(super) vbd: Arc<Vbd>,
    pub(super) limits: Limits,
    pub(super) counters: Arc<RingCounters>,
    /// Shared with the ring's handle, which removes them at disconnect.
    pub(super) files: SharedFiles,
    /// `xenvbd-<domid>-<devid>`, for logs.
    pub(super) name: String,
}

impl<P: Platform> std::fmt::Debug for RingTask<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingTask")
            .field("name", &self.name)
            .finish()
    }
}

/// Waits on the channel, or forever without one.
async fn signalled<C: EventChannel>(channel: Option<&mut C>) -> io::Result<()> {
    match channel {
        Some(channel) => channel.wait().await,
        None => std::future::pending().await,
    }
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Ordering state of the ring.
#[derive(Default)]
struct Barrier {
    /// A barrier taken and waiting for the requests before it.
    held: Option<(Request, Instant)>,
    /// A barrier started and not yet completed.
    running: bool,
}

impl<P: Platform> RingTask<P> {
    /// Serves the ring until it is disconnected and its last request completed.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut in_flight: FuturesUnordered<Pending> = FuturesUnordered::new();
        let mut barrier = Barrier::default();
        let mut alive = true;
        let mut broken = false;
        let mut ticks = 0u64;
        let mut timer = tokio::time::interval(STATS_INTERVAL);
        loop {
            if alive && !broken {
                if barrier.held.is_some() && in_flight.is_empty() {
                    if let Some((request, started)) = barrier.held.take() {
                        barrier.running = true;
                        self.start(request, started, &mut in_flight);
                    }
                }
                if barrier.held.is_none() && !barrier.running {
                    if let Err(e) = self.intake(&mut in_flight, &mut barrier) {
                        tracing::error!(
                            "{}: {e}; no more requests are taken from this ring",
                            self.name
                        );
                        broken = true;
                    }
                }
                self.publish();
                if barrier.held.is_some() && in_flight.is_empty() {
                    continue;
                }
            }
            if !alive && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    self.complete(done, alive, &mut barrier);
                    while let Some(Some(done)) = in_flight.next().now_or_never() {
                        self.complete(done, alive, &mut barrier);
                    }
                    if alive {
                        self.publish();
                    }
                }
                woke = signalled(self.channel.as_mut()), if alive && !broken => {
                    self.counters.kicks_in.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = woke {
                        tracing::error!("{}: event channel: {e}", self.name);
                        broken = true;
                    }
                }
                _ = stop.changed(), if alive => {
                    alive = false;
                    self.channel = None;
                    barrier.held = None;
                    tracing::info!("{}: disconnected with {} requests in flight", self.name, in_flight.len());
                }
                _ = timer.tick() => {
                    ticks += 1;
                    self.write_stats(ticks % 5 == 1);
                }
            }
        }
        tracing::info!("{}: ring released", self.name);
    }

    fn write_stats(&self, with_ring: bool) {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(files) = files.as_ref() else {
            return;
        };
        if let Err(e) = files.write(&self.counters) {
            tracing::warn!("{}: statistics: {e}", self.name);
        }
        if with_ring {
            if let Err(e) = files.write_io_ring(&self.ring.state()) {
                tracing::warn!("{}: io_ring: {e}", self.name);
            }
        }
    }

    /// Takes what the guest published; stops after a barrier.
    fn intake(
        &mut self,
        in_flight: &mut FuturesUnordered<Pending>,
        barrier: &mut Barrier,
    ) -> Result<(), RingError> {
        let mut entry: Entry = [0; blkif::abi::MAX_ENTRY_SIZE];
        loop {
            if !self.ring.take_request(&mut entry)? {
                if self.ring.final_check_for_requests()? {
                    continue;
                }
                return Ok(());
            }
            let started = Instant::now();
            self.counters.reqs_in.fetch_add(1, Ordering::Relaxed);
            match parse(self.ring.abi(), &entry, &self.limits, &mut self.copier) {
                Err(rejection) => {
                    tracing::debug!(
                        "{}: request {:#x} refused: {}",
                        self.name,
                        rejection.response.id,
                        rejection.reason
                    );
                    self.counters.errors_map.fetch_add(1, Ordering::Relaxed);
                    self.counters.reqs_out.fetch_add(1, Ordering::Relaxed);
                    self.ring.put_response(&rejection.response);
                }
                Ok(request) if request.barrier => {
                    if in_flight.is_empty() {
                        barrier.running = true;
                        self.start(request, started, in_flight);
                    } else {
                        barrier.held = Some((request, started));
                    }
                    return Ok(());
                }
                Ok(request) => self.start(request, started, in_flight),
            }
        }
    }

    /// Starts `request` on the VBD (a write's data is copied from the guest first).
    fn start(
        &mut self,
        request: Request,
        started: Instant,
        in_flight: &mut FuturesUnordered<Pending>,
    ) {
        let vbd = Arc::clone(&self.vbd);
        let counters = &self.counters;
        let work: Pin<Box<dyn Future<Output = io::Result<Option<IoBuf>>> + Send>> =
            match &request.action {
                Action::Read { sector, segments } => {
                    counters.read.taken(request.data_sectors());
                    let (sector, len) = (*sector, grant::total_bytes(segments));
                    Box::pin(async move { vbd.read(sector, IoBuf::zeroed(len)).await.map(Some) })
                }
                Action::Write {
                    sector,
                    segments,
                    flush,
                } => {
                    counters.write.taken(request.data_sectors());
                    let mut buf = IoBuf::zeroed(grant::total_bytes(segments));
                    match grant::gather(&mut self.copier, segments, buf.as_mut_slice()) {
                        Ok(true) => {}
                        outcome => {
                            tracing::debug!(
                                "{}: request {:#x}: copying its data failed ({outcome:?})",
                                self.name,
                                request.id
                            );
                            counters.errors_map.fetch_add(1, Ordering::Relaxed);
                            counters.reqs_out.fetch_add(1, Ordering::Relaxed);
                            self.ring.put_response(&request.response(RSP_ERROR));
                            return;
                        }
                    }
                    let (sector, flush) = (*sector, *flush);
                    Box::pin(async move {
                        vbd.write(sector, buf).await?;
                        if flush {
                            vbd.flush().await?;
                        }
                        Ok(None)
                    })
                }
                Action::Flush => {
                    counters.flushes.fetch_add(1, Ordering::Relaxed);
                    Box::pin(async move { vbd.flush().await.map(|()| None) })
                }
                Action::Discard { sector, sectors } => {
                    counters.discards.fetch_add(1, Ordering::Relaxed);
                    let (sector, sectors) = (*sector, *sectors);
                    Box::pin(async move {
                        if sectors > 0 {
                            vbd.discard(sector, sectors).await?;
                        }
                        Ok(None)
                    })
                }
            };
        in_flight.push(Box::pin(async move {
            Completion {
                request,
                started,
                result: work.await,
            }
        }));
    }

    /// Answers a completed request (silently counted once disconnected).
    fn complete(&mut self, done: Completion, alive: bool, barrier: &mut Barrier) {
        let Completion {
            request,
            started,
            result,
        } = done;
        if request.barrier {
            barrier.running = false;
        }
        self.counters.reqs_out.fetch_add(1, Ordering::Relaxed);
        if !alive {
            return;
        }
        let elapsed = micros(started);
        match &request.action {
            Action::Read { .. } => self.counters.read.completed(elapsed),
            Action::Write { .. } => self.counters.write.completed(elapsed),
            Action::Flush | Action::Discard { .. } => {}
        }
        let status = match result {
            Ok(Some(data)) => match &request.action {
                Action::Read { segments, .. } => {
                    match grant::scatter(&mut self.copier, segments, data.as_slice()) {
                        Ok(true) => RSP_OKAY,
                        outcome => {
                            tracing::debug!("{}: request {:#x}: copying its data to the guest failed ({outcome:?})", self.name, request.id);
                            self.counters.errors_map.fetch_add(1, Ordering::Relaxed);
                            RSP_ERROR
                        }
                    }
                }
                _ => RSP_OKAY,
            },
            Ok(None) => RSP_OKAY,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if matches!(
                    errno,
                    libc::ESHUTDOWN | libc::EPERM | libc::ENOSPC | libc::EINVAL
                ) {
                    self.counters.errors_vbd.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.errors_img.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!("{}: request {:#x} failed: {e}", self.name, request.id);
                if errno == libc::EOPNOTSUPP {
                    RSP_EOPNOTSUPP
                } else {
                    RSP_ERROR
                }
            }
        };
        self.ring.put_response(&request.response(status));
    }

    /// Publishes the responses written; notifies the guest if it asked.
    fn publish(&mut self) {
        if !self.ring.push_responses() {
            return;
        }
        self.counters.kicks_out.fetch_add(1, Ordering::Relaxed);
        if let Some(channel) = &self.channel {
            if let Err(e) = channel.notify() {
                tracing::warn!("{}: notify: {e}", self.name);
            }
        }
    }
}
