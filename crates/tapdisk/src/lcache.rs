//! IntelliCache: a local cache of a shared parent chain (the C stack's `lc` filter, `-r`), and
//! the reuse of another VBD's NBD export as the parent chain (`-e MINOR`).
//!
//! On a host with a local cache SR, the storage manager makes an empty local VHD above each
//! shared golden image (the *read cache*) and opens it with `-r`; every VM's disk then gets a
//! local leaf above the read cache, opened with `-e <the read cache's minor>` (its parent is
//! that VBD's NBD export) and the VM's shared leaf as a mirror (`-r -2`, persistent) or a
//! standby (`-s`, scratch).
//!
//! With a local cache, sectors a read finds absent from the leaf are read from the images
//! below (the shared chain) and then written into the leaf, so the next read of them is
//! local. The cache never fails a guest's request: a fill that fails is dropped, and fills
//! stop while the leaf's filesystem has 2 MiB free or less (checked at most once a second, as
//! the C stack does), after an `ENOSPC` until space is back, and for good after any other
//! error. A fill writes only sectors still absent from the leaf when it runs, with the leaf's
//! writes held off meanwhile ([`LocalCache::fence`]), so it never overwrites a guest's write
//! that landed since the shared data was read.
//!
//! [`FillPolicy`] (when fills may run) and [`still_absent`] (what a fill may write) are pure;
//! the image chain runs the reads and writes.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::driver::{Allocation, StatusRun};

/// Fills stop while the cache's filesystem has this many bytes free or fewer (the C stack's
/// threshold).
pub const MIN_FREE_BYTES: u64 = 2 << 20;

/// How long a free-space answer is trusted before the filesystem is asked again.
pub const FREE_SPACE_RECHECK: Duration = Duration::from_secs(1);

/// What a VBD asks of IntelliCache at open, kept for every resume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntelliCache {
    /// Cache what the shared parent chain serves in the leaf (`-r`, `ADD_LCACHE`).
    pub local_cache: bool,
    /// The NBD socket of the VBD whose chain is the parent (`-e MINOR`, `REUSE_PRT`):
    /// `<ctl dir>/nbd<pid>.<minor>`, found at open.
    pub parent_export: Option<PathBuf>,
}

/// Why fills are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// Too little free space (or `ENOSPC`): fills resume once the filesystem has room.
    NoSpace,
    /// Any other failure of the leaf: fills stay off while this chain is open.
    Failed,
}

/// When fills may run: a small state machine over free-space answers and fill failures.
#[derive(Debug)]
pub struct FillPolicy {
    stopped: Option<Stopped>,
    /// When free space was last looked at (`None`: never).
    checked: Option<Instant>,
}

impl Default for FillPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl FillPolicy {
    /// A policy that asks about free space before the first fill.
    pub fn new() -> Self {
        Self {
            stopped: None,
            checked: None,
        }
    }

    /// Whether a fill may run at `now`; `free_bytes` is asked (at most once per
    /// [`FREE_SPACE_RECHECK`]) for the bytes free on the cache's filesystem. A filesystem that
    /// cannot say stops fills like a full one.
    pub fn allows(&mut self, now: Instant, free_bytes: impl FnOnce() -> Option<u64>) -> bool {
        if self.stopped == Some(Stopped::Failed) {
            return false;
        }
        let due = self
            .checked
            .is_none_or(|at| now.saturating_duration_since(at) >= FREE_SPACE_RECHECK);
        if due {
            self.checked = Some(now);
            let room = free_bytes().is_some_and(|free| free > MIN_FREE_BYTES);
            self.stopped = (!room).then_some(Stopped::NoSpace);
        }
        self.stopped.is_none()
    }

    /// A fill failed with `errno`: `ENOSPC` stops fills until the next free-space check finds
    /// room, anything else for good. Returns true when this stopped fills that were running.
    pub fn failed(&mut self, errno: i32) -> bool {
        let was_running = self.stopped.is_none();
        if errno == libc::ENOSPC {
            if self.stopped.is_none() {
                self.stopped = Some(Stopped::NoSpace);
            }
        } else {
            self.stopped = Some(Stopped::Failed);
        }
        was_running
    }

    /// True while fills run.
    pub fn running(&self) -> bool {
        self.stopped.is_none()
    }
}

/// The parts of `range` (sectors) that `runs` (the leaf's block status from `range.start`)
/// report absent: what a fill may still write without covering a guest's write.
pub fn still_absent(range: &Range<u64>, runs: &[StatusRun]) -> Vec<Range<u64>> {
    let mut pieces: Vec<Range<u64>> = Vec::new();
    let mut at = range.start;
    for run in runs {
        if at >= range.end {
            break;
        }
        let end = at.saturating_add(run.sectors).min(range.end);
        if run.state == Allocation::Absent && end > at {
            match pieces.last_mut() {
                Some(last) if last.end == at => last.end = end,
                _ => pieces.push(at..end),
            }
        }
        at = end;
    }
    pieces
}

/// The counters `tap-ctl stats` shows as `"local_cache"`.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    local_sectors: AtomicU64,
    shared_sectors: AtomicU64,
    fills: AtomicU64,
    filled_sectors: AtomicU64,
    fill_errors: AtomicU64,
}

/// The local cache of one chain: its fill policy, the fence between fills and the leaf's
/// writes, and its counters.
#[derive(Debug)]
pub struct LocalCache {
    /// The leaf's file, whose filesystem holds the cache.
    path: PathBuf,
    policy: Mutex<FillPolicy>,
    fence: tokio::sync::RwLock<()>,
    counters: Counters,
}

/// `"local_cache"` in `tap-ctl stats` (a blktap-rs addition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalCacheStats {
    /// Reads served by the leaf alone.
    pub hits: u64,
    /// Reads that needed the shared chain for some of their sectors.
    pub misses: u64,
    /// Sectors read from the leaf.
    pub local_sectors: u64,
    /// Sectors read from the shared chain.
    pub shared_sectors: u64,
    /// Fills that wrote into the leaf.
    pub fills: u64,
    /// Sectors written into the leaf by fills.
    pub filled_sectors: u64,
    /// Fills that failed (dropped; the guest's read succeeded).
    pub fill_errors: u64,
    /// Whether fills run now.
    pub filling: bool,
}

impl LocalCache {
    /// A cache kept in the leaf at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            policy: Mutex::new(FillPolicy::new()),
            fence: tokio::sync::RwLock::new(()),
            counters: Counters::default(),
        }
    }

    fn policy(&self) -> std::sync::MutexGuard<'_, FillPolicy> {
        self.policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Held (shared) by every change of the leaf, and exclusively by a fill: a fill sees
    /// every change that started before it.
    pub fn fence(&self) -> &tokio::sync::RwLock<()> {
        &self.fence
    }

    /// Counts a read: `local` sectors came from the leaf, `shared` from below.
    pub fn count_read(&self, local: u64, shared: u64) {
        let c = &self.counters;
        if shared == 0 {
            c.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            c.misses.fetch_add(1, Ordering::Relaxed);
        }
        c.local_sectors.fetch_add(local, Ordering::Relaxed);
        c.shared_sectors.fetch_add(shared, Ordering::Relaxed);
    }

    /// Whether a fill may run now (asks the filesystem for free space when due).
    pub fn may_fill(&self) -> bool {
        let path = &self.path;
        self.policy()
            .allows(Instant::now(), || free_bytes(path).ok())
    }

    /// Counts a fill that wrote `sectors`.
    pub fn filled(&self, sectors: u64) {
        if sectors > 0 {
            self.counters.fills.fetch_add(1, Ordering::Relaxed);
            self.counters
                .filled_sectors
                .fetch_add(sectors, Ordering::Relaxed);
        }
    }

    /// A fill failed with `error`; it is logged when it stops fills.
    pub fn fill_failed(&self, error: &std::io::Error) {
        self.counters.fill_errors.fetch_add(1, Ordering::Relaxed);
        let errno = crate::error::errno_of(error);
        if self.policy().failed(errno) {
            tracing::warn!(
                cache = %self.path.display(),
                "local cache: filling stopped, reads go on from the shared images: {error}"
            );
        }
    }

    /// The counters now.
    pub fn stats(&self) -> LocalCacheStats {
        let c = &self.counters;
        LocalCacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            local_sectors: c.local_sectors.load(Ordering::Relaxed),
            shared_sectors: c.shared_sectors.load(Ordering::Relaxed),
            fills: c.fills.load(Ordering::Relaxed),
            filled_sectors: c.filled_sectors.load(Ordering::Relaxed),
            fill_errors: c.fill_errors.load(Ordering::Relaxed),
            filling: self.policy().running(),
        }
    }

    /// The leaf's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Bytes free on the filesystem holding `path` (`f_bfree`, which counts the blocks kept for
/// root, as the C stack does: tapdisk runs as root).
fn free_bytes(path: &Path) -> rustix::io::Result<u64> {
    let stat = rustix::fs::statfs(path)?;
    let blocks = stat.f_bfree;
    let size = u64::try_from(stat.f_bsize).unwrap_or(0);
    Ok(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageChain;
    use crate::iobuf::IoBuf;
    use crate::testing::FakeImage;
    use std::sync::Arc;

    const SECTORS: u64 = 64;

    /// Byte `i` of the shared image.
    fn shared_byte(i: usize) -> u8 {
        u8::try_from(i % 251).unwrap()
    }

    /// A cached chain: an empty sparse leaf (in the temporary directory's filesystem, whose
    /// free space the cache checks) above a shared image full of data; and the leaf's and the
    /// shared image's fault handles.
    fn cached_chain() -> (
        ImageChain,
        Arc<crate::testing::Faults>,
        Arc<crate::testing::Faults>,
    ) {
        let bytes = usize::try_from(SECTORS * 512).unwrap();
        let data: Vec<u8> = (0..bytes).map(shared_byte).collect();
        let leaf = FakeImage::new(SECTORS).sparse().at(std::env::temp_dir());
        let shared = FakeImage::new(SECTORS).holding(&data);
        let (leaf_faults, shared_faults) = (leaf.faults(), shared.faults());
        let chain = ImageChain::from_drivers(vec![Box::new(leaf), Box::new(shared)])
            .unwrap()
            .with_local_cache();
        (chain, leaf_faults, shared_faults)
    }

    /// Sectors the shared image served (its `hits`, in sectors as the C tapdisk counts).
    fn shared_sectors(chain: &ImageChain) -> u64 {
        chain.images()[1].counters.hits[0].load(Ordering::Relaxed)
    }

    async fn assert_reads_shared_data(chain: &ImageChain, sector: u64, sectors: u64) {
        let len = usize::try_from(sectors * 512).unwrap();
        let buf = chain.read(sector, IoBuf::zeroed(len)).await.unwrap();
        let first = usize::try_from(sector * 512).unwrap();
        let expected: Vec<u8> = (first..first + len).map(shared_byte).collect();
        assert!(buf.as_slice() == expected.as_slice(), "sector {sector}");
    }

    #[tokio::test]
    async fn a_second_read_is_served_by_the_leaf() {
        if !FillPolicy::new().allows(Instant::now(), || free_bytes(&std::env::temp_dir()).ok()) {
            return; // the temporary directory's filesystem is full: nothing would be cached
        }
        let (chain, _, _) = cached_chain();
        assert_reads_shared_data(&chain, 8, 16).await;
        let stats = chain.local_cache().unwrap().stats();
        assert_eq!((stats.hits, stats.misses), (0, 1));
        assert_eq!((stats.fills, stats.filled_sectors), (1, 16));
        assert_eq!(shared_sectors(&chain), 16);
        // Again, and a read half in the cache.
        assert_reads_shared_data(&chain, 8, 16).await;
        assert_reads_shared_data(&chain, 16, 16).await;
        let stats = chain.local_cache().unwrap().stats();
        assert_eq!((stats.hits, stats.misses), (1, 2));
        assert_eq!((stats.local_sectors, stats.shared_sectors), (24, 24));
        assert_eq!(stats.filled_sectors, 24);
        assert_eq!(shared_sectors(&chain), 24);
        assert!(stats.filling);
    }

    #[tokio::test]
    async fn a_failing_leaf_never_fails_a_read() {
        for errno in [libc::ENOSPC, libc::EIO] {
            let (chain, leaf_faults, _) = cached_chain();
            leaf_faults.fail_writes(1, errno);
            assert_reads_shared_data(&chain, 0, 8).await;
            let stats = chain.local_cache().unwrap().stats();
            assert_eq!((stats.fill_errors, stats.filled_sectors), (1, 0));
            assert!(!stats.filling);
            // Fills stay off (ENOSPC: until a free-space check, at most once a second).
            assert_reads_shared_data(&chain, 0, 8).await;
            assert_reads_shared_data(&chain, 8, 8).await;
            let stats = chain.local_cache().unwrap().stats();
            assert_eq!((stats.misses, stats.filled_sectors), (3, 0));
            assert_eq!(shared_sectors(&chain), 24);
        }
    }

    #[tokio::test]
    async fn a_fill_never_covers_a_write_made_meanwhile() {
        let (chain, _, shared_faults) = cached_chain();
        // The read takes the shared data, then the guest writes, then the fill runs.
        let gate = shared_faults.gate_reads();
        let read = chain.read(0, IoBuf::zeroed(4096));
        let write = async {
            chain
                .write(0, Arc::new(IoBuf::copy_from(&[9; 4096])))
                .await
                .unwrap();
            gate.add_permits(1);
        };
        let (read, ()) = tokio::join!(read, write);
        read.unwrap();
        let buf = chain.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(buf.as_slice().iter().all(|b| *b == 9));
        assert_eq!(chain.local_cache().unwrap().stats().filled_sectors, 0);
    }

    #[test]
    fn one_image_has_nothing_to_cache() {
        let chain = ImageChain::from_drivers(vec![Box::new(FakeImage::new(8))])
            .unwrap()
            .with_local_cache();
        assert!(chain.local_cache().is_none());
    }

    fn run(sectors: u64, state: Allocation) -> StatusRun {
        StatusRun { sectors, state }
    }

    #[test]
    fn fills_follow_free_space_and_failures() {
        let start = Instant::now();
        let mut policy = FillPolicy::new();
        assert!(policy.allows(start, || Some(MIN_FREE_BYTES + 1)));
        // Not asked again within a second.
        assert!(policy.allows(start + Duration::from_millis(500), || panic!("asked")));
        // Full: off until the next check finds room.
        assert!(!policy.allows(start + Duration::from_secs(1), || Some(MIN_FREE_BYTES)));
        assert!(!policy.allows(start + Duration::from_millis(1500), || panic!("asked")));
        assert!(policy.allows(start + Duration::from_secs(2), || Some(64 << 20)));
        // ENOSPC stops fills until a check finds room again.
        assert!(policy.failed(libc::ENOSPC));
        assert!(!policy.failed(libc::ENOSPC));
        assert!(!policy.allows(start + Duration::from_millis(2500), || panic!("asked")));
        assert!(policy.allows(start + Duration::from_secs(3), || Some(64 << 20)));
        // A filesystem that cannot say counts as full.
        assert!(!policy.allows(start + Duration::from_secs(4), || None));
        assert!(policy.allows(start + Duration::from_secs(5), || Some(64 << 20)));
        // Any other error: off for good.
        assert!(policy.failed(libc::EIO));
        assert!(!policy.running());
        assert!(!policy.allows(start + Duration::from_secs(9), || Some(64 << 20)));
    }

    #[test]
    fn fills_write_only_what_is_still_absent() {
        let runs = [
            run(4, Allocation::Absent),
            run(2, Allocation::Data),
            run(3, Allocation::Absent),
            run(1, Allocation::Zero),
        ];
        assert_eq!(still_absent(&(100..110), &runs), vec![100..104, 106..109]);
        // Runs longer than the range are cut at its end; adjacent absent runs merge.
        let runs = [run(2, Allocation::Absent), run(9, Allocation::Absent)];
        assert_eq!(still_absent(&(0..5), &runs), vec![0..5]);
        assert_eq!(still_absent(&(0..5), &[run(5, Allocation::Data)]), vec![]);
        assert_eq!(still_absent(&(0..5), &[]), vec![]);
    }
}
