//! Live commit of a qcow2 VBD's active layer into the bottom image of its chain, while the
//! guest runs (XCP-ng's `tap-ctl commit`, `query`, `cancel`: control messages 31-36).
//!
//! A commit job, like qemu's active commit that XCP-ng's tapdisk runs:
//! 1. opens the bottom image (the *base*) a second time, writable, as the leaf of a chain of
//!    its own (its own parents, if any, below it);
//! 2. installs a write observer on the VBD's chain, which marks every chunk the guest changes
//!    as dirty once the change completed;
//! 3. copies every range some image above the base holds (read through the VBD's chain, so
//!    the leaf's data wins) into the base, chunk by chunk; a chunk's dirty mark is cleared
//!    before it is read, so a guest write that lands meanwhile marks it again and it is
//!    copied again: no guest write is ever lost;
//! 4. once nothing is dirty the job is *ready* and keeps copying what the guest dirties;
//! 5. the next `query` completes it: holding its minor's turn (no pause, close or resume of
//!    the VBD runs meanwhile), intake stops and in-flight requests drain, the last dirty
//!    chunks are copied, the base is flushed, and the VBD switches to the base's chain (its
//!    `type:/path` becomes the base's). The images above the base are left as they were.
//!
//! Progress is in bytes: `total` is what the first scan found to copy plus what the guest
//! changed outside it or again after its copy (never below `current`, equal to it once
//! complete), `current` what was copied. Statuses use qemu's job status names. Differences from
//! XCP-ng: a job that failed is reported by the `query` that would say `concluded` as an
//! ERROR reply carrying the errno and the reason (so the storage manager never mistakes it for
//! a finished commit), and `cancel` also stops a job that is `ready`. Only the active layer
//! can be committed (`EOPNOTSUPP` for an image below it); as in XCP-ng, a VBD with a CBT
//! log is refused (`EOPNOTSUPP`).

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::driver::{Allocation, DiskType, OpenOptions, SECTOR_SIZE};
use crate::error::failure;
use crate::image::{shared_handles, ImageChain};
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

/// Sectors per dirty-tracking chunk (1 MiB).
const CHUNK_SECTORS: u64 = 2048;
/// Sectors asked for per block-status call while looking for data above the base.
const SCAN_SECTORS: u64 = 1 << 23;
/// How long a ready job sleeps when nothing wakes it.
const IDLE: Duration = Duration::from_millis(200);

/// Job statuses, named as qemu's (what `tap-ctl query` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Set up, not copying yet.
    Created,
    /// Copying.
    Running,
    /// Everything copied; mirroring guest writes until completed.
    Ready,
    /// Switching the VBD to the base.
    Pending,
    /// Being cancelled.
    Aborting,
    /// Finished (completed, cancelled or failed).
    Concluded,
}

impl JobStatus {
    /// qemu's name of the status.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Ready => "ready",
            Self::Pending => "pending",
            Self::Aborting => "aborting",
            Self::Concluded => "concluded",
        }
    }
}

/// A job's progress as `query` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Status.
    pub status: JobStatus,
    /// Bytes copied.
    pub current: u64,
    /// Bytes to copy, as known now.
    pub total: u64,
    /// Why the job failed: errno and explanation.
    pub error: Option<(i32, String)>,
}

#[derive(Debug)]
struct JobState {
    progress: Progress,
    complete: bool,
    cancel: bool,
}

/// What the progress figures hold of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Not counted in `total` yet.
    Unseen,
    /// Its bytes found by the first scan are counted in `total`.
    Counted,
    /// Copied at least once: a further copy adds to `total`.
    Copied,
}

/// Chunks changed by the guest since they were last copied.
#[derive(Debug)]
struct DirtyMap {
    bits: Mutex<Vec<u64>>,
    wake: Notify,
}

impl DirtyMap {
    fn new(sectors: u64) -> Self {
        let chunks = sectors.div_ceil(CHUNK_SECTORS);
        Self {
            bits: Mutex::new(vec![0; usize::try_from(chunks.div_ceil(64)).unwrap_or(0)]),
            wake: Notify::new(),
        }
    }

    fn bits(&self) -> MutexGuard<'_, Vec<u64>> {
        self.bits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mark(&self, sector: u64, count: u64) {
        let first = sector / CHUNK_SECTORS;
        let last = (sector + count.max(1) - 1) / CHUNK_SECTORS;
        {
            let mut bits = self.bits();
            for chunk in first..=last {
                if let Some(word) = usize::try_from(chunk / 64)
                    .ok()
                    .and_then(|i| bits.get_mut(i))
                {
                    *word |= 1 << (chunk % 64);
                }
            }
        }
        self.wake.notify_one();
    }

    /// Clears and returns the lowest dirty chunk.
    fn take(&self) -> Option<u64> {
        let mut bits = self.bits();
        let (index, word) = bits.iter_mut().enumerate().find(|(_, w)| **w != 0)?;
        let bit = u64::from(word.trailing_zeros());
        *word &= !(1 << bit);
        Some(index as u64 * 64 + bit)
    }
}

/// One commit job of one VBD.
#[derive(Debug)]
pub struct CommitJob {
    state: Mutex<JobState>,
    changes: watch::Sender<()>,
    dirty: Arc<DirtyMap>,
}

/// What a job works on, checked when it is created.
struct Setup {
    vbd: Arc<Vbd>,
    chain: Arc<ImageChain>,
    base_index: usize,
    base_params: String,
    options: OpenOptions,
    turn: Arc<tokio::sync::Mutex<()>>,
}

fn canonical(path: &Path) -> io::Result<std::path::PathBuf> {
    std::fs::canonicalize(path)
}

impl CommitJob {
    /// Checks that `top` can be committed on `vbd` and starts the job. `turn` is the control
    /// server's turn of the VBD's minor, taken while the VBD switches chains.
    pub fn start(
        vbd: Arc<Vbd>,
        top: &str,
        turn: Arc<tokio::sync::Mutex<()>>,
    ) -> io::Result<Arc<Self>> {
        let minor = vbd.minor();
        let chain = vbd.chain().ok_or_else(|| {
            failure(
                libc::EBADF,
                format!("minor {minor} has no open image (closed or paused)"),
            )
        })?;
        let images = chain.images();
        let leaf = &images[0];
        if leaf.driver.disk_type() != DiskType::Qcow2 {
            return Err(failure(
                libc::EOPNOTSUPP,
                format!(
                    "minor {minor} serves a {} image; only qcow2 images can be committed",
                    leaf.driver.disk_type().name()
                ),
            ));
        }
        if chain.log().is_some() {
            // As XCP-ng's tapdisk (its first image is then the log, not qcow2): the switch
            // to the base would also end the changed-block tracking.
            return Err(failure(
                libc::EOPNOTSUPP,
                format!(
                    "minor {minor} tracks changed blocks (a CBT log above the image); \
                     a commit would end the tracking"
                ),
            ));
        }
        // SM passes a plain path; a `type:` prefix is accepted too.
        let top_path = match top.split_once(':') {
            Some((kind, path)) if DiskType::from_name(kind).is_ok() => path,
            _ => top,
        };
        let wanted = canonical(Path::new(top_path))
            .map_err(|e| failure(libc::EINVAL, format!("{top_path}: {e}")))?;
        let index = images
            .iter()
            .position(|image| canonical(image.driver.path()).is_ok_and(|p| p == wanted))
            .ok_or_else(|| {
                failure(
                    libc::EINVAL,
                    format!("{top_path} is not an image of minor {minor}'s chain"),
                )
            })?;
        if index != 0 {
            return Err(failure(
                libc::EOPNOTSUPP,
                format!(
                    "{top_path} is below the active layer; only the active layer can be committed"
                ),
            ));
        }
        let base_index = images.len() - 1;
        if base_index == 0 {
            return Err(failure(
                libc::EINVAL,
                format!("{top_path} has no backing file to commit into"),
            ));
        }
        let base = &images[base_index];
        if base.driver.info().sectors != leaf.driver.info().sectors {
            return Err(failure(
                libc::EINVAL,
                format!(
                    "the base {} has {} sectors, the disk {}: committing would change its size",
                    base.driver.path().display(),
                    base.driver.info().sectors,
                    leaf.driver.info().sectors
                ),
            ));
        }
        let base_type = base.driver.disk_type();
        if shared_handles(base_type, base.driver.path()) > 1 {
            return Err(failure(
                libc::EBUSY,
                format!(
                    "the base {} is also used by another disk of this tapdisk",
                    base.driver.path().display()
                ),
            ));
        }
        let base_params = format!("{}:{}", base_type.name(), base.driver.path().display());
        let sectors = leaf.driver.info().sectors;
        let job = Arc::new(Self {
            state: Mutex::new(JobState {
                progress: Progress {
                    status: JobStatus::Created,
                    current: 0,
                    total: 0,
                    error: None,
                },
                complete: false,
                cancel: false,
            }),
            changes: watch::channel(()).0,
            dirty: Arc::new(DirtyMap::new(sectors)),
        });
        let setup = Setup {
            options: vbd.open_options(),
            vbd,
            chain,
            base_index,
            base_params,
            turn,
        };
        let runner = Arc::clone(&job);
        tokio::spawn(async move { runner.run(setup).await });
        tracing::info!(minor, top = top_path, "commit job started");
        Ok(job)
    }

    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_status(&self, status: JobStatus) {
        self.state().progress.status = status;
        self.changes.send_replace(());
    }

    /// The job's progress now.
    pub fn progress(&self) -> Progress {
        self.state().progress.clone()
    }

    /// Asks a ready job to complete (switch the VBD to the base); `query` does this.
    pub fn request_complete(&self) {
        self.state().complete = true;
        self.dirty.wake.notify_one();
    }

    /// Cancels the job unless it is completing or finished; with `wait`, returns once it has
    /// stopped.
    pub async fn cancel(&self, wait: bool) {
        {
            let mut state = self.state();
            if matches!(
                state.progress.status,
                JobStatus::Created | JobStatus::Running | JobStatus::Ready
            ) {
                state.cancel = true;
            }
        }
        self.dirty.wake.notify_one();
        if wait {
            let mut changes = self.changes.subscribe();
            while self.progress().status != JobStatus::Concluded {
                let _ = changes.changed().await;
            }
        }
    }

    /// Waits until the job has concluded.
    pub async fn finished(&self) {
        let mut changes = self.changes.subscribe();
        while self.progress().status != JobStatus::Concluded {
            let _ = changes.changed().await;
        }
    }

    async fn run(self: Arc<Self>, setup: Setup) {
        let minor = setup.vbd.minor();
        let result = self.copy(&setup).await;
        setup.chain.observe_writes(None);
        {
            let mut state = self.state();
            if let Err(e) = &result {
                let errno = crate::error::errno_of(e);
                let message = format!("commit of minor {minor} failed: {e}");
                tracing::error!("{message}");
                state.progress.error = Some((errno, message));
            } else {
                tracing::info!(minor, "commit job concluded");
            }
            state.progress.status = JobStatus::Concluded;
        }
        self.changes.send_replace(());
    }

    fn cancelled(&self) -> io::Result<()> {
        if self.state().cancel {
            self.set_status(JobStatus::Aborting);
            return Err(failure(libc::ECANCELED, "cancelled"));
        }
        Ok(())
    }

    async fn copy(&self, setup: &Setup) -> io::Result<()> {
        let options = OpenOptions {
            read_only: false,
            shareable: false,
            ..setup.options.clone()
        };
        let params = setup.base_params.clone();
        let target = tokio::task::spawn_blocking(move || ImageChain::open(&params, options))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        let dirty = Arc::clone(&self.dirty);
        setup
            .chain
            .observe_writes(Some(Arc::new(move |sector, count| {
                dirty.mark(sector, count)
            })));
        self.set_status(JobStatus::Running);
        // Everything some image above the base holds is to be copied.
        let sectors = setup.chain.info().sectors;
        let chunks = sectors.div_ceil(CHUNK_SECTORS);
        let mut copied = vec![Chunk::Unseen; usize::try_from(chunks).unwrap_or(0)];
        let mut total = 0;
        let mut at = 0;
        while at < sectors {
            let count = SCAN_SECTORS.min(sectors - at);
            for range in allocated_above(&setup.chain, setup.base_index, at, count).await? {
                total += (range.end - range.start) * SECTOR_SIZE;
                self.dirty.mark(range.start, range.end - range.start);
                let chunks = range.start / CHUNK_SECTORS..=(range.end - 1) / CHUNK_SECTORS;
                for chunk in chunks {
                    if let Some(state) = usize::try_from(chunk).ok().and_then(|i| copied.get_mut(i))
                    {
                        *state = Chunk::Counted;
                    }
                }
            }
            at += count;
            self.cancelled()?;
        }
        self.state().progress.total = total;
        loop {
            self.cancelled()?;
            if !setup
                .vbd
                .chain()
                .is_some_and(|chain| Arc::ptr_eq(&chain, &setup.chain))
            {
                return Err(failure(
                    libc::EIO,
                    "the disk was paused, closed or reopened during the commit",
                ));
            }
            if let Some(chunk) = self.dirty.take() {
                self.copy_chunk(setup, &target, chunk, &mut copied).await?;
                continue;
            }
            if self.state().complete {
                return self.pivot(setup, target, &mut copied).await;
            }
            if self.progress().status == JobStatus::Running {
                self.set_status(JobStatus::Ready);
                tracing::info!(minor = setup.vbd.minor(), "commit job ready");
            }
            let _ = tokio::time::timeout(IDLE, self.dirty.wake.notified()).await;
        }
    }

    async fn copy_chunk(
        &self,
        setup: &Setup,
        target: &ImageChain,
        chunk: u64,
        copied: &mut [Chunk],
    ) -> io::Result<()> {
        let sectors = setup.chain.info().sectors;
        let start = chunk * CHUNK_SECTORS;
        let count = CHUNK_SECTORS.min(sectors.saturating_sub(start));
        let mut bytes = 0;
        for range in allocated_above(&setup.chain, setup.base_index, start, count).await? {
            let len = usize::try_from((range.end - range.start) * SECTOR_SIZE)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let data = setup.chain.read(range.start, IoBuf::zeroed(len)).await?;
            target.write(range.start, Arc::new(data)).await?;
            bytes += len as u64;
        }
        let before = usize::try_from(chunk)
            .ok()
            .and_then(|i| copied.get_mut(i))
            .map_or(Chunk::Copied, |state| {
                std::mem::replace(state, Chunk::Copied)
            });
        let mut state = self.state();
        let progress = &mut state.progress;
        progress.current += bytes;
        if before != Chunk::Counted {
            // Work the first scan did not count: guest writes, or a chunk copied again.
            progress.total += bytes;
        }
        // The guest may have added to a counted chunk before its copy.
        progress.total = progress.total.max(progress.current);
        Ok(())
    }

    /// Switches the VBD to the base once the last dirty chunks are copied.
    async fn pivot(
        &self,
        setup: &Setup,
        target: ImageChain,
        copied: &mut [Chunk],
    ) -> io::Result<()> {
        // Pause and close cancel the job and wait for it while holding this turn: give way
        // to them rather than wait for it.
        let _turn = loop {
            self.cancelled()?;
            if let Ok(turn) = setup.turn.try_lock() {
                break turn;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if !setup
            .vbd
            .chain()
            .is_some_and(|chain| Arc::ptr_eq(&chain, &setup.chain))
        {
            return Err(failure(
                libc::EIO,
                "the disk changed before the commit completed",
            ));
        }
        self.set_status(JobStatus::Pending);
        setup.vbd.quiesce().await?;
        let finish = async {
            while let Some(chunk) = self.dirty.take() {
                self.copy_chunk(setup, &target, chunk, copied).await?;
            }
            target.flush().await
        };
        if let Err(e) = finish.await {
            let _ = setup.vbd.unquiesce(None);
            return Err(e);
        }
        setup.chain.observe_writes(None);
        let params = setup.base_params.clone();
        setup.vbd.unquiesce(Some((target, params.clone())))?;
        {
            // Done: all the work there was is what was copied.
            let mut state = self.state();
            state.progress.total = state.progress.current;
        }
        tracing::info!(
            minor = setup.vbd.minor(),
            "commit complete: the disk now runs on {params}"
        );
        Ok(())
    }
}

/// Sector ranges in `[sector, sector + count)` that some image above `base_index` holds
/// (data or zeros), merged and in order.
async fn allocated_above(
    chain: &ImageChain,
    base_index: usize,
    sector: u64,
    count: u64,
) -> io::Result<Vec<Range<u64>>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for image in &chain.images()[..base_index] {
        let mut at = sector;
        for run in image.driver.block_status(sector, count).await? {
            if run.state != Allocation::Absent {
                ranges.push(at..at + run.sectors);
            }
            at += run.sectors;
        }
    }
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    Ok(merged)
}
