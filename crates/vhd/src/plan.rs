//! Plans: what the VHD core ([`crate::metadata::Metadata`]) asks an executor to do.
//!
//! The core never touches a file. For a read it answers with a [`Mapping`]: runs of sectors
//! present in the file (with their byte offsets) or absent from it, or the list of block
//! bitmaps it must see first ([`BitmapLoad`]). For a write, discard or write-zeroes of one
//! [`Piece`] (a range inside one block) it hands out a [`Plan`]: ordered [`Stage`]s of
//! [`Step`]s. An executor runs the stages in order (the steps of one stage may run
//! concurrently), and every step the same way:
//!
//! 1. take the lock the step names ([`Step::serial`]);
//! 2. ask the core to [`prepare`](crate::metadata::Metadata::prepare) it, which renders the
//!    bytes to write from the *current* in-memory state (so two updates of one BAT sector or
//!    of the batmap never lose each other's bits) and may ask for a bitmap or for the whole
//!    operation to be planned again;
//! 3. do the [`Io`];
//! 4. tell the core it is done ([`complete`](crate::metadata::Metadata::complete)), which
//!    publishes the step's effect (a BAT entry, a bitmap, the footer's new place).
//!
//! The crash-ordering contract is the order of the stages: a new block's footer move first
//! (the file always ends in a valid footer), then its data and bitmap (still unreferenced),
//! then the BAT sector that makes it part of the image, then the batmap. A step is started
//! only after every step of the previous stage completed.

use crate::bitmap::SectorBitmap;

/// What is done to a range of sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Guest data is written.
    Write,
    /// The range is made to read as zeros. With `deallocate` (discard, or write-zeroes that
    /// may unmap) an image without a parent frees what it can; otherwise, and always in a
    /// differencing image (so a parent's data never shows through), the sectors become
    /// present and zero.
    Zero {
        /// Whether space may be given back.
        deallocate: bool,
    },
}

/// A part of a request that lies inside one block (the whole request for a fixed image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First virtual sector.
    pub sector: u64,
    /// Number of sectors.
    pub count: u64,
    /// Byte offset of the piece's data in the request buffer (writes).
    pub at: usize,
}

/// A run of sectors of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Sectors stored in this file, starting at byte `file_offset`.
    Present {
        /// First virtual sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Byte offset of the first sector in the file.
        file_offset: u64,
    },
    /// Sectors this file does not hold: the parent's, or zeros in an image without parent.
    Absent {
        /// First virtual sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
    },
}

impl Extent {
    /// First sector.
    pub fn sector(&self) -> u64 {
        match *self {
            Self::Present { sector, .. } | Self::Absent { sector, .. } => sector,
        }
    }
    /// Sector count.
    pub fn count(&self) -> u64 {
        match *self {
            Self::Present { count, .. } | Self::Absent { count, .. } => count,
        }
    }
}

/// The answer to a mapping query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// The runs, in order, adjacent runs merged.
    Done(Vec<Extent>),
    /// These bitmaps must be read first (pass them back as [`LoadedBitmap`]s).
    NeedBitmaps(Vec<BitmapLoad>),
}

/// A block bitmap the core needs: read `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapLoad {
    /// The block.
    pub block: u64,
    /// Its BAT entry when the load was asked for.
    pub entry: u32,
    /// Byte offset of the bitmap.
    pub offset: u64,
    /// Bytes to read.
    pub len: usize,
    /// Cache generation when asked (decides whether the result may be cached).
    pub(crate) ticket: u64,
}

/// A bitmap read from the file for a [`BitmapLoad`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedBitmap {
    pub(crate) load: BitmapLoad,
    pub(crate) bits: SectorBitmap,
}

impl LoadedBitmap {
    /// Wraps the bytes read for `load`.
    pub fn new(load: BitmapLoad, bytes: Vec<u8>) -> Self {
        Self {
            load,
            bits: SectorBitmap::from_bytes(bytes),
        }
    }

    /// The block it belongs to.
    pub fn block(&self) -> u64 {
        self.load.block
    }
}

/// Request bytes `[at, at + len)` written at file byte `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataWrite {
    /// Byte offset in the file.
    pub offset: u64,
    /// Byte offset in the request buffer.
    pub at: usize,
    /// Bytes.
    pub len: usize,
}

/// `[offset, offset + len)` of the file made to read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRange {
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Punching a hole is fine (else the space stays allocated).
    pub deallocate: bool,
}

/// One step of a plan. Executors treat steps as opaque apart from [`Step::serial`]; what to
/// write comes from [`crate::metadata::Metadata::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the footer at `offset`: the file's new end (a new block lies before it).
    Footer {
        /// Byte offset.
        offset: u64,
    },
    /// Write request bytes into the file.
    Data(DataWrite),
    /// Make a range of the file read as zeros.
    Zero(ZeroRange),
    /// Write the bitmap of a block being allocated (not yet referenced by the BAT).
    NewBitmap {
        /// The block.
        block: u64,
        /// Its future BAT entry (sector of the bitmap).
        entry: u32,
        /// The bits.
        bits: SectorBitmap,
    },
    /// Set or clear bits `[first, first + count)` of allocated `block`'s bitmap, starting from
    /// the bits as they are when the step runs.
    SetBits {
        /// The block.
        block: u64,
        /// The BAT entry the plan was made for; if it changed, the operation starts over.
        entry: u32,
        /// First sector in the block.
        first: u64,
        /// Sectors.
        count: u64,
        /// Set or clear.
        value: bool,
    },
    /// Write the BAT sector holding `block`'s entry, with the entry set to `entry`.
    BatEntry {
        /// The block.
        block: u64,
        /// New entry (`BAT_UNUSED` frees the block).
        entry: u32,
    },
    /// Mark `block` full in the batmap if its bitmap is all set.
    MarkFull {
        /// The block.
        block: u64,
    },
    /// Clear `block`'s batmap bit (before any of its bits are cleared).
    ClearFull {
        /// The block.
        block: u64,
    },
    /// Give a freed block's space back (best effort; failures are harmless).
    Release {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// One of the two metadata tables whose sector writes are serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// BAT sector writes.
    Bat,
    /// Batmap writes.
    Batmap,
}

/// The locks a step must run under, taken in this order: the block's, then the table's.
/// An executor that holds the block's lock for the whole plan ([`Planned::NeedsLock`]) or
/// has exclusive access takes only what it does not hold yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serial {
    /// The block whose bitmap or allocation the step changes.
    pub block: Option<u64>,
    /// The table the step writes.
    pub table: Option<Table>,
}

impl Step {
    /// The locks to hold while preparing, doing and completing this step.
    pub fn serial(&self) -> Serial {
        let (block, table) = match *self {
            Self::BatEntry { block, .. } => (Some(block), Some(Table::Bat)),
            Self::MarkFull { block } | Self::ClearFull { block } => {
                (Some(block), Some(Table::Batmap))
            }
            Self::SetBits { block, .. } => (Some(block), None),
            Self::Footer { .. }
            | Self::Data(_)
            | Self::Zero(_)
            | Self::NewBitmap { .. }
            | Self::Release { .. } => (None, None),
        };
        Serial { block, table }
    }
}

/// Steps that may run concurrently.
pub type Stage = Vec<Step>;

/// An ordered list of stages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    stages: Vec<Stage>,
}

impl Plan {
    /// A plan of the given stages (empty stages are dropped).
    pub fn new(stages: Vec<Stage>) -> Self {
        Self {
            stages: stages.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Every step in execution order.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.stages.iter().flatten()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }
}

/// What [`crate::metadata::Metadata::plan`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Execute this plan (no lock needed around it).
    Ready(Plan),
    /// Take this block's lock, then ask [`crate::metadata::Metadata::plan_locked`] and execute
    /// that plan while holding the lock (allocation, zeroing).
    NeedsLock(u64),
}

/// The I/O of a prepared step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Io {
    /// Nothing to do.
    Nothing,
    /// Write these buffers, in order: `(file offset, bytes)`.
    Write(Vec<(u64, Vec<u8>)>),
    /// Write request bytes into the file.
    Data(DataWrite),
    /// Make a range read as zeros (punch or zero-range where possible, else write zeros).
    Zero(ZeroRange),
    /// Punch a range out, ignoring failures.
    Release {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// What changes in memory once a step's I/O completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    FooterAt(u64),
    Bitmap {
        block: u64,
        entry: u32,
        bits: SectorBitmap,
    },
    Entry {
        block: u64,
        entry: u32,
    },
    BatmapMap(Vec<u8>),
}

/// A step ready to run: its I/O, then [`crate::metadata::Metadata::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a prepared step must be executed and completed"]
pub struct Prepared {
    /// The I/O to do.
    pub io: Io,
    pub(crate) effect: Effect,
}

/// The answer to [`crate::metadata::Metadata::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepare {
    /// Do this, then complete it.
    Ready(Prepared),
    /// Read this bitmap and prepare again with it.
    NeedBitmap(BitmapLoad),
    /// The block changed since the plan was made (freed or moved): plan the operation again.
    Restart,
}
