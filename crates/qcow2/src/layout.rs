//! The geometry an image's header implies: cluster and subcluster sizes, L2 and refcount
//! block entry counts, and where a guest or host offset falls in the two-level tables.

use crate::header::Header;

/// Geometry of one image (everything derived from its header that address arithmetic needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries with 32 subclusters each.
    pub extended_l2: bool,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Version 3 or later: zero clusters exist.
    pub v3: bool,
    /// Guest clusters not allocated here read from a backing file.
    pub has_backing: bool,
}

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

impl Layout {
    /// The geometry of `header`.
    pub fn of(header: &Header) -> Self {
        Self {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            refcount_order: header.refcount_order,
            size: header.size,
            l1_size: header.l1_size,
            l1_table_offset: header.l1_table_offset,
            v3: header.version >= 3,
            has_backing: header.backing_file.is_some(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per subcluster (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    /// 64-bit words per L2 entry (1, or 2 with extended L2 entries).
    pub fn l2_entry_words(&self) -> u64 {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.l2_entry_words())
    }

    /// Guest bytes mapped by one L2 table.
    pub fn bytes_per_l2(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// (L1 index, L2 index) of guest cluster `cluster`.
    pub fn l1_l2_index(&self, cluster: u64) -> (u64, u64) {
        (cluster / self.l2_entries(), cluster % self.l2_entries())
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest refcount value.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << self.refcount_bits()) - 1
        }
    }

    /// Entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// Number of guest clusters.
    pub fn guest_clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size())
    }

    /// Bytes of one metadata write: table entries are updated by rewriting this aligned
    /// piece of the table that holds them (a page, or the whole cluster when smaller).
    pub fn meta_unit(&self) -> u64 {
        self.cluster_size().min(4096)
    }
}
