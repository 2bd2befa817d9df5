//! The qcow2 header (versions 2 and 3), its header extensions and the backing file name, as
//! found in the first cluster of an image.
//!
//! [`Header::parse`] validates every field it depends on and keeps what it does not interpret:
//! additional header fields beyond the ones known here and every header extension (known or
//! not, such as XCP-ng's "hidden" flag, type [`EXT_XCPNG_HIDDEN`]) are kept byte for byte, so
//! [`Header::encode`] writes them back unchanged. [`Header::check_open`] refuses what this
//! crate does not implement (encryption, external data files, unknown incompatible features)
//! with an error naming the feature.

use crate::error::{Qcow2Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Smallest and largest cluster size exponents accepted (512 B to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name (bytes).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table accepted (bytes), as qemu.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (bytes), as qemu.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// Byte offsets of header fields (all big-endian).
pub mod offsets {
    /// `version` (u32).
    pub const VERSION: usize = 4;
    /// `backing_file_offset` (u64).
    pub const BACKING_FILE_OFFSET: usize = 8;
    /// `backing_file_size` (u32).
    pub const BACKING_FILE_SIZE: usize = 16;
    /// `cluster_bits` (u32).
    pub const CLUSTER_BITS: usize = 20;
    /// `size` (u64).
    pub const SIZE: usize = 24;
    /// `crypt_method` (u32).
    pub const CRYPT_METHOD: usize = 32;
    /// `l1_size` (u32).
    pub const L1_SIZE: usize = 36;
    /// `l1_table_offset` (u64).
    pub const L1_TABLE_OFFSET: usize = 40;
    /// `refcount_table_offset` (u64).
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `nb_snapshots` (u32).
    pub const NB_SNAPSHOTS: usize = 60;
    /// `snapshots_offset` (u64).
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// `incompatible_features` (u64, v3).
    pub const INCOMPATIBLE_FEATURES: usize = 72;
    /// `compatible_features` (u64, v3).
    pub const COMPATIBLE_FEATURES: usize = 80;
    /// `autoclear_features` (u64, v3).
    pub const AUTOCLEAR_FEATURES: usize = 88;
    /// `refcount_order` (u32, v3).
    pub const REFCOUNT_ORDER: usize = 96;
    /// `header_length` (u32, v3).
    pub const HEADER_LENGTH: usize = 100;
    /// `compression_type` (u8, optional v3 field).
    pub const COMPRESSION_TYPE: usize = 104;
}

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be stale (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt: never write except to repair.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// `compression_type` is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 128-bit L2 entries with 32 subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this crate knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compatible {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// End of the header extension area.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// XCP-ng's storage manager's "hidden" flag (8 bytes, byte 0 non-zero = hidden).
pub const EXT_XCPNG_HIDDEN: u32 = 0x7661_7465;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (type 0, the default).
    Zlib,
    /// Zstandard frames (type 1).
    Zstd,
}

/// One header extension, kept as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Its data, without the padding to 8 bytes.
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is (0: no backing file).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Bytes `[104, header_length)` of a v3 header: `compression_type`, padding and any
    /// fields unknown here, kept byte for byte.
    pub additional: Vec<u8>,
    /// Header extensions in file order (the end marker is not included).
    pub extensions: Vec<Extension>,
    /// The backing file name, if any (not necessarily UTF-8).
    pub backing_file: Option<Vec<u8>>,
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

fn truncated(structure: &'static str, offset: u64, needed: u64, available: usize) -> Qcow2Error {
    Qcow2Error::Truncated {
        structure,
        offset,
        needed,
        available: available as u64,
    }
}

fn bad(field: &'static str, offset: usize, reason: impl Into<String>) -> Qcow2Error {
    Qcow2Error::field("header", field, offset as u64, reason)
}

/// The cluster size exponent of the header at the start of `prefix` (at least 24 bytes),
/// checked: how much of the file a caller must read before [`Header::parse`].
pub fn peek_cluster_bits(prefix: &[u8]) -> Result<u32> {
    if prefix.len() < 24 {
        return Err(truncated("header", 0, 24, prefix.len()));
    }
    if be32(prefix, 0) != MAGIC {
        return Err(bad(
            "magic",
            0,
            format!("{:#010x} is not QFI\\xfb", be32(prefix, 0)),
        ));
    }
    let bits = be32(prefix, offsets::CLUSTER_BITS);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(bad(
            "cluster_bits",
            offsets::CLUSTER_BITS,
            format!("{bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"),
        ));
    }
    Ok(bits)
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True when L2 entries are 128 bits with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// The compression type of compressed clusters.
    pub fn compression_type(&self) -> CompressionType {
        match self.additional.first() {
            Some(1) => CompressionType::Zstd,
            _ => CompressionType::Zlib,
        }
    }

    /// The first extension of type `kind`.
    pub fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }

    /// The backing file format named by the backing format extension.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|e| e.data.as_slice())
    }

    /// XCP-ng's hidden flag: `Some(true)` when the extension is present and byte 0 is non-zero.
    pub fn xcpng_hidden(&self) -> Option<bool> {
        self.extension(EXT_XCPNG_HIDDEN)
            .map(|e| e.data.first().is_some_and(|b| *b != 0))
    }

    /// The name of feature `bit` of `kind` (0 incompatible, 1 compatible, 2 autoclear) from the
    /// image's feature name table, if it has one.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        let table = self.extension(EXT_FEATURE_TABLE)?;
        table.data.chunks_exact(48).find_map(|entry| {
            (entry[0] == kind && entry[1] == bit).then(|| {
                let name = &entry[2..];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..end]).into_owned()
            })
        })
    }

    /// Parses and validates the header at the start of `bytes`, which must hold everything
    /// up to the end of the backing file name (the first cluster is always enough).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let cluster_bits = peek_cluster_bits(bytes)?;
        let cluster_size = 1u64 << cluster_bits;
        if bytes.len() < V2_HEADER_LEN as usize {
            return Err(truncated(
                "header",
                0,
                u64::from(V2_HEADER_LEN),
                bytes.len(),
            ));
        }
        let version = be32(bytes, offsets::VERSION);
        if version != 2 && version != 3 {
            return Err(bad(
                "version",
                offsets::VERSION,
                format!("{version} (only 2 and 3 exist)"),
            ));
        }
        let mut header = Self {
            version,
            backing_file_offset: be64(bytes, offsets::BACKING_FILE_OFFSET),
            backing_file_size: be32(bytes, offsets::BACKING_FILE_SIZE),
            cluster_bits,
            size: be64(bytes, offsets::SIZE),
            crypt_method: be32(bytes, offsets::CRYPT_METHOD),
            l1_size: be32(bytes, offsets::L1_SIZE),
            l1_table_offset: be64(bytes, offsets::L1_TABLE_OFFSET),
            refcount_table_offset: be64(bytes, offsets::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: be32(bytes, offsets::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: be32(bytes, offsets::NB_SNAPSHOTS),
            snapshots_offset: be64(bytes, offsets::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            additional: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if bytes.len() < V3_MIN_HEADER_LEN as usize {
                return Err(truncated(
                    "header",
                    0,
                    u64::from(V3_MIN_HEADER_LEN),
                    bytes.len(),
                ));
            }
            header.incompatible_features = be64(bytes, offsets::INCOMPATIBLE_FEATURES);
            header.compatible_features = be64(bytes, offsets::COMPATIBLE_FEATURES);
            header.autoclear_features = be64(bytes, offsets::AUTOCLEAR_FEATURES);
            header.refcount_order = be32(bytes, offsets::REFCOUNT_ORDER);
            header.header_length = be32(bytes, offsets::HEADER_LENGTH);
            let length = header.header_length;
            if length < V3_MIN_HEADER_LEN || length % 8 != 0 || u64::from(length) > cluster_size {
                return Err(bad(
                    "header_length",
                    offsets::HEADER_LENGTH,
                    format!("{length} (must be a multiple of 8, at least 104 and within the first cluster)"),
                ));
            }
            let length = length as usize;
            if bytes.len() < length {
                return Err(truncated("header", 0, length as u64, bytes.len()));
            }
            header.additional = bytes[V3_MIN_HEADER_LEN as usize..length].to_vec();
            if header.refcount_order > 6 {
                return Err(bad(
                    "refcount_order",
                    offsets::REFCOUNT_ORDER,
                    format!("{} (at most 6: 64-bit refcounts)", header.refcount_order),
                ));
            }
        }
        header.validate_fields()?;
        header.parse_extensions(bytes)?;
        header.parse_backing_name(bytes)?;
        Ok(header)
    }

    fn validate_fields(&self) -> Result<()> {
        let cluster_size = self.cluster_size();
        let aligned = |value: u64| value % cluster_size == 0;
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(bad(
                "cluster_bits",
                offsets::CLUSTER_BITS,
                format!(
                    "{} with extended L2 entries (they need at least 16 KiB clusters)",
                    self.cluster_bits
                ),
            ));
        }
        for (field, at, value) in [
            (
                "l1_table_offset",
                offsets::L1_TABLE_OFFSET,
                self.l1_table_offset,
            ),
            (
                "refcount_table_offset",
                offsets::REFCOUNT_TABLE_OFFSET,
                self.refcount_table_offset,
            ),
        ] {
            if value == 0 || !aligned(value) {
                return Err(bad(
                    field,
                    at,
                    format!("{value:#x} is not a non-zero multiple of the cluster size"),
                ));
            }
        }
        let table_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if self.refcount_table_clusters == 0 || table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(bad(
                "refcount_table_clusters",
                offsets::REFCOUNT_TABLE_CLUSTERS,
                format!(
                    "{} ({table_bytes} bytes; must be 1 cluster to 8 MiB)",
                    self.refcount_table_clusters
                ),
            ));
        }
        let l2_entries = cluster_size / if self.extended_l2() { 16 } else { 8 };
        let per_l1 = cluster_size * l2_entries;
        let needed = self.size.div_ceil(per_l1);
        if u64::from(self.l1_size) < needed || u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(
                "l1_size",
                offsets::L1_SIZE,
                format!(
                    "{} entries for a {}-byte disk (needs {needed}, at most {} fit in 32 MiB)",
                    self.l1_size,
                    self.size,
                    MAX_L1_BYTES / 8
                ),
            ));
        }
        // The tables must lie within what an offset can address.
        for (field, at, start, len) in [
            (
                "l1_table_offset",
                offsets::L1_TABLE_OFFSET,
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
            ),
            (
                "refcount_table_offset",
                offsets::REFCOUNT_TABLE_OFFSET,
                self.refcount_table_offset,
                table_bytes,
            ),
        ] {
            if start.checked_add(len).is_none_or(|end| end > 1 << 56) {
                return Err(bad(field, at, format!("{start:#x} + {len} lies past 2^56")));
            }
        }
        if self.nb_snapshots > 0 && (self.snapshots_offset == 0 || !aligned(self.snapshots_offset))
        {
            return Err(bad(
                "snapshots_offset",
                offsets::SNAPSHOTS_OFFSET,
                format!("{:#x} is not cluster aligned", self.snapshots_offset),
            ));
        }
        let compression_type = self.additional.first().copied().unwrap_or(0);
        let flagged = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        if flagged != (compression_type != 0) {
            return Err(bad(
                "compression_type",
                offsets::COMPRESSION_TYPE,
                format!(
                    "{compression_type} with the compression type feature bit {}",
                    if flagged { "set" } else { "clear" }
                ),
            ));
        }
        if compression_type > 1 {
            return Err(bad(
                "compression_type",
                offsets::COMPRESSION_TYPE,
                format!("{compression_type} (known: 0 zlib, 1 zstd)"),
            ));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, bytes: &[u8]) -> Result<()> {
        let mut at = self.header_length as usize;
        let limit = bytes
            .len()
            .min(usize::try_from(self.cluster_size()).unwrap_or(usize::MAX));
        loop {
            if at + 8 > limit {
                return Err(truncated(
                    "header extension",
                    at as u64,
                    8,
                    limit.saturating_sub(at),
                ));
            }
            let kind = be32(bytes, at);
            let len = be32(bytes, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_at = at + 8;
            let padded = len.div_ceil(8) * 8;
            if data_at + padded > limit {
                return Err(Qcow2Error::field(
                    "header extension",
                    "length",
                    (at + 4) as u64,
                    format!("extension {kind:#010x} of {len} bytes runs past the first cluster"),
                ));
            }
            let known = matches!(
                kind,
                EXT_BACKING_FORMAT | EXT_FEATURE_TABLE | EXT_BITMAPS | EXT_CRYPTO | EXT_DATA_FILE
            );
            if known && self.extensions.iter().any(|e| e.kind == kind) {
                return Err(Qcow2Error::field(
                    "header extension",
                    "type",
                    at as u64,
                    format!("extension {kind:#010x} appears twice"),
                ));
            }
            self.extensions.push(Extension {
                kind,
                data: bytes[data_at..data_at + len].to_vec(),
            });
            at = data_at + padded;
        }
    }

    fn parse_backing_name(&mut self, bytes: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = self.backing_file_size;
        if len == 0 || len > MAX_BACKING_NAME {
            return Err(bad(
                "backing_file_size",
                offsets::BACKING_FILE_SIZE,
                format!("{len} (must be 1..={MAX_BACKING_NAME})"),
            ));
        }
        let end = self.backing_file_offset + u64::from(len);
        if end > self.cluster_size() {
            return Err(bad(
                "backing_file_offset",
                offsets::BACKING_FILE_OFFSET,
                format!(
                    "the name at {} ({len} bytes) does not lie in the first cluster",
                    self.backing_file_offset
                ),
            ));
        }
        let start = usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX);
        let end = usize::try_from(end).unwrap_or(usize::MAX);
        if end > bytes.len() {
            return Err(truncated(
                "backing file name",
                start as u64,
                u64::from(len),
                bytes.len().saturating_sub(start),
            ));
        }
        self.backing_file = Some(bytes[start..end].to_vec());
        Ok(())
    }

    /// Refuses what this crate does not implement: encryption, external data files and
    /// incompatible features it does not know (named from the image's feature table where it
    /// has one). For a `writable` open it also refuses images whose dirty bit is set (their
    /// refcounts need rebuilding first), whose corrupt bit is set, or that hold internal
    /// snapshots.
    pub fn check_open(&self, writable: bool) -> Result<()> {
        match self.crypt_method {
            0 => {}
            1 => return Err(Qcow2Error::unsupported("encryption (AES, crypt_method 1)")),
            2 => return Err(Qcow2Error::unsupported("encryption (LUKS, crypt_method 2)")),
            other => {
                return Err(bad(
                    "crypt_method",
                    offsets::CRYPT_METHOD,
                    format!("{other} (known: 0, 1, 2)"),
                ))
            }
        }
        if self.incompatible_features & incompatible::EXTERNAL_DATA != 0 {
            return Err(Qcow2Error::unsupported(
                "external data file (incompatible bit 2)",
            ));
        }
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| match self.feature_name(0, bit) {
                    Some(name) => format!("bit {bit} ({name})"),
                    None => format!("bit {bit}"),
                })
                .collect();
            return Err(Qcow2Error::unsupported(format!(
                "unknown incompatible feature {}",
                names.join(", ")
            )));
        }
        if writable {
            if self.incompatible_features & incompatible::CORRUPT != 0 {
                return Err(Qcow2Error::unsupported(
                    "writing an image marked corrupt (repair it with `qemu-img check -r all`)",
                ));
            }
            if self.incompatible_features & incompatible::DIRTY != 0 {
                return Err(Qcow2Error::unsupported(
                    "writing an image whose dirty bit is set: its refcounts must be rebuilt first (`qemu-img check -r all`)",
                ));
            }
            if self.nb_snapshots > 0 {
                return Err(Qcow2Error::unsupported(format!(
                    "writing an image with {} internal snapshots",
                    self.nb_snapshots
                )));
            }
        }
        Ok(())
    }

    /// The header, its extensions, the end marker and the backing file name as they start the
    /// first cluster. The backing name is placed right after the end marker and
    /// `backing_file_offset` is set to match; everything else is written as held, so unknown
    /// fields and extensions come back byte for byte. Errors if it does not fit in a cluster.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.header_length as usize];
        let put32 = |out: &mut Vec<u8>, at: usize, v: u32| {
            out[at..at + 4].copy_from_slice(&v.to_be_bytes());
        };
        let put64 = |out: &mut Vec<u8>, at: usize, v: u64| {
            out[at..at + 8].copy_from_slice(&v.to_be_bytes());
        };
        put32(&mut out, 0, MAGIC);
        put32(&mut out, offsets::VERSION, self.version);
        put32(&mut out, offsets::CLUSTER_BITS, self.cluster_bits);
        put64(&mut out, offsets::SIZE, self.size);
        put32(&mut out, offsets::CRYPT_METHOD, self.crypt_method);
        put32(&mut out, offsets::L1_SIZE, self.l1_size);
        put64(&mut out, offsets::L1_TABLE_OFFSET, self.l1_table_offset);
        put64(
            &mut out,
            offsets::REFCOUNT_TABLE_OFFSET,
            self.refcount_table_offset,
        );
        put32(
            &mut out,
            offsets::REFCOUNT_TABLE_CLUSTERS,
            self.refcount_table_clusters,
        );
        put32(&mut out, offsets::NB_SNAPSHOTS, self.nb_snapshots);
        put64(&mut out, offsets::SNAPSHOTS_OFFSET, self.snapshots_offset);
        if self.version >= 3 {
            put64(
                &mut out,
                offsets::INCOMPATIBLE_FEATURES,
                self.incompatible_features,
            );
            put64(
                &mut out,
                offsets::COMPATIBLE_FEATURES,
                self.compatible_features,
            );
            put64(
                &mut out,
                offsets::AUTOCLEAR_FEATURES,
                self.autoclear_features,
            );
            put32(&mut out, offsets::REFCOUNT_ORDER, self.refcount_order);
            put32(&mut out, offsets::HEADER_LENGTH, self.header_length);
            let start = V3_MIN_HEADER_LEN as usize;
            let end = (start + self.additional.len()).min(out.len());
            out[start..end].copy_from_slice(&self.additional[..end - start]);
        }
        for extension in &self.extensions {
            let len = u32::try_from(extension.data.len()).map_err(|_| {
                Qcow2Error::field("header extension", "length", out.len() as u64, "too long")
            })?;
            out.extend_from_slice(&extension.kind.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&extension.data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
            let offset = out.len() as u64;
            put64(&mut out, offsets::BACKING_FILE_OFFSET, offset);
            put32(&mut out, offsets::BACKING_FILE_SIZE, len);
            out.extend_from_slice(name);
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Qcow2Error::field(
                "header",
                "header_length",
                0,
                format!(
                    "header, extensions and backing name take {} bytes, more than a cluster",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header of a 1 GiB disk with 64 KiB clusters, as `qemu-img create -f qcow2` lays
    /// it out (L1 at 0x30000, refcount table at 0x10000), with a backing file and format.
    fn sample() -> Vec<u8> {
        let mut h = vec![0u8; 112];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        // Backing format "qcow2", then an unknown extension, then the end marker.
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&5u32.to_be_bytes());
        h.extend_from_slice(b"qcow2\0\0\0");
        h.extend_from_slice(&EXT_XCPNG_HIDDEN.to_be_bytes());
        h.extend_from_slice(&8u32.to_be_bytes());
        h.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        h.extend_from_slice(&[0u8; 8]);
        let name_at = h.len() as u64;
        h[8..16].copy_from_slice(&name_at.to_be_bytes());
        h[16..20].copy_from_slice(&8u32.to_be_bytes());
        h.extend_from_slice(b"base.img");
        h
    }

    #[test]
    fn parses_a_v3_header_with_extensions_and_backing_name() {
        let bytes = sample();
        let mut cluster = bytes.clone();
        cluster.resize(65536, 0);
        let header = Header::parse(&cluster).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.size, 1 << 30);
        assert_eq!(header.backing_file.as_deref(), Some(&b"base.img"[..]));
        assert_eq!(header.backing_format(), Some(&b"qcow2"[..]));
        assert_eq!(header.xcpng_hidden(), Some(true));
        assert_eq!(header.additional, vec![0u8; 8]);
        assert_eq!(header.compression_type(), CompressionType::Zlib);
        // Written back byte for byte, unknown extension included.
        assert_eq!(header.encode().unwrap(), bytes);
        header.check_open(true).unwrap();
    }

    #[test]
    fn v2_headers_round_trip() {
        let mut bytes = sample();
        bytes.truncate(72);
        bytes[4..8].copy_from_slice(&2u32.to_be_bytes());
        bytes[8..20].fill(0);
        bytes.extend_from_slice(&[0u8; 8]);
        let mut cluster = bytes.clone();
        cluster.resize(65536, 0);
        let header = Header::parse(&cluster).unwrap();
        assert_eq!(header.refcount_order, 4);
        assert_eq!(header.header_length, 72);
        assert!(header.backing_file.is_none());
        assert_eq!(header.encode().unwrap(), bytes);
    }

    fn refused(bytes: &[u8]) -> Qcow2Error {
        let mut cluster = bytes.to_vec();
        cluster.resize(65536, 0);
        Header::parse(&cluster).unwrap_err()
    }

    #[test]
    fn invalid_fields_are_named_with_their_offset() {
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(refused(&bytes).to_string().contains("`magic` at offset 0"));
        let mut bytes = sample();
        bytes[23] = 22;
        assert!(refused(&bytes)
            .to_string()
            .contains("`cluster_bits` at offset 20"));
        let mut bytes = sample();
        bytes[7] = 4;
        assert!(refused(&bytes)
            .to_string()
            .contains("`version` at offset 4"));
        let mut bytes = sample();
        bytes[47] = 1;
        assert!(refused(&bytes).to_string().contains("l1_table_offset"));
        let mut bytes = sample();
        bytes[36..40].copy_from_slice(&1u32.to_be_bytes());
        assert!(refused(&bytes).to_string().contains("l1_size"));
        let mut bytes = sample();
        bytes[103] = 100;
        assert!(refused(&bytes).to_string().contains("header_length"));
        let mut bytes = sample();
        bytes[99] = 7;
        assert!(refused(&bytes).to_string().contains("refcount_order"));
        let mut bytes = sample();
        bytes[104] = 1; // zstd without the feature bit
        assert!(refused(&bytes).to_string().contains("compression_type"));
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let parse = |bytes: &[u8]| {
            let mut cluster = bytes.to_vec();
            cluster.resize(65536, 0);
            Header::parse(&cluster).unwrap()
        };
        let mut bytes = sample();
        bytes[35] = 2;
        let err = parse(&bytes).check_open(false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported qcow2 feature: encryption (LUKS, crypt_method 2)"
        );
        assert_eq!(err.errno(), libc::EOPNOTSUPP);
        let mut bytes = sample();
        bytes[79] = 1 << 2;
        let err = parse(&bytes).check_open(false).unwrap_err();
        assert!(err.to_string().contains("external data file"));
        let mut bytes = sample();
        bytes[78] = 1; // bit 8
        let err = parse(&bytes).check_open(false).unwrap_err();
        assert!(err
            .to_string()
            .contains("unknown incompatible feature bit 8"));
        let mut bytes = sample();
        bytes[79] = 1; // dirty: readable, not writable
        let header = parse(&bytes);
        header.check_open(false).unwrap();
        assert!(header
            .check_open(true)
            .unwrap_err()
            .to_string()
            .contains("dirty"));
        let mut bytes = sample();
        bytes[79] = 2; // corrupt
        let header = parse(&bytes);
        header.check_open(false).unwrap();
        assert!(header
            .check_open(true)
            .unwrap_err()
            .to_string()
            .contains("corrupt"));
    }

    #[test]
    fn feature_names_come_from_the_table() {
        let mut bytes = sample();
        bytes.truncate(bytes.len() - 8 - 8); // drop the end marker and name
        let mut entry = vec![0u8, 9];
        entry.extend_from_slice(b"shiny new thing");
        entry.resize(48, 0);
        bytes.extend_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        bytes.extend_from_slice(&48u32.to_be_bytes());
        bytes.extend_from_slice(&entry);
        bytes.extend_from_slice(&[0u8; 8]);
        bytes[8..20].fill(0);
        bytes[78] = 2; // incompatible bit 9
        let mut cluster = bytes.clone();
        cluster.resize(65536, 0);
        let header = Header::parse(&cluster).unwrap();
        let err = header.check_open(false).unwrap_err();
        assert!(err.to_string().contains("bit 9 (shiny new thing)"), "{err}");
    }
}
