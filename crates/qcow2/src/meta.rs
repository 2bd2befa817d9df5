//! The metadata of an open image and the I/O-free planner built on it.
//!
//! [`Metadata`] holds the L1 table, a bounded cache of L2 tables, the refcount table, the
//! refcount blocks it has loaded, and the allocator's state. Every operation returns either a
//! plan ([`Plan::Ready`]) or what must be loaded or prepared first ([`Plan::Load`]); executors
//! (a synchronous one in [`crate::image`], the tapdisk driver's asynchronous one) do the I/O
//! and ask again. Nothing here reads or writes a file.
//!
//! # Allocation and crash safety
//!
//! New clusters are only ever taken from fresh space past everything the file held when it
//! was opened (so they read as zeros before they are written), in chunks reserved ahead: a
//! reservation ([`Metadata::plan_reserve`]) first writes the refcounts of the whole chunk as 1
//! (refcount blocks, then the refcount table entries or a new, larger table and then the
//! header), and only then are its clusters handed out. An allocating write then needs:
//!
//! 1. the data (and whatever copy-on-write fill the cluster needs) written to its new place;
//! 2. the L2 entry, rewritten in place ([`Metadata::render_l2`]), which makes it visible
//!    (entries of one table whose data is written may go out together, in one write);
//! 3. for a cluster that replaced another (compressed, shared), the old one's refcount
//!    decremented ([`Metadata::plan_release`]).
//!
//! A missing L2 table is created before the allocation that needs it: the zeroed table,
//! then the L1 entry. At every point of this order the image is consistent: refcounts are
//! never lower than the references to a cluster, so a crash (`kill -9`) can leave leaked
//! clusters (reserved and not yet used: `qemu-img check` reports them as leaks, which it
//! allows) and never a corruption; and no entry points at data not yet written. Unused
//! reserved clusters are given back at close ([`Metadata::plan_release_pool`]).
//!
//! Executors must serialise updates that share a metadata unit: L2 updates per table, L1
//! updates, and every refcount structure change (reservation, release). Each update (or batch
//! of updates of one table) is rendered from the in-memory table at the moment it is written,
//! and published in memory only once written, so concurrent updates never undo each other on
//! disk.

use std::collections::HashMap;
use std::ops::Range;

use crate::entry::{decode_l1, Entry, COPIED, OFFSET_MASK};
use crate::error::{Qcow2Error, Result};
use crate::header::{CompressionType, Header, MAX_REFCOUNT_TABLE_BYTES};
use crate::layout::Layout;
use crate::refcount;

/// What an operation needs before it can be planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Load the L2 table at `offset` (one cluster) with [`Metadata::insert_l2`].
    L2 {
        /// Its L1 index.
        l1_index: u64,
        /// Its host offset.
        offset: u64,
    },
    /// Load the refcount block at `offset` (one cluster) with [`Metadata::insert_refblock`].
    RefBlock {
        /// Its refcount table index.
        rt_index: u64,
        /// Its host offset.
        offset: u64,
    },
    /// Reserve clusters first ([`Metadata::plan_reserve`]).
    Reserve,
    /// Create the L2 table of `l1_index` first ([`Metadata::plan_new_l2`]).
    NewL2 {
        /// The L1 index.
        l1_index: u64,
    },
}

/// A plan, or what must happen before it can be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<T> {
    /// The plan.
    Ready(T),
    /// Do this, then ask again.
    Load(Need),
}

/// Returns early with [`Plan::Load`] unless the plan is ready.
macro_rules! ready {
    ($plan:expr) => {
        match $plan {
            Plan::Ready(value) => value,
            Plan::Load(need) => return Ok(Plan::Load(need)),
        }
    };
}

/// How a run of guest bytes is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// From the file at this host offset.
    Data {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// Zeros.
    Zero,
    /// Not in this image: from the backing file (zeros without one).
    Absent,
    /// From a compressed cluster: decompress it, then take the run from `within`.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Compressed bytes to read.
        len: u64,
        /// Offset of the run's first byte within the decompressed cluster.
        within: u64,
    },
}

/// A run of a read, relative to the start of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset from the start of the request.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where its bytes come from.
    pub kind: RunKind,
}

/// What a part of a newly written cluster not covered by the request is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Zeros.
    Zeros,
    /// The same guest bytes read from the backing chain.
    Below,
    /// The same bytes of the old host cluster at this offset.
    Own {
        /// Old host cluster.
        host: u64,
    },
    /// The same bytes of the old, compressed cluster.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Compressed bytes.
        len: u64,
    },
}

/// A host range whose refcount must be decremented (each cluster it touches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// First byte.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

/// An allocating (or metadata-changing) write of part of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Guest cluster index.
    pub cluster: u64,
    /// Host cluster the data goes to.
    pub host: u64,
    /// Bytes of the cluster to write: the request plus `head` and `tail`.
    pub write: Range<u64>,
    /// Bytes before the request and how to fill them.
    pub head: Option<(Range<u64>, Fill)>,
    /// Bytes after the request and how to fill them.
    pub tail: Option<(Range<u64>, Fill)>,
    /// The L2 entry to write once the data is written, or `None` when it does not change.
    pub entry: Option<L2Update>,
    /// Host ranges to dereference after the entry is written.
    pub release: Vec<Release>,
}

/// A new value for one L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Update {
    /// L1 index of the table.
    pub l1_index: u64,
    /// Index in the table.
    pub l2_index: u64,
    /// The entry.
    pub entry: Entry,
}

/// Bytes to write at a file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaWrite {
    /// File offset.
    pub offset: u64,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// How to create a missing L2 table: write `table` (zeros), then `l1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewL2 {
    /// L1 index.
    pub l1_index: u64,
    /// The zeroed table at its new place.
    pub table: MetaWrite,
    /// The L1 entry's new word.
    pub l1_word: u64,
}

/// A reservation of clusters: set the file length, write each phase in order (the writes of
/// one phase may run concurrently), then [`Metadata::commit_reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The file must be at least this long.
    pub extend_to: u64,
    /// Refcount blocks, then refcount table entries (or the new table).
    pub phases: Vec<Vec<MetaWrite>>,
    /// A new refcount table: (offset, clusters) for the header, after the phases.
    pub new_table: Option<(u64, u32)>,
    /// The clusters handed out by this reservation.
    pub pool: Range<u64>,
    /// Refcount table entries added (index, block offset).
    new_blocks: Vec<(u64, u64)>,
    /// New refcount blocks' contents, kept in memory at commit.
    new_block_bytes: Vec<Vec<u8>>,
    /// The first cluster past the reservation.
    end: u64,
}

/// The refcount updates of a release, and the host clusters it freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasePlan {
    /// Refcount block writes.
    pub writes: Vec<MetaWrite>,
    /// Host clusters whose refcount reached zero (their space may be punched out).
    pub freed: Vec<u64>,
}

/// How to zero a whole cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZeroPlan {
    /// It already reads as wanted.
    Nothing,
    /// The format cannot express it: write zeros through the write path.
    WriteZeros,
    /// Write this entry, then release.
    Update {
        /// The new entry.
        update: L2Update,
        /// Host ranges to dereference afterwards.
        release: Vec<Release>,
    },
}

#[derive(Debug)]
struct L2Table {
    offset: u64,
    words: Vec<u64>,
    /// Last use, for eviction.
    used: u64,
}

/// Metadata of one open image.
#[derive(Debug)]
pub struct Metadata {
    layout: Layout,
    compression: CompressionType,
    l1: Vec<u64>,
    l2: HashMap<u64, L2Table>,
    l2_capacity: usize,
    clock: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    refcount_table: Vec<u64>,
    refblocks: HashMap<u64, Vec<u8>>,
    /// First cluster never used: everything from here on is fresh.
    hwm: u64,
    /// Reserved clusters (refcount 1 on disk, not referenced).
    pool: Range<u64>,
    /// Metadata the planner must never hand out or let data overwrite: header cluster,
    /// L1 table, refcount table.
    protected: Vec<Range<u64>>,
}

/// Bytes of L2 tables kept in memory at most.
const L2_CACHE_BYTES: u64 = 64 << 20;
/// Longest write of L2 units that [`Metadata::render_l2`] renders for a batch of updates.
pub const L2_WRITE_SPAN: u64 = 64 << 10;
/// Bytes of clusters reserved at once.
const RESERVE_BYTES: u64 = 32 << 20;

fn be64_at(bytes: &[u8], index: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_be_bytes(word)
}

fn to_index(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl Metadata {
    /// The metadata of the image whose `header` was parsed, with its L1 table
    /// (`l1_size * 8` bytes) and refcount table (its clusters) as read, in a file of
    /// `file_len` bytes.
    pub fn open(header: &Header, l1: &[u8], refcount_table: &[u8], file_len: u64) -> Result<Self> {
        let layout = Layout::of(header);
        let cs = layout.cluster_size();
        let l1_len = to_index(u64::from(header.l1_size));
        if l1.len() < l1_len * 8 {
            return Err(Qcow2Error::Truncated {
                structure: "L1 table",
                offset: header.l1_table_offset,
                needed: u64::from(header.l1_size) * 8,
                available: l1.len() as u64,
            });
        }
        let l1: Vec<u64> = (0..l1_len).map(|i| be64_at(l1, i)).collect();
        for (i, word) in l1.iter().enumerate() {
            decode_l1(*word, &layout, header.l1_table_offset + i as u64 * 8)?;
        }
        let table_len = refcount_table.len() / 8;
        let table: Vec<u64> = (0..table_len).map(|i| be64_at(refcount_table, i)).collect();
        for (i, word) in table.iter().enumerate() {
            if word & !OFFSET_MASK != 0 || word % cs != 0 {
                return Err(Qcow2Error::field(
                    "refcount table",
                    "entry",
                    header.refcount_table_offset + i as u64 * 8,
                    format!("{word:#018x} is not a cluster-aligned refcount block offset"),
                ));
            }
        }
        let table_bytes = u64::from(header.refcount_table_clusters) * cs;
        let protected = vec![
            0..cs,
            header.l1_table_offset..header.l1_table_offset + (u64::from(header.l1_size) * 8).max(1),
            header.refcount_table_offset..header.refcount_table_offset + table_bytes,
        ];
        let ends = protected.iter().map(|r| r.end.div_ceil(cs));
        let hwm = ends.fold(file_len.div_ceil(cs), u64::max);
        Ok(Self {
            layout,
            compression: header.compression_type(),
            l1,
            l2: HashMap::new(),
            l2_capacity: to_index((L2_CACHE_BYTES / cs).max(16)),
            clock: 0,
            refcount_table_offset: header.refcount_table_offset,
            refcount_table_clusters: header.refcount_table_clusters,
            refcount_table: table,
            refblocks: HashMap::new(),
            hwm,
            pool: hwm..hwm,
            protected,
        })
    }

    /// The image's geometry.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How compressed clusters are compressed.
    pub fn compression(&self) -> CompressionType {
        self.compression
    }

    /// L2 tables in memory.
    pub fn cached_l2_tables(&self) -> usize {
        self.l2.len()
    }

    /// Reserved, unused clusters.
    pub fn pool_len(&self) -> u64 {
        self.pool.end - self.pool.start
    }

    /// Number of guest clusters allocated in the L2 tables in memory (statistics).
    fn l2_table(&mut self, l1_index: u64) -> Result<Plan<&mut L2Table>> {
        let word = self.l1.get(to_index(l1_index)).copied().unwrap_or(0);
        let at = self.layout.l1_table_offset + l1_index * 8;
        let Some((offset, _)) = decode_l1(word, &self.layout, at)? else {
            return Ok(Plan::Load(Need::NewL2 { l1_index }));
        };
        self.clock += 1;
        let clock = self.clock;
        match self.l2.get_mut(&l1_index) {
            Some(table) if table.offset == offset => {
                table.used = clock;
                Ok(Plan::Ready(table))
            }
            _ => Ok(Plan::Load(Need::L2 { l1_index, offset })),
        }
    }

    /// Adds a loaded L2 table (one cluster read at `offset`), evicting the least recently
    /// used ones beyond the cache's capacity.
    pub fn insert_l2(&mut self, l1_index: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        let words = to_index(self.layout.cluster_size() / 8);
        if bytes.len() < words * 8 {
            return Err(Qcow2Error::Truncated {
                structure: "L2 table",
                offset,
                needed: words as u64 * 8,
                available: bytes.len() as u64,
            });
        }
        self.clock += 1;
        if let Some(table) = self.l2.get_mut(&l1_index) {
            if table.offset == offset {
                // What is in memory is never older than the disk: keep it.
                table.used = self.clock;
                return Ok(());
            }
        }
        if self.l2.len() >= self.l2_capacity {
            let mut uses: Vec<u64> = self.l2.values().map(|t| t.used).collect();
            uses.sort_unstable();
            let cutoff = uses[uses.len() / 4];
            self.l2.retain(|_, t| t.used > cutoff);
        }
        self.clock += 1;
        self.l2.insert(
            l1_index,
            L2Table {
                offset,
                words: (0..words).map(|i| be64_at(bytes, i)).collect(),
                used: self.clock,
            },
        );
        Ok(())
    }

    /// The L2 entry of guest cluster `cluster`.
    pub fn entry(&mut self, cluster: u64) -> Result<Plan<Entry>> {
        let (l1_index, l2_index) = self.layout.l1_l2_index(cluster);
        let layout = self.layout;
        let table = match self.l2_table(l1_index)? {
            Plan::Ready(table) => table,
            Plan::Load(Need::NewL2 { .. }) => return Ok(Plan::Ready(Entry::UNALLOCATED)),
            Plan::Load(need) => return Ok(Plan::Load(need)),
        };
        let n = layout.l2_entry_words();
        let first = to_index(l2_index * n);
        let words = [
            table.words[first],
            if n == 2 { table.words[first + 1] } else { 0 },
        ];
        let at = table.offset + l2_index * n * 8;
        let entry = Entry::decode(words, &layout, at)?;
        self.check_host(&entry, at)?;
        Ok(Plan::Ready(entry))
    }

    /// Refuses entries that point into the header, the L1 table or the refcount table.
    fn check_host(&self, entry: &Entry, at: u64) -> Result<()> {
        let range = match *entry {
            Entry::Standard { host: Some(h), .. } => h..h + self.layout.cluster_size(),
            Entry::Compressed { host, len } => host..host + len,
            Entry::Standard { host: None, .. } => return Ok(()),
        };
        if let Some(hit) = self
            .protected
            .iter()
            .find(|p| p.start < range.end && range.start < p.end)
        {
            return Err(Qcow2Error::field(
                "L2 table",
                "entry",
                at,
                format!(
                    "cluster at {:#x} overlaps metadata at {:#x}..{:#x}",
                    range.start, hit.start, hit.end
                ),
            ));
        }
        Ok(())
    }

    /// How the guest bytes `[offset, offset + len)` are read, as runs in order (adjacent
    /// runs of the same kind merged where their host bytes are contiguous).
    pub fn map(&mut self, offset: u64, len: u64) -> Result<Plan<Vec<Run>>> {
        let cs = self.layout.cluster_size();
        let sub = self.layout.subcluster_size();
        let mut runs: Vec<Run> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let cluster = at / cs;
            let cluster_start = cluster * cs;
            let piece_end = end.min(cluster_start + cs);
            let entry = ready!(self.entry(cluster)?);
            let mut pos = at;
            while pos < piece_end {
                let within = pos - cluster_start;
                let (kind, stop) = match entry {
                    Entry::Compressed { host, len } => {
                        (RunKind::Compressed { host, len, within }, piece_end)
                    }
                    Entry::Standard {
                        host, alloc, zero, ..
                    } => {
                        let index = within / sub;
                        let bit = 1u32 << index;
                        let stop = piece_end.min(cluster_start + (index + 1) * sub);
                        let kind = if zero & bit != 0 {
                            RunKind::Zero
                        } else if alloc & bit != 0 {
                            RunKind::Data {
                                host: host.unwrap_or(0) + within,
                            }
                        } else {
                            RunKind::Absent
                        };
                        (kind, stop)
                    }
                };
                let run = Run {
                    offset: pos - offset,
                    len: stop - pos,
                    kind,
                };
                match (runs.last_mut(), kind) {
                    (Some(last), RunKind::Data { host }) if matches!(last.kind, RunKind::Data { host: h } if h + last.len == host) =>
                    {
                        last.len += run.len;
                    }
                    (Some(last), RunKind::Zero | RunKind::Absent) if last.kind == kind => {
                        last.len += run.len;
                    }
                    _ => runs.push(run),
                }
                pos = stop;
            }
            at = piece_end;
        }
        Ok(Plan::Ready(runs))
    }

    /// Where guest bytes `[offset, offset + len)` are read from when they lie in one cluster
    /// whose L2 table is in memory and whose entry maps all of them to data in this file
    /// (not zeros, not compressed, not absent): the host offset of `offset`. A read's fast
    /// path: it never asks for a load, and `None` (anything else, an invalid entry included)
    /// sends the read to [`Metadata::map`], which answers every case and reports errors.
    pub fn data_in_cluster(&mut self, offset: u64, len: u64) -> Option<u64> {
        let cs = self.layout.cluster_size();
        let (cluster, within) = (offset / cs, offset % cs);
        if len == 0 || within + len > cs {
            return None;
        }
        match self.entry(cluster) {
            Ok(Plan::Ready(Entry::Standard {
                host: Some(host),
                alloc,
                zero,
                ..
            })) => {
                let (_, _, touched) = self.touched(within, len);
                (alloc & touched == touched && zero & touched == 0).then_some(host + within)
            }
            _ => None,
        }
    }

    /// Subcluster mask of bytes `[start, start + len)` of a cluster.
    fn touched(&self, start: u64, len: u64) -> (u64, u64, u32) {
        let sub = self.layout.subcluster_size();
        let (first, last) = (start / sub, (start + len - 1) / sub);
        let mut mask = 0u32;
        for i in first..=last {
            mask |= 1 << i;
        }
        (first, last, mask)
    }

    /// Where bytes `[start, start + len)` of guest cluster `cluster` can be written in place
    /// (the host offset of `start`), or `None` when the write needs
    /// [`Metadata::plan_allocation`].
    pub fn in_place(&mut self, cluster: u64, start: u64, len: u64) -> Result<Plan<Option<u64>>> {
        let entry = ready!(self.entry(cluster)?);
        let (_, _, touched) = self.touched(start, len);
        Ok(Plan::Ready(match entry {
            Entry::Standard {
                host: Some(host),
                copied: true,
                alloc,
                ..
            } if alloc & touched == touched => Some(host + start),
            _ => None,
        }))
    }

    fn take_cluster(&mut self) -> Option<u64> {
        if self.pool.start == self.pool.end {
            return None;
        }
        let cluster = self.pool.start;
        self.pool.start += 1;
        Some(cluster * self.layout.cluster_size())
    }

    /// How subcluster `index` of an entry with these bits reads, as a fill.
    fn fill_of(&self, alloc: u32, zero: u32, index: u64, host: Option<u64>) -> Option<Fill> {
        let bit = 1u32 << index;
        if alloc & bit != 0 {
            host.map(|host| Fill::Own { host })
        } else if zero & bit != 0 || !self.layout.has_backing {
            Some(Fill::Zeros)
        } else {
            Some(Fill::Below)
        }
    }

    /// Plans writing bytes `[start, start + len)` of guest cluster `cluster` where it cannot
    /// be written in place. Takes a new host cluster from the reserved pool when one is
    /// needed. Callers hold the cluster's allocation lock from here until the entry is
    /// published, so that one cluster is never allocated twice.
    pub fn plan_allocation(
        &mut self,
        cluster: u64,
        start: u64,
        len: u64,
    ) -> Result<Plan<Allocation>> {
        let cs = self.layout.cluster_size();
        let sub = self.layout.subcluster_size();
        let (l1_index, l2_index) = self.layout.l1_l2_index(cluster);
        let l1_word = self.l1.get(to_index(l1_index)).copied().unwrap_or(0);
        let entry = ready!(self.entry(cluster)?);
        if l1_word & OFFSET_MASK == 0 {
            return Ok(Plan::Load(Need::NewL2 { l1_index }));
        }
        if l1_word & COPIED == 0 {
            return Err(Qcow2Error::unsupported(format!(
                "writing through the L2 table of L1 entry {l1_index}, which is shared (refcount not one)"
            )));
        }
        let end = start + len;
        let (first, last, touched) = self.touched(start, len);
        let all = Entry::all_subclusters(&self.layout);
        let update = |entry| {
            Some(L2Update {
                l1_index,
                l2_index,
                entry,
            })
        };
        let span = |from: u64, to: u64, fill: Option<Fill>| {
            fill.filter(|_| from < to).map(|fill| (from..to, fill))
        };
        match entry {
            // An existing host cluster of ours: fill partly covered subclusters that hold no
            // data, then mark the touched subclusters allocated.
            Entry::Standard {
                host: Some(host),
                copied: true,
                alloc,
                zero,
            } => {
                let head_fill = (alloc & (1 << first) == 0)
                    .then(|| self.fill_of(alloc, zero, first, None))
                    .flatten();
                let tail_fill = (alloc & (1 << last) == 0)
                    .then(|| self.fill_of(alloc, zero, last, None))
                    .flatten();
                let head = span(first * sub, start, head_fill);
                let tail = span(end, ((last + 1) * sub).min(cs), tail_fill);
                let new = Entry::Standard {
                    host: Some(host),
                    copied: true,
                    alloc: alloc | touched,
                    zero: zero & !touched,
                };
                let write = head.as_ref().map_or(start, |h| h.0.start)
                    ..tail.as_ref().map_or(end, |t| t.0.end);
                Ok(Plan::Ready(Allocation {
                    cluster,
                    host,
                    write,
                    head,
                    tail,
                    entry: (new != entry).then_some(()).and(update(new)),
                    release: Vec::new(),
                }))
            }
            Entry::Standard {
                host: Some(_),
                copied: false,
                ..
            } if self.layout.extended_l2 => Err(Qcow2Error::unsupported(format!(
                "writing guest cluster {cluster}, shared with another reference, in an image with extended L2 entries"
            ))),
            // A shared cluster or a compressed one: copy it whole to a new cluster.
            Entry::Standard {
                host: Some(_),
                copied: false,
                ..
            }
            | Entry::Compressed { .. } => {
                let Some(host) = self.take_cluster() else {
                    return Ok(Plan::Load(Need::Reserve));
                };
                let (fill, release) = match entry {
                    Entry::Compressed { host, len } => {
                        (Fill::Compressed { host, len }, Release { host, len })
                    }
                    Entry::Standard {
                        host: old, alloc, ..
                    } => {
                        let old = old.unwrap_or(0);
                        let fill = if alloc != 0 {
                            Fill::Own { host: old }
                        } else {
                            Fill::Zeros
                        };
                        (fill, Release { host: old, len: cs })
                    }
                };
                Ok(Plan::Ready(Allocation {
                    cluster,
                    host,
                    write: 0..cs,
                    head: span(0, start, Some(fill)),
                    tail: span(end, cs, Some(fill)),
                    entry: update(Entry::Standard {
                        host: Some(host),
                        copied: true,
                        alloc: all,
                        zero: 0,
                    }),
                    release: vec![release],
                }))
            }
            // No host cluster: a fresh one, whose unwritten bytes already read as zeros.
            Entry::Standard {
                host: None,
                alloc: _,
                zero,
                ..
            } => {
                let Some(host) = self.take_cluster() else {
                    return Ok(Plan::Load(Need::Reserve));
                };
                let fresh_fill = |fill: Option<Fill>| fill.filter(|f| *f != Fill::Zeros);
                let head = span(first * sub, start, fresh_fill(self.fill_of(0, zero, first, None)));
                let tail = span(
                    end,
                    ((last + 1) * sub).min(cs),
                    fresh_fill(self.fill_of(0, zero, last, None)),
                );
                let write = head.as_ref().map_or(start, |h| h.0.start)
                    ..tail.as_ref().map_or(end, |t| t.0.end);
                Ok(Plan::Ready(Allocation {
                    cluster,
                    host,
                    write,
                    head,
                    tail,
                    entry: update(Entry::Standard {
                        host: Some(host),
                        copied: true,
                        alloc: touched,
                        zero: zero & !touched,
                    }),
                    release: Vec::new(),
                }))
            }
        }
    }

    /// Renders the writes that put `updates` (entries of one L2 table, applied in order: a
    /// later update of an entry wins) on disk: the metadata units holding them, with those
    /// entries changed and every other one as currently published. Units less than
    /// [`L2_WRITE_SPAN`] apart are written as one range, the unchanged units between them
    /// included, so any batch of updates to a table of 64 KiB or less is one write. The
    /// caller holds the table's write lock until it has written every unit and called
    /// [`Metadata::publish_l2`] for each update.
    pub fn render_l2(&mut self, updates: &[L2Update]) -> Result<Plan<Vec<MetaWrite>>> {
        let Some(first) = updates.first() else {
            return Ok(Plan::Ready(Vec::new()));
        };
        let l1_index = first.l1_index;
        if let Some(other) = updates.iter().find(|u| u.l1_index != l1_index) {
            return Err(Qcow2Error::field(
                "L2 table",
                "l1_index",
                self.layout.l1_table_offset + other.l1_index * 8,
                format!(
                    "one L2 write holds entries of tables {l1_index} and {}",
                    other.l1_index
                ),
            ));
        }
        let layout = self.layout;
        let unit = layout.meta_unit();
        let n = layout.l2_entry_words();
        let table = ready!(self.l2_table(l1_index)?);
        // (word index, new word) in the order given, and the units they fall in.
        let mut changes = Vec::with_capacity(updates.len() * to_index(n));
        let mut units = Vec::with_capacity(updates.len());
        for update in updates {
            let own = update.l2_index * n;
            let new = update.entry.encode(&layout);
            changes.push((own, new[0]));
            if n == 2 {
                changes.push((own + 1, new[1]));
            }
            units.push(own * 8 / unit);
        }
        units.sort_unstable();
        units.dedup();
        // Spans of units [first, last], each at most L2_WRITE_SPAN bytes.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for index in units {
            match spans.last_mut() {
                Some((first, last)) if (index + 1 - *first) * unit <= L2_WRITE_SPAN => {
                    *last = index
                }
                _ => spans.push((index, index)),
            }
        }
        let per_unit = unit / 8;
        let writes = spans
            .into_iter()
            .map(|(first, last)| {
                let words = first * per_unit..(last + 1) * per_unit;
                let mut span = table.words[to_index(words.start)..to_index(words.end)].to_vec();
                for (index, word) in &changes {
                    if words.contains(index) {
                        span[to_index(index - words.start)] = *word;
                    }
                }
                MetaWrite {
                    offset: table.offset + first * unit,
                    bytes: span.iter().flat_map(|w| w.to_be_bytes()).collect(),
                }
            })
            .collect();
        Ok(Plan::Ready(writes))
    }

    /// Publishes a written L2 entry in memory.
    pub fn publish_l2(&mut self, update: &L2Update) {
        let layout = self.layout;
        if let Some(table) = self.l2.get_mut(&update.l1_index) {
            let n = layout.l2_entry_words();
            let first = to_index(update.l2_index * n);
            let words = update.entry.encode(&layout);
            table.words[first] = words[0];
            if n == 2 {
                table.words[first + 1] = words[1];
            }
        }
    }

    /// Plans creating the L2 table of `l1_index` (`None` when it exists meanwhile). The
    /// caller serialises table creation and L1 writes, writes `table`, then the L1 unit
    /// from [`Metadata::render_l1`], then calls [`Metadata::publish_new_l2`].
    pub fn plan_new_l2(&mut self, l1_index: u64) -> Result<Plan<Option<NewL2>>> {
        if l1_index >= self.l1.len() as u64 {
            return Err(Qcow2Error::field(
                "L1 table",
                "l1_size",
                self.layout.l1_table_offset,
                format!("no L1 entry {l1_index} in a table of {}", self.l1.len()),
            ));
        }
        if self.l1[to_index(l1_index)] & OFFSET_MASK != 0 {
            return Ok(Plan::Ready(None));
        }
        let Some(host) = self.take_cluster() else {
            return Ok(Plan::Load(Need::Reserve));
        };
        Ok(Plan::Ready(Some(NewL2 {
            l1_index,
            table: MetaWrite {
                offset: host,
                bytes: vec![0; to_index(self.layout.cluster_size())],
            },
            l1_word: host | COPIED,
        })))
    }

    /// The L1 unit holding entry `index`, with that entry set to `word`.
    pub fn render_l1(&self, index: u64, word: u64) -> MetaWrite {
        let unit = self.layout.meta_unit();
        let byte = index * 8;
        let unit_start = byte / unit * unit;
        let first = to_index(unit_start / 8);
        let mut bytes = Vec::with_capacity(to_index(unit));
        for i in first..first + to_index(unit / 8) {
            let value = if i == to_index(index) {
                word
            } else {
                self.l1.get(i).copied().unwrap_or(0)
            };
            bytes.extend_from_slice(&value.to_be_bytes());
        }
        MetaWrite {
            offset: self.layout.l1_table_offset + unit_start,
            bytes,
        }
    }

    /// Publishes a created L2 table (all zeros) and its L1 entry.
    pub fn publish_new_l2(&mut self, new: &NewL2) {
        let offset = new.l1_word & OFFSET_MASK;
        self.l1[to_index(new.l1_index)] = new.l1_word;
        // Every other entry of the table is zero, as written.
        let _ = self.insert_l2(new.l1_index, offset, &new.table.bytes);
    }

    /// Plans zeroing (with `deallocate`, discarding) all of guest cluster `cluster`.
    pub fn plan_zero(&mut self, cluster: u64, deallocate: bool) -> Result<Plan<ZeroPlan>> {
        let layout = self.layout;
        let (l1_index, l2_index) = layout.l1_l2_index(cluster);
        let entry = ready!(self.entry(cluster)?);
        let all = Entry::all_subclusters(&layout);
        let zero_flag_possible = layout.v3;
        let mut release = Vec::new();
        let target = if !layout.has_backing && (deallocate || !zero_flag_possible) {
            // Unallocated reads as zeros without a backing file.
            if let Entry::Standard {
                host: Some(host), ..
            } = entry
            {
                release.push(Release {
                    host,
                    len: layout.cluster_size(),
                });
            }
            Entry::UNALLOCATED
        } else if !zero_flag_possible {
            return Ok(Plan::Ready(ZeroPlan::WriteZeros));
        } else {
            // The zero flag; keep a host cluster of ours as preallocation unless discarding.
            let keep = match entry {
                Entry::Standard {
                    host: Some(host),
                    copied,
                    ..
                } => {
                    if deallocate || !copied {
                        release.push(Release {
                            host,
                            len: layout.cluster_size(),
                        });
                        None
                    } else {
                        Some(host)
                    }
                }
                _ => None,
            };
            Entry::Standard {
                host: keep,
                copied: keep.is_some(),
                alloc: 0,
                zero: all,
            }
        };
        if let Entry::Compressed { host, len } = entry {
            release.push(Release { host, len });
        }
        if entry == target || (target.is_unallocated() && entry.is_unallocated()) {
            return Ok(Plan::Ready(ZeroPlan::Nothing));
        }
        if self.l1.get(to_index(l1_index)).copied().unwrap_or(0) & OFFSET_MASK == 0 {
            return Ok(Plan::Load(Need::NewL2 { l1_index }));
        }
        Ok(Plan::Ready(ZeroPlan::Update {
            update: L2Update {
                l1_index,
                l2_index,
                entry: target,
            },
            release,
        }))
    }

    fn refblock(&self, rt_index: u64) -> Result<Plan<()>> {
        let offset = self
            .refcount_table
            .get(to_index(rt_index))
            .copied()
            .unwrap_or(0);
        if offset == 0 {
            return Err(Qcow2Error::field(
                "refcount table",
                "entry",
                self.refcount_table_offset + rt_index * 8,
                format!(
                    "no refcount block covers host clusters of refcount table entry {rt_index}"
                ),
            ));
        }
        if self.refblocks.contains_key(&rt_index) {
            Ok(Plan::Ready(()))
        } else {
            Ok(Plan::Load(Need::RefBlock { rt_index, offset }))
        }
    }

    /// Adds a loaded refcount block.
    pub fn insert_refblock(&mut self, rt_index: u64, bytes: &[u8]) {
        if self.refblocks.len() >= 256 {
            self.refblocks.clear();
        }
        let cs = to_index(self.layout.cluster_size());
        let mut block = bytes[..cs.min(bytes.len())].to_vec();
        block.resize(cs, 0);
        self.refblocks.insert(rt_index, block);
    }

    /// Renders the metadata units of refcount block `rt_index` covering entries
    /// `[first, last]`.
    fn render_refblock(&self, rt_index: u64, first: u64, last: u64) -> Vec<MetaWrite> {
        let Some(block) = self.refblocks.get(&rt_index) else {
            return Vec::new();
        };
        let offset = self.refcount_table[to_index(rt_index)];
        let unit = self.layout.meta_unit();
        let bits = self.layout.refcount_bits();
        let (from, to) = (first * bits / 8 / unit, (last * bits / 8) / unit);
        (from..=to)
            .map(|u| MetaWrite {
                offset: offset + u * unit,
                bytes: block[to_index(u * unit)..to_index((u + 1) * unit)].to_vec(),
            })
            .collect()
    }

    /// Plans dereferencing `releases` (each cluster they touch loses one reference). The
    /// caller serialises refcount changes, writes the units, and may then punch out the
    /// freed clusters.
    pub fn plan_release(&mut self, releases: &[Release]) -> Result<Plan<ReleasePlan>> {
        let cs = self.layout.cluster_size();
        let rbe = self.layout.refblock_entries();
        let order = self.layout.refcount_order;
        let clusters = |r: &Release| (r.host / cs)..=((r.host + r.len.max(1) - 1) / cs);
        for release in releases {
            for cluster in clusters(release) {
                ready!(self.refblock(cluster / rbe)?);
            }
        }
        let mut touched: Vec<(u64, u64)> = Vec::new();
        let mut freed = Vec::new();
        for release in releases {
            for cluster in clusters(release) {
                let (rt_index, index) = (cluster / rbe, cluster % rbe);
                let Some(block) = self.refblocks.get_mut(&rt_index) else {
                    continue;
                };
                let count = refcount::get(block, index, order);
                if count == 0 {
                    return Err(Qcow2Error::field(
                        "refcount block",
                        "entry",
                        self.refcount_table[to_index(rt_index)] + index * (1 << order) / 8,
                        format!("host cluster {cluster} is referenced but its refcount is 0"),
                    ));
                }
                refcount::set(block, index, order, count - 1);
                if count == 1 {
                    freed.push(cluster * cs);
                }
                touched.push((rt_index, index));
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let mut writes: Vec<MetaWrite> = Vec::new();
        for (rt_index, index) in touched {
            for write in self.render_refblock(rt_index, index, index) {
                if !writes.iter().any(|w| w.offset == write.offset) {
                    writes.push(write);
                } else if let Some(w) = writes.iter_mut().find(|w| w.offset == write.offset) {
                    *w = write;
                }
            }
        }
        Ok(Plan::Ready(ReleasePlan { writes, freed }))
    }

    /// Plans reserving at least `want` clusters (and at least a chunk's worth) at the high
    /// water mark, with the refcount blocks and, if the refcount table is full, the larger
    /// table they need. The caller serialises refcount changes, runs the phases in order,
    /// rewrites the header fields when there is a new table, then calls
    /// [`Metadata::commit_reserve`] (and releases the old table's clusters).
    pub fn plan_reserve(&mut self, want: u64) -> Result<Plan<Reservation>> {
        let cs = self.layout.cluster_size();
        let rbe = self.layout.refblock_entries();
        let order = self.layout.refcount_order;
        let want = want.max((RESERVE_BYTES / cs).clamp(16, 4096));
        let mut start = self.hwm;
        'placement: loop {
            let rt_len = self.refcount_table.len() as u64;
            let (mut blocks, mut table_clusters) = (0u64, 0u64);
            let (end, missing) = loop {
                let end = start + blocks + table_clusters + want;
                let (first_rt, last_rt) = (start / rbe, (end - 1) / rbe);
                let new_table = if last_rt >= rt_len {
                    let entries = (last_rt + 1).max(rt_len) * 2;
                    (entries * 8).div_ceil(cs)
                } else {
                    0
                };
                // Checked before the blocks are counted: far placements (a damaged image's
                // offsets) would make that count, and the table, enormous.
                if new_table * cs > MAX_REFCOUNT_TABLE_BYTES {
                    return Err(Qcow2Error::unsupported(format!(
                        "growing the refcount table past 8 MiB ({new_table} clusters) to address host cluster {end}"
                    )));
                }
                let missing: Vec<u64> = (first_rt..=last_rt)
                    .filter(|i| *i >= rt_len || self.refcount_table[to_index(*i)] == 0)
                    .collect();
                if missing.len() as u64 == blocks && new_table == table_clusters {
                    break (end, missing);
                }
                blocks = missing.len() as u64;
                table_clusters = new_table;
            };
            // Existing blocks over the range must be loaded, and must count nothing there
            // (a reference past the high water mark would be handed out twice). The next
            // try starts after the last cluster found in use, so a block full of counts
            // (a damaged image) costs one try, not one per cluster.
            for rt_index in start / rbe..=(end - 1) / rbe {
                if missing.contains(&rt_index) {
                    continue;
                }
                ready!(self.refblock(rt_index)?);
                let block = &self.refblocks[&rt_index];
                let lo = start.max(rt_index * rbe);
                let hi = end.min((rt_index + 1) * rbe);
                if let Some(used) = (lo..hi)
                    .rev()
                    .find(|c| refcount::get(block, c % rbe, order) != 0)
                {
                    start = used + 1;
                    continue 'placement;
                }
            }
            // Place the new blocks, then the table, then the pool.
            let new_blocks: Vec<(u64, u64)> = missing
                .iter()
                .enumerate()
                .map(|(i, rt)| (*rt, (start + i as u64) * cs))
                .collect();
            let table_at = start + blocks;
            let pool = table_at + table_clusters..end;
            let mut block_writes = Vec::new();
            let mut new_block_bytes = Vec::new();
            for (rt_index, offset) in &new_blocks {
                let mut block = vec![0u8; to_index(cs)];
                let lo = start.max(rt_index * rbe);
                let hi = end.min((rt_index + 1) * rbe);
                for cluster in lo..hi {
                    refcount::set(&mut block, cluster % rbe, order, 1);
                }
                block_writes.push(MetaWrite {
                    offset: *offset,
                    bytes: block.clone(),
                });
                new_block_bytes.push(block);
            }
            for rt_index in start / rbe..=(end - 1) / rbe {
                if missing.contains(&rt_index) {
                    continue;
                }
                let lo = start.max(rt_index * rbe);
                let hi = end.min((rt_index + 1) * rbe);
                if let Some(block) = self.refblocks.get_mut(&rt_index) {
                    for cluster in lo..hi {
                        refcount::set(block, cluster % rbe, order, 1);
                    }
                }
                block_writes.extend(self.render_refblock(rt_index, lo % rbe, (hi - 1) % rbe));
            }
            let mut phases = vec![block_writes];
            let mut table = self.refcount_table.clone();
            for (rt_index, offset) in &new_blocks {
                let i = to_index(*rt_index);
                if table.len() <= i {
                    table.resize(i + 1, 0);
                }
                table[i] = *offset;
            }
            let new_table = if table_clusters > 0 {
                let mut bytes = vec![0u8; to_index(table_clusters * cs)];
                for (i, word) in table.iter().enumerate() {
                    bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_be_bytes());
                }
                phases.push(vec![MetaWrite {
                    offset: table_at * cs,
                    bytes,
                }]);
                Some((
                    table_at * cs,
                    u32::try_from(table_clusters).unwrap_or(u32::MAX),
                ))
            } else {
                let unit = self.layout.meta_unit();
                let mut units: Vec<u64> = new_blocks.iter().map(|(rt, _)| rt * 8 / unit).collect();
                units.dedup();
                phases.push(
                    units
                        .into_iter()
                        .map(|u| {
                            let first = to_index(u * unit / 8);
                            let mut bytes = Vec::with_capacity(to_index(unit));
                            for i in first..first + to_index(unit / 8) {
                                let word = table.get(i).copied().unwrap_or(0);
                                bytes.extend_from_slice(&word.to_be_bytes());
                            }
                            MetaWrite {
                                offset: self.refcount_table_offset + u * unit,
                                bytes,
                            }
                        })
                        .collect(),
                );
                None
            };
            return Ok(Plan::Ready(Reservation {
                extend_to: end * cs,
                phases,
                new_table,
                pool,
                new_blocks,
                new_block_bytes,
                end,
            }));
        }
    }

    /// Publishes a written reservation. With a new refcount table, returns the release of the
    /// old table's clusters, which the caller plans with [`Metadata::plan_release`] once the
    /// header points to the new one.
    pub fn commit_reserve(&mut self, reservation: Reservation) -> Option<Release> {
        let cs = self.layout.cluster_size();
        for ((rt_index, offset), bytes) in reservation
            .new_blocks
            .iter()
            .zip(reservation.new_block_bytes)
        {
            let i = to_index(*rt_index);
            if self.refcount_table.len() <= i {
                self.refcount_table.resize(i + 1, 0);
            }
            self.refcount_table[i] = *offset;
            self.refblocks.insert(*rt_index, bytes);
        }
        self.hwm = reservation.end;
        // Whatever was left in the old pool stays reserved; the new pool follows it when
        // they touch, else the old remainder is simply leaked until close.
        if self.pool.end == reservation.pool.start {
            self.pool.end = reservation.pool.end;
        } else {
            self.pool = reservation.pool;
        }
        reservation.new_table.map(|(offset, clusters)| {
            let old = Release {
                host: self.refcount_table_offset,
                len: u64::from(self.refcount_table_clusters) * cs,
            };
            let table_entries = to_index(u64::from(clusters) * cs / 8);
            self.refcount_table.resize(table_entries, 0);
            self.refcount_table_offset = offset;
            self.refcount_table_clusters = clusters;
            self.protected[2] = offset..offset + u64::from(clusters) * cs;
            old
        })
    }

    /// Plans giving back the reserved clusters nobody used (at close): their refcounts set
    /// to zero, and the length the file may be truncated to when they were its tail.
    pub fn plan_release_pool(&mut self) -> Result<Plan<(Vec<MetaWrite>, Option<u64>)>> {
        if self.pool.start == self.pool.end {
            return Ok(Plan::Ready((Vec::new(), None)));
        }
        let cs = self.layout.cluster_size();
        let rbe = self.layout.refblock_entries();
        let order = self.layout.refcount_order;
        let pool = self.pool.clone();
        for rt_index in pool.start / rbe..=(pool.end - 1) / rbe {
            ready!(self.refblock(rt_index)?);
        }
        let mut writes = Vec::new();
        for rt_index in pool.start / rbe..=(pool.end - 1) / rbe {
            let lo = pool.start.max(rt_index * rbe);
            let hi = pool.end.min((rt_index + 1) * rbe);
            if let Some(block) = self.refblocks.get_mut(&rt_index) {
                for cluster in lo..hi {
                    refcount::set(block, cluster % rbe, order, 0);
                }
            }
            writes.extend(self.render_refblock(rt_index, lo % rbe, (hi - 1) % rbe));
        }
        let truncate = (pool.end == self.hwm).then_some(pool.start * cs);
        if pool.end == self.hwm {
            self.hwm = pool.start;
        }
        self.pool = self.hwm..self.hwm;
        Ok(Plan::Ready((writes, truncate)))
    }
}
