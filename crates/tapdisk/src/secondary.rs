//! A VBD's secondary image (`tap-ctl open|unpause -2 TYPE:LOCATOR [-s]`): a mirror of every
//! write, as storage live migration sets up with an `nbd:` image towards the destination
//! host, or a standby that takes the writes over when the leaf runs out of space.
//!
//! **Mirror** (the default). Every write, discard and write-zeroes goes to the leaf and to
//! the secondary at the same time (both issued before either is awaited, so the mirror adds
//! the slower of two round trips rather than their sum), and the guest's request completes
//! when both have. Reads come from the chain as always. A secondary that fails (an error, a
//! broken connection, a request the NBD client's deadline catches) stops being written: the
//! VBD's `nbd_mirror_failed` becomes 1, the error is logged, and the guest's request
//! completes with the leaf's result, so the guest never sees the mirror's trouble. A failed
//! mirror stays off (it has missed writes) until the toolstack sets a secondary again.
//!
//! **Standby** (`-s`). The secondary receives nothing while the leaf has room.
//!
//! **Running out of space.** When the leaf fails a write with `ENOSPC` and the secondary has
//! the data (a mirror that wrote it, or a standby that takes it now), the write succeeds
//! and from then on writes go to the secondary only. Which sectors live there is recorded
//! ([`Redirected`]), and reads of those sectors come from the secondary while every other
//! sector is still read from the chain, so no data written before or after is lost and
//! the secondary need not be a whole copy of the disk. Under an IntelliCache local leaf
//! (a VBD opened with `-e`, [`crate::lcache`]) the secondary is the VM's shared leaf, and any
//! failure of a leaf write (not only `ENOSPC`; not the `EAGAIN`/`EBUSY`/`EINTR` the VBD
//! retries) hands the writes over the same way: the local side failing falls back to the
//! shared one. `FIXME_enospc_redirect_count` counts
//! the sectors written to the secondary since (the C stack's name). The record lives with
//! the VBD, across pauses; a secondary holding redirected data is never dropped (not by
//! `-2 null` either) and must open on resume.
//!
//! The secondary's settings and state ([`SecondaryConfig`]) belong to the VBD and outlast
//! the chain: every resume re-opens the same secondary (SM's snapshots pause and unpause
//! the VBD during a migration), `-2 null` removes it and clears `nbd_mirror_failed`, and a
//! new `-2` replaces it (with a fresh state).

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::driver::{push_status, DiskType, OpenOptions, StatusRun, ZeroFlags, SECTOR_SIZE};
use crate::error::errno_of;
use crate::image::{Image, ImageChain, ImageCounters};
use crate::iobuf::IoBuf;

/// The literal secondary that removes the secondary (`tap-ctl unpause -2 null`).
pub const NULL_SECONDARY: &str = "null";

/// Largest zero buffer written where the secondary cannot zero without data.
const ZERO_CHUNK_SECTORS: u64 = 2048;

/// How the secondary is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryMode {
    /// Every write goes to both images.
    Mirror,
    /// Writes go to the secondary once the leaf is full.
    Standby,
}

impl SecondaryMode {
    /// Lower-case name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mirror => "mirror",
            Self::Standby => "standby",
        }
    }
}

/// Sector ranges written to the secondary only, merged.
#[derive(Debug, Default)]
pub struct Redirected {
    /// Start -> end of each range, none overlapping or touching.
    ranges: BTreeMap<u64, u64>,
}

impl Redirected {
    /// True when nothing was redirected.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Records `range`.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Ranges that overlap or touch [start, end) are absorbed.
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// `range` cut into runs, each redirected (`true`) or not, in order.
    pub fn split(&self, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut runs = Vec::new();
        let mut at = range.start;
        let first = self
            .ranges
            .range(..=range.start)
            .next_back()
            .filter(|(_, end)| **end > range.start)
            .map(|(start, end)| (*start, *end));
        let rest = self
            .ranges
            .range(range.start.saturating_add(1)..range.end)
            .map(|(start, end)| (*start, *end));
        for (start, end) in first.into_iter().chain(rest) {
            let start = start.max(range.start);
            let end = end.min(range.end);
            if start > at {
                runs.push((at..start, false));
            }
            if end > start {
                runs.push((start..end, true));
                at = end;
            }
        }
        if at < range.end {
            runs.push((at..range.end, false));
        }
        runs
    }
}

/// What the VBD keeps of its secondary across pauses.
#[derive(Debug, Default)]
pub struct SecondaryState {
    mirror_failed: AtomicBool,
    failed_over: AtomicBool,
    redirected: Mutex<Redirected>,
    redirected_sectors: AtomicU64,
}

impl SecondaryState {
    /// The mirror failed and is no longer written (`nbd_mirror_failed`).
    pub fn mirror_failed(&self) -> bool {
        self.mirror_failed.load(Ordering::Relaxed)
    }

    /// Marks the mirror failed (also when a mirror cannot even be opened).
    pub fn fail_mirror(&self) {
        self.mirror_failed.store(true, Ordering::Relaxed);
    }

    /// The leaf ran out of space: writes go to the secondary.
    pub fn failed_over(&self) -> bool {
        self.failed_over.load(Ordering::Relaxed)
    }

    /// Sectors written to the secondary since the leaf ran out of space
    /// (`FIXME_enospc_redirect_count`).
    pub fn redirected_sectors(&self) -> u64 {
        self.redirected_sectors.load(Ordering::Relaxed)
    }

    fn redirected(&self) -> MutexGuard<'_, Redirected> {
        self.redirected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, range: Range<u64>) {
        self.redirected_sectors
            .fetch_add(range.end - range.start, Ordering::Relaxed);
        self.redirected().insert(range);
    }
}

/// A VBD's secondary: what to open, how to use it, and its state.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// `TYPE:LOCATOR` of the secondary image.
    pub params: String,
    /// Mirror or standby.
    pub mode: SecondaryMode,
    /// Shared with the open secondary; outlives it.
    pub state: Arc<SecondaryState>,
}

impl SecondaryConfig {
    /// A new secondary with a fresh state.
    pub fn new(params: String, mode: SecondaryMode) -> Self {
        Self {
            params,
            mode,
            state: Arc::new(SecondaryState::default()),
        }
    }

    /// Whether a (re)open of the VBD should open this secondary: not a mirror that failed,
    /// unless it holds redirected data.
    pub fn wanted(&self) -> bool {
        !self.state.mirror_failed() || self.state.failed_over()
    }
}

/// The open secondary of a chain.
#[derive(Debug)]
pub struct Secondary {
    image: Image,
    mode: SecondaryMode,
    state: Arc<SecondaryState>,
    minor: u16,
    /// The leaf is an IntelliCache local leaf and this its shared leaf: any failed leaf
    /// write hands the writes over, not only `ENOSPC`.
    behind_local_leaf: bool,
}

/// Byte length of `sectors` sectors.
fn byte_len(sectors: u64) -> io::Result<usize> {
    sectors
        .checked_mul(SECTOR_SIZE)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

impl Secondary {
    /// The open `image` used as `config` says, for VBD `minor` (logs).
    pub fn new(image: Image, config: &SecondaryConfig, minor: u16) -> Self {
        Self {
            image,
            mode: config.mode,
            state: Arc::clone(&config.state),
            minor,
            behind_local_leaf: false,
        }
    }

    /// The same secondary as the shared leaf behind an IntelliCache local leaf (`-e`).
    pub fn behind_local_leaf(mut self, local_leaf: bool) -> Self {
        self.behind_local_leaf = local_leaf;
        self
    }

    /// Whether the leaf's `error` hands its writes to the secondary: `ENOSPC`, or under a
    /// local leaf any error the VBD does not retry.
    fn takes_over_after(&self, error: &io::Error) -> bool {
        let errno = errno_of(error);
        errno == libc::ENOSPC
            || (self.behind_local_leaf
                && !matches!(errno, libc::EAGAIN | libc::EBUSY | libc::EINTR))
    }

    /// The secondary image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Where `tap-ctl stats` lists the secondary among the chain's images, as the C stack
    /// links it: a live mirror right below the leaf, a secondary that took the writes over
    /// on top, a standby or failed mirror nowhere.
    pub fn listed_at(&self) -> Option<usize> {
        if self.state.failed_over() {
            Some(0)
        } else if self.mirroring() {
            Some(1)
        } else {
            None
        }
    }

    fn mirroring(&self) -> bool {
        self.mode == SecondaryMode::Mirror && !self.state.mirror_failed()
    }

    /// True when some reads must come from the secondary.
    pub fn holds_data(&self) -> bool {
        self.state.failed_over() && !self.state.redirected().is_empty()
    }

    fn name(&self) -> String {
        self.image.driver.path().display().to_string()
    }

    /// The mirror failed with `error`: stop writing it.
    fn mirror_failed(&self, error: &io::Error) {
        if !self.state.mirror_failed.swap(true, Ordering::Relaxed) {
            tracing::error!(
                minor = self.minor,
                "secondary {} failed ({error}): mirroring stops, the guest's I/O goes on",
                self.name()
            );
        }
    }

    /// The leaf failed a write with `error` (out of space, or a local leaf failing): writes
    /// go to the secondary from now on.
    fn fail_over(&self, error: &io::Error) {
        if !self.state.failed_over.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                minor = self.minor,
                "the leaf failed a write ({error}): writes go to {} secondary {} from now on",
                self.mode.name(),
                self.name()
            );
        }
    }

    async fn write_secondary(&self, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let sectors = buf.len() as u64 / SECTOR_SIZE;
        let result = self.image.driver.write(sector, buf).await;
        self.image.counters.count_write(sectors, &result);
        result
    }

    /// Writes `buf` to the secondary only and records where.
    async fn write_redirected(&self, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let sectors = buf.len() as u64 / SECTOR_SIZE;
        self.write_secondary(sector, buf).await?;
        self.state.record(sector..sector + sectors);
        Ok(())
    }

    /// A write of the chain whose leaf is `leaf`.
    pub async fn write(&self, leaf: &Image, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
        let sectors = buf.len() as u64 / SECTOR_SIZE;
        if self.state.failed_over() {
            return self.write_redirected(sector, buf).await;
        }
        if !self.mirroring() {
            return match write_image(leaf, sector, Arc::clone(&buf)).await {
                Err(e) if self.takes_over_after(&e) && self.mode == SecondaryMode::Standby => {
                    self.write_redirected(sector, buf).await?;
                    self.fail_over(&e);
                    Ok(())
                }
                other => other,
            };
        }
        // The secondary's request goes out first, then the leaf's; both run at once.
        let (mirrored, written) = tokio::join!(
            self.write_secondary(sector, Arc::clone(&buf)),
            write_image(leaf, sector, buf)
        );
        match (written, mirrored) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(e)) => {
                self.mirror_failed(&e);
                Ok(())
            }
            (Err(e), Ok(())) if self.takes_over_after(&e) => {
                // The mirror has the data: it is the write's home from now on.
                self.fail_over(&e);
                self.state.record(sector..sector + sectors);
                Ok(())
            }
            (Err(e), mirrored) => {
                if let Err(mirror_error) = mirrored {
                    self.mirror_failed(&mirror_error);
                }
                Err(e)
            }
        }
    }

    /// Zeroes `count` sectors at `sector` of the secondary (discard semantics: they read
    /// as zeros afterwards), by writing zeros where it cannot otherwise.
    async fn zero_secondary(&self, sector: u64, count: u64) -> io::Result<()> {
        let driver = &self.image.driver;
        let fast = driver
            .write_zeroes(
                sector,
                count,
                ZeroFlags {
                    may_deallocate: true,
                },
            )
            .await;
        match fast {
            Err(e) if errno_of(&e) == libc::EOPNOTSUPP => {}
            other => return other,
        }
        let mut at = sector;
        let end = sector + count;
        while at < end {
            let step = (end - at).min(ZERO_CHUNK_SECTORS);
            let zeros = Arc::new(IoBuf::zeroed(byte_len(step)?));
            self.write_secondary(at, zeros).await?;
            at += step;
        }
        Ok(())
    }

    /// A discard or write-zeroes of the chain (`on_leaf` runs it on the leaf): mirrored as
    /// zeroing once the leaf did it (a leaf that refuses leaves the mirror alone, so the two
    /// never differ: the caller then writes zeros, which are mirrored as writes), redirected
    /// once failed over.
    pub async fn zero<F>(&self, sector: u64, count: u64, on_leaf: F) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        if self.state.failed_over() {
            self.zero_secondary(sector, count).await?;
            self.state.record(sector..sector + count);
            return Ok(());
        }
        on_leaf.await?;
        if self.mirroring() {
            if let Err(e) = self.zero_secondary(sector, count).await {
                self.mirror_failed(&e);
            }
        }
        Ok(())
    }

    /// A flush of the chain (`on_leaf` flushes the leaf).
    pub async fn flush<F>(&self, on_leaf: F) -> io::Result<()>
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        if self.state.failed_over() {
            let (secondary, leaf) = tokio::join!(self.image.driver.flush(), on_leaf);
            return secondary.and(leaf);
        }
        if !self.mirroring() {
            return on_leaf.await;
        }
        let (mirrored, done) = tokio::join!(self.image.driver.flush(), on_leaf);
        if let Err(e) = mirrored {
            self.mirror_failed(&e);
        }
        done
    }

    /// A read of `buf.len()` bytes at `sector` from `chain`, taking redirected sectors from
    /// the secondary.
    pub async fn read(&self, chain: &ImageChain, sector: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let sectors = buf.len() as u64 / SECTOR_SIZE;
        let runs = self.state.redirected().split(sector..sector + sectors);
        if let [(_, false)] = runs.as_slice() {
            return chain.read_chain(sector, buf).await;
        }
        for (run, redirected) in runs {
            let len = byte_len(run.end - run.start)?;
            let part = IoBuf::zeroed(len);
            let part = if redirected {
                let result = self.image.driver.read(run.start, part).await;
                self.image.counters.count_read(run.end - run.start, &result);
                // The secondary is written whole where redirected: nothing is absent.
                result?.buf
            } else {
                chain.read_chain(run.start, part).await?
            };
            let at = byte_len(run.start - sector)?;
            buf.as_mut_slice()[at..at + len].copy_from_slice(part.as_slice());
        }
        Ok(buf)
    }

    /// Block status of `count` sectors at `sector` from `chain`; redirected sectors hold
    /// data.
    pub async fn block_status(
        &self,
        chain: &ImageChain,
        sector: u64,
        count: u64,
    ) -> io::Result<Vec<StatusRun>> {
        let runs = self.state.redirected().split(sector..sector + count);
        let mut status: Vec<StatusRun> = Vec::new();
        for (run, redirected) in runs {
            let pieces = if redirected {
                vec![StatusRun {
                    sectors: run.end - run.start,
                    state: crate::driver::Allocation::Data,
                }]
            } else {
                chain
                    .block_status_of_chain(run.start, run.end - run.start)
                    .await?
            };
            for piece in pieces {
                push_status(&mut status, piece);
            }
        }
        Ok(status)
    }

    /// Gives back what the secondary holds ([`crate::driver::ImageDriver::release`]).
    pub fn release(&self) {
        self.image.driver.release();
    }
}

/// Opens the secondary `config` names (blocking: call it on the blocking pool).
fn open_image(params: &str, options: OpenOptions) -> io::Result<(DiskType, Image)> {
    let (disk_type, locator) = crate::image::parse_params(params)?;
    let driver = crate::driver::open_image(disk_type, &locator, options)?;
    Ok((
        disk_type,
        Image {
            driver,
            counters: ImageCounters::default(),
        },
    ))
}

/// Opens `config`'s secondary with the leaf's `options` and makes it `chain`'s, for VBD
/// `minor`, when the VBD wants it ([`SecondaryConfig::wanted`]). As the C stack: a secondary
/// of another size is refused (`EINVAL`); an `nbd:` mirror that cannot be opened is
/// tolerated (the open goes on, `nbd_mirror_failed` becomes 1), any other secondary that
/// cannot be opened fails the open, as does one holding redirected data. `local_leaf`: the
/// leaf is an IntelliCache local leaf ([`Secondary::behind_local_leaf`]).
pub async fn attach(
    chain: &mut ImageChain,
    config: &SecondaryConfig,
    options: &OpenOptions,
    minor: u16,
    local_leaf: bool,
) -> io::Result<()> {
    if !config.wanted() {
        return Ok(());
    }
    let params = config.params.clone();
    let options = OpenOptions {
        read_only: false,
        ..options.clone()
    };
    let opened = tokio::task::spawn_blocking(move || open_image(&params, options))
        .await
        .unwrap_or_else(|join_error| Err(io::Error::other(join_error)));
    let image = match opened {
        Ok((_, image)) => image,
        Err(e) => {
            let nbd = crate::image::parse_params(&config.params)
                .is_ok_and(|(disk_type, _)| disk_type == DiskType::Nbd);
            if nbd && !config.state.failed_over() {
                tracing::error!(
                    minor,
                    "ignoring the NBD secondary {} that cannot be opened: {}",
                    config.params,
                    crate::error::message_of(&e)
                );
                config.state.fail_mirror();
                return Ok(());
            }
            return Err(crate::error::with_context(
                e,
                format!("opening the secondary {}", config.params),
            ));
        }
    };
    let (ours, theirs) = (chain.info().sectors, image.driver.info().sectors);
    if ours != theirs {
        image.driver.release();
        return Err(crate::error::failure(
            libc::EINVAL,
            format!(
                "the secondary {} has {theirs} sectors, the disk has {ours}",
                config.params
            ),
        ));
    }
    tracing::info!(
        minor,
        "secondary {} ({})",
        config.params,
        config.mode.name()
    );
    chain.set_secondary(Secondary::new(image, config, minor).behind_local_leaf(local_leaf));
    Ok(())
}

/// Writes `buf` to `image`, counting it.
async fn write_image(image: &Image, sector: u64, buf: Arc<IoBuf>) -> io::Result<()> {
    let sectors = buf.len() as u64 / SECTOR_SIZE;
    let result = image.driver.write(sector, buf).await;
    image.counters.count_write(sectors, &result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::ImageDriver;
    use crate::testing::{FakeImage, Faults};

    /// A chain over a fake leaf with a fake secondary used as `mode`; returns the chain,
    /// the faults of leaf and secondary, and the secondary's state.
    fn chain(
        mode: SecondaryMode,
        capabilities: crate::driver::Capabilities,
    ) -> (ImageChain, Arc<Faults>, Arc<Faults>, Arc<SecondaryState>) {
        let leaf = FakeImage::new(64).holding(&[0x11; 64 * 512]);
        let spare = FakeImage::new(64)
            .at("nbd-destination")
            .with_capabilities(capabilities);
        let (leaf_faults, spare_faults) = (leaf.faults(), spare.faults());
        let mut chain = ImageChain::from_drivers(vec![Box::new(leaf)]).unwrap();
        let config = SecondaryConfig::new("aio:/spare".into(), mode);
        let image = Image {
            driver: Box::new(spare),
            counters: ImageCounters::default(),
        };
        chain.set_secondary(Secondary::new(image, &config, 9));
        (chain, leaf_faults, spare_faults, config.state)
    }

    async fn read(driver: &dyn ImageDriver, sector: u64, sectors: usize) -> Vec<u8> {
        let out = driver
            .read(sector, IoBuf::zeroed(sectors * 512))
            .await
            .unwrap();
        out.buf.as_slice().to_vec()
    }

    fn secondary_driver(chain: &ImageChain) -> &dyn ImageDriver {
        chain.secondary().unwrap().image().driver.as_ref()
    }

    fn leaf_driver(chain: &ImageChain) -> &dyn ImageDriver {
        chain.images()[0].driver.as_ref()
    }

    fn data(byte: u8, sectors: usize) -> Arc<IoBuf> {
        Arc::new(IoBuf::copy_from(&vec![byte; sectors * 512]))
    }

    #[tokio::test]
    async fn a_mirror_gets_every_write_until_it_fails() {
        let (chain, _, spare, state) = chain(SecondaryMode::Mirror, Default::default());
        chain.write(2, data(0xaa, 2)).await.unwrap();
        assert_eq!(read(secondary_driver(&chain), 2, 2).await, vec![0xaa; 1024]);
        assert_eq!(read(leaf_driver(&chain), 2, 2).await, vec![0xaa; 1024]);
        assert_eq!(chain.secondary().unwrap().listed_at(), Some(1));
        // A discard the leaf refuses leaves the mirror alone; zeroing the leaf does is
        // mirrored, by writing zeros where the secondary cannot zero.
        chain.discard(2, 1).await.unwrap_err();
        assert_eq!(read(secondary_driver(&chain), 2, 1).await, vec![0xaa; 512]);
        chain
            .write_zeroes(2, 1, ZeroFlags::default())
            .await
            .unwrap_err();
        assert_eq!(read(secondary_driver(&chain), 2, 1).await, vec![0xaa; 512]);
        chain.flush().await.unwrap();
        // A failing mirror: the guest's write succeeds, the mirror stops.
        spare.fail_writes(1, libc::EIO);
        chain.write(8, data(0xbb, 1)).await.unwrap();
        assert!(state.mirror_failed());
        assert_eq!(chain.secondary().unwrap().listed_at(), None);
        chain.write(9, data(0xcc, 1)).await.unwrap();
        assert_eq!(read(secondary_driver(&chain), 8, 2).await, vec![0; 1024]);
        assert_eq!(read(leaf_driver(&chain), 9, 1).await, vec![0xcc; 512]);
        // Reads never touch the secondary.
        spare.fail_reads(100, libc::EIO);
        assert_eq!(
            chain.read(9, IoBuf::zeroed(512)).await.unwrap().as_slice(),
            &[0xcc; 512]
        );
    }

    #[tokio::test]
    async fn a_mirror_takes_over_the_writes_of_a_full_leaf() {
        let (chain, leaf, _, state) = chain(SecondaryMode::Mirror, Default::default());
        chain.write(0, data(0x01, 4)).await.unwrap();
        leaf.fail_writes(1, libc::ENOSPC);
        chain.write(4, data(0x02, 2)).await.unwrap();
        assert!(state.failed_over() && !state.mirror_failed());
        assert_eq!(state.redirected_sectors(), 2);
        // Later writes go to the secondary only.
        chain.write(10, data(0x03, 1)).await.unwrap();
        assert_eq!(read(leaf_driver(&chain), 10, 1).await, vec![0x11; 512]);
        assert_eq!(state.redirected_sectors(), 3);
        assert_eq!(chain.secondary().unwrap().listed_at(), Some(0));
        // Reads: redirected sectors from the secondary, the rest from the leaf.
        let all = chain.read(0, IoBuf::zeroed(12 * 512)).await.unwrap();
        let sector = |n: usize| all.as_slice()[n * 512];
        assert_eq!(
            (0..12).map(sector).collect::<Vec<_>>(),
            [1, 1, 1, 1, 2, 2, 0x11, 0x11, 0x11, 0x11, 3, 0x11]
        );
        let status = chain.block_status(0, 12).await.unwrap();
        assert_eq!(
            status,
            vec![StatusRun {
                sectors: 12,
                state: crate::driver::Allocation::Data
            }]
        );
        // The secondary now holds the only copy: its failures are the guest's.
        let (chain2, _, spare2, _) = chain_failed_over().await;
        spare2.fail_writes(1, libc::EIO);
        assert!(chain2.write(1, data(9, 1)).await.is_err());
    }

    #[tokio::test]
    async fn a_failing_local_leaf_hands_its_writes_to_the_shared_leaf() {
        for mode in [SecondaryMode::Mirror, SecondaryMode::Standby] {
            for local_leaf in [false, true] {
                let leaf = FakeImage::new(64).holding(&[0x11; 64 * 512]);
                let leaf_faults = leaf.faults();
                let mut chain = ImageChain::from_drivers(vec![Box::new(leaf)]).unwrap();
                let config = SecondaryConfig::new("vhd:/sr/shared-leaf.vhd".into(), mode);
                let image = Image {
                    driver: Box::new(FakeImage::new(64)),
                    counters: ImageCounters::default(),
                };
                let secondary = Secondary::new(image, &config, 9).behind_local_leaf(local_leaf);
                chain.set_secondary(secondary);
                // Retried errors stay the VBD's business either way.
                leaf_faults.fail_writes(1, libc::EAGAIN);
                let again = chain.write(0, data(0x41, 1)).await.unwrap_err();
                assert_eq!(errno_of(&again), libc::EAGAIN);
                leaf_faults.fail_writes(1, libc::EIO);
                let result = chain.write(2, data(0x42, 2)).await;
                if !local_leaf {
                    // A storage-migration mirror or standby: the leaf's error is the guest's.
                    assert_eq!(errno_of(&result.unwrap_err()), libc::EIO);
                    assert!(!config.state.failed_over());
                    continue;
                }
                result.unwrap();
                assert!(config.state.failed_over(), "{mode:?}");
                assert_eq!(config.state.redirected_sectors(), 2);
                let read = chain.read(1, IoBuf::zeroed(4 * 512)).await.unwrap();
                let sector = |n: usize| read.as_slice()[n * 512];
                assert_eq!(
                    (0..4).map(sector).collect::<Vec<_>>(),
                    [0x11, 0x42, 0x42, 0x11]
                );
            }
        }
    }

    async fn chain_failed_over() -> (ImageChain, Arc<Faults>, Arc<Faults>, Arc<SecondaryState>) {
        let made = chain(SecondaryMode::Standby, Default::default());
        made.1.fail_writes(1, libc::ENOSPC);
        made.0.write(0, data(5, 1)).await.unwrap();
        assert!(made.3.failed_over());
        made
    }

    #[tokio::test]
    async fn a_standby_waits_for_the_leaf_to_fill_up() {
        let (chain, leaf, spare, state) = chain(
            SecondaryMode::Standby,
            crate::driver::Capabilities {
                discard: true,
                write_zeroes: true,
                block_status: false,
            },
        );
        chain.write(0, data(0x21, 2)).await.unwrap();
        assert_eq!(read(secondary_driver(&chain), 0, 2).await, vec![0; 1024]);
        assert_eq!(chain.secondary().unwrap().listed_at(), None);
        // Its failures are nobody's business while it stands by.
        spare.fail_writes(5, libc::EIO);
        chain.write(2, data(0x22, 1)).await.unwrap();
        spare.fail_writes(0, 0);
        leaf.fail_writes(1, libc::ENOSPC);
        chain.write(6, data(0x23, 2)).await.unwrap();
        assert!(state.failed_over());
        assert_eq!(state.redirected_sectors(), 2);
        // Discards after the take-over zero the secondary and read as zeros.
        chain.discard(0, 1).await.unwrap();
        assert_eq!(state.redirected_sectors(), 3);
        let all = chain.read(0, IoBuf::zeroed(8 * 512)).await.unwrap();
        let sector = |n: usize| all.as_slice()[n * 512];
        assert_eq!(
            (0..8).map(sector).collect::<Vec<_>>(),
            [0, 0x21, 0x22, 0x11, 0x11, 0x11, 0x23, 0x23]
        );
        // A standby that cannot take the write over: the leaf's error stands.
        let (chain, leaf, spare, _) = chain_with_failing_standby();
        leaf.fail_writes(1, libc::ENOSPC);
        spare.fail_writes(1, libc::EIO);
        assert!(chain.write(0, data(1, 1)).await.is_err());
    }

    fn chain_with_failing_standby() -> (ImageChain, Arc<Faults>, Arc<Faults>, Arc<SecondaryState>) {
        chain(SecondaryMode::Standby, Default::default())
    }

    fn runs(redirected: &Redirected, range: Range<u64>) -> Vec<(Range<u64>, bool)> {
        redirected.split(range)
    }

    #[test]
    fn redirected_ranges_merge_and_split() {
        let mut r = Redirected::default();
        assert!(r.is_empty());
        assert_eq!(runs(&r, 0..8), vec![(0..8, false)]);
        r.insert(10..20);
        r.insert(30..40);
        r.insert(20..25);
        r.insert(5..5);
        assert_eq!(
            r.ranges.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
            vec![(10, 25), (30, 40)]
        );
        assert_eq!(
            runs(&r, 0..50),
            vec![
                (0..10, false),
                (10..25, true),
                (25..30, false),
                (30..40, true),
                (40..50, false)
            ]
        );
        assert_eq!(runs(&r, 12..14), vec![(12..14, true)]);
        assert_eq!(
            runs(&r, 24..31),
            vec![(24..25, true), (25..30, false), (30..31, true)]
        );
        assert_eq!(runs(&r, 25..30), vec![(25..30, false)]);
        // One insert spanning several ranges absorbs them.
        r.insert(0..100);
        assert_eq!(r.ranges.len(), 1);
        assert_eq!(runs(&r, 3..7), vec![(3..7, true)]);
    }
}
