//! A synchronous executor of [`crate::meta`] plans over any [`Storage`], and [`create`] for
//! new images. Tests, tools and fuzz targets use it; the tapdisk driver executes the same
//! plans asynchronously.

use std::io;
use std::ops::Range;

use crate::compress::decompress;
use crate::error::{Qcow2Error, Result};
use crate::header::{self, Extension, Header};
use crate::layout::Layout;
use crate::meta::{
    Allocation, Fill, L2Update, MetaWrite, Metadata, Need, Plan, Release, RunKind, ZeroPlan,
};
use crate::refcount;

/// Positioned byte storage holding an image.
pub trait Storage {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`, growing the storage as needed.
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Current length.
    fn file_len(&mut self) -> io::Result<u64>;
    /// Sets the length (growing with zeros or truncating).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes what was written durable (nothing to do for storage in memory).
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn to_index(value: u64) -> io::Result<usize> {
    usize::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for Vec<u8> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let len = Vec::len(self);
        let start = to_index(offset)?.min(len);
        let end = (start + buf.len()).min(len);
        buf[..end - start].copy_from_slice(&self[start..end]);
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let start = to_index(offset)?;
        if Vec::len(self) < start + data.len() {
            self.resize(start + data.len(), 0);
        }
        self[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn file_len(&mut self) -> io::Result<u64> {
        Ok(Vec::len(self) as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.resize(to_index(len)?, 0);
        Ok(())
    }
}

impl Storage for std::fs::File {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }

    fn file_len(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// An `io::Error` carrying a format error, with the errno it maps to.
pub fn to_io(error: Qcow2Error) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(error.errno()).kind(), error)
}

/// Reads the header (first cluster) of an image.
pub fn read_header<S: Storage>(storage: &mut S) -> io::Result<Header> {
    let mut prefix = [0u8; 24];
    storage.read_at(&mut prefix, 0)?;
    let bits = header::peek_cluster_bits(&prefix).map_err(to_io)?;
    let mut first = vec![0u8; 1 << bits];
    storage.read_at(&mut first, 0)?;
    Header::parse(&first).map_err(to_io)
}

/// Reads guest bytes of the backing chain: `(guest offset, buffer)`.
pub type BelowFn = Box<dyn FnMut(u64, &mut [u8]) -> io::Result<()>>;

/// An open image executing plans synchronously.
pub struct Image<S: Storage> {
    storage: S,
    header: Header,
    meta: Metadata,
    writable: bool,
    below: Option<BelowFn>,
}

impl<S: Storage> std::fmt::Debug for Image<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("header", &self.header)
            .field("writable", &self.writable)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Image<S> {
    /// Opens the image in `storage`, refusing what is not implemented (see
    /// [`Header::check_open`]).
    pub fn open(mut storage: S, writable: bool) -> io::Result<Self> {
        let header = read_header(&mut storage)?;
        header.check_open(writable).map_err(to_io)?;
        let mut l1 = vec![0u8; to_index(u64::from(header.l1_size) * 8)?];
        storage.read_at(&mut l1, header.l1_table_offset)?;
        let mut table =
            vec![0u8; to_index(u64::from(header.refcount_table_clusters) * header.cluster_size())?];
        storage.read_at(&mut table, header.refcount_table_offset)?;
        let file_len = storage.file_len()?;
        let meta = Metadata::open(&header, &l1, &table, file_len).map_err(to_io)?;
        Ok(Self {
            storage,
            header,
            meta,
            writable,
            below: None,
        })
    }

    /// Where reads of clusters absent here, and copy-on-write fills, get their bytes
    /// (default: zeros).
    pub fn set_below(&mut self, below: BelowFn) {
        self.below = Some(below);
    }

    /// The header as opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The planner state.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    fn layout(&self) -> Layout {
        *self.meta.layout()
    }

    fn resolve<T>(
        &mut self,
        mut plan: impl FnMut(&mut Metadata) -> Result<Plan<T>>,
    ) -> io::Result<T> {
        loop {
            match plan(&mut self.meta).map_err(to_io)? {
                Plan::Ready(value) => return Ok(value),
                Plan::Load(need) => self.satisfy(need)?,
            }
        }
    }

    fn satisfy(&mut self, need: Need) -> io::Result<()> {
        let cs = to_index(self.layout().cluster_size())?;
        match need {
            Need::L2 { l1_index, offset } => {
                let mut buf = vec![0u8; cs];
                self.storage.read_at(&mut buf, offset)?;
                self.meta.insert_l2(l1_index, offset, &buf).map_err(to_io)
            }
            Need::RefBlock { rt_index, offset } => {
                let mut buf = vec![0u8; cs];
                self.storage.read_at(&mut buf, offset)?;
                self.meta.insert_refblock(rt_index, &buf);
                Ok(())
            }
            Need::Reserve => self.reserve(),
            Need::NewL2 { l1_index } => {
                if let Some(new) = self.resolve(|m| m.plan_new_l2(l1_index))? {
                    self.put(&new.table)?;
                    let l1 = self.meta.render_l1(new.l1_index, new.l1_word);
                    self.put(&l1)?;
                    self.meta.publish_new_l2(&new);
                }
                Ok(())
            }
        }
    }

    fn put(&mut self, write: &MetaWrite) -> io::Result<()> {
        self.storage.write_at(&write.bytes, write.offset)
    }

    fn reserve(&mut self) -> io::Result<()> {
        let plan = self.resolve(|m| m.plan_reserve(1))?;
        if self.storage.file_len()? < plan.extend_to {
            self.storage.set_len(plan.extend_to)?;
        }
        for phase in &plan.phases {
            for write in phase {
                self.put(write)?;
            }
        }
        if let Some((offset, clusters)) = plan.new_table {
            let mut fields = [0u8; 12];
            fields[..8].copy_from_slice(&offset.to_be_bytes());
            fields[8..].copy_from_slice(&clusters.to_be_bytes());
            self.storage
                .write_at(&fields, header::offsets::REFCOUNT_TABLE_OFFSET as u64)?;
        }
        if let Some(old) = self.meta.commit_reserve(plan) {
            self.release(&[old])?;
        }
        Ok(())
    }

    /// Writes one L2 entry and publishes it.
    fn update_l2(&mut self, update: &L2Update) -> io::Result<()> {
        for write in self.resolve(|m| m.render_l2(std::slice::from_ref(update)))? {
            self.put(&write)?;
        }
        self.meta.publish_l2(update);
        Ok(())
    }

    fn release(&mut self, releases: &[Release]) -> io::Result<()> {
        if releases.is_empty() {
            return Ok(());
        }
        let plan = self.resolve(|m| m.plan_release(releases))?;
        for write in &plan.writes {
            self.put(write)?;
        }
        Ok(())
    }

    fn read_below(&mut self, guest: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.below.as_mut() {
            Some(below) => below(guest, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_compressed(&mut self, host: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut input = vec![0u8; to_index(len)?];
        self.storage.read_at(&mut input, host)?;
        let mut cluster = vec![0u8; to_index(self.layout().cluster_size())?];
        decompress(self.meta.compression(), &input, &mut cluster, host).map_err(to_io)?;
        Ok(cluster)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout().size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Reads guest bytes at `offset` into `buf`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let runs = self.resolve(|m| m.map(offset, len))?;
        for run in runs {
            let part = &mut buf[to_index(run.offset)?..to_index(run.offset + run.len)?];
            match run.kind {
                RunKind::Data { host } => self.storage.read_at(part, host)?,
                RunKind::Zero => part.fill(0),
                RunKind::Absent => self.read_below(offset + run.offset, part)?,
                RunKind::Compressed { host, len, within } => {
                    let cluster = self.read_compressed(host, len)?;
                    let at = to_index(within)?;
                    part.copy_from_slice(&cluster[at..at + part.len()]);
                }
            }
        }
        Ok(())
    }

    /// Allocation state of guest bytes (runs relative to `offset`).
    pub fn block_status(&mut self, offset: u64, len: u64) -> io::Result<Vec<crate::meta::Run>> {
        self.check_range(offset, len)?;
        self.resolve(|m| m.map(offset, len))
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Writes `data` at guest `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        self.check_range(offset, data.len() as u64)?;
        let cs = self.layout().cluster_size();
        let mut done = 0u64;
        while done < data.len() as u64 {
            let at = offset + done;
            let (cluster, start) = (at / cs, at % cs);
            let len = (cs - start).min(data.len() as u64 - done);
            let piece = &data[to_index(done)?..to_index(done + len)?];
            match self.resolve(|m| m.in_place(cluster, start, len))? {
                Some(host) => self.storage.write_at(piece, host)?,
                None => {
                    let plan = self.resolve(|m| m.plan_allocation(cluster, start, len))?;
                    self.allocate(&plan, start, piece)?;
                }
            }
            done += len;
        }
        Ok(())
    }

    fn fill(
        &mut self,
        cluster: u64,
        range: &Range<u64>,
        fill: Fill,
        out: &mut [u8],
    ) -> io::Result<()> {
        let cs = self.layout().cluster_size();
        match fill {
            Fill::Zeros => out.fill(0),
            Fill::Below => self.read_below(cluster * cs + range.start, out)?,
            Fill::Own { host } => self.storage.read_at(out, host + range.start)?,
            Fill::Compressed { host, len } => {
                let data = self.read_compressed(host, len)?;
                out.copy_from_slice(&data[to_index(range.start)?..to_index(range.end)?]);
            }
        }
        Ok(())
    }

    fn allocate(&mut self, plan: &Allocation, start: u64, data: &[u8]) -> io::Result<()> {
        if plan.head.is_none() && plan.tail.is_none() {
            self.storage.write_at(data, plan.host + start)?;
        } else {
            let mut buf = vec![0u8; to_index(plan.write.end - plan.write.start)?];
            let base = plan.write.start;
            for (range, fill) in [&plan.head, &plan.tail].into_iter().flatten() {
                let out = &mut buf[to_index(range.start - base)?..to_index(range.end - base)?];
                self.fill(plan.cluster, range, *fill, out)?;
            }
            let at = to_index(start - base)?;
            buf[at..at + data.len()].copy_from_slice(data);
            self.storage.write_at(&buf, plan.host + base)?;
        }
        if let Some(update) = plan.entry {
            self.update_l2(&update)?;
        }
        self.release(&plan.release)
    }

    /// Makes guest bytes read as zeros; with `deallocate` whole clusters are discarded.
    pub fn zero(&mut self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let cs = self.layout().cluster_size();
        let mut at = offset;
        while at < offset + len {
            let (cluster, start) = (at / cs, at % cs);
            let piece = (cs - start).min(offset + len - at);
            let whole = start == 0 && (piece == cs || at + piece == self.layout().size);
            let plan = if whole {
                self.resolve(|m| m.plan_zero(cluster, deallocate))?
            } else {
                ZeroPlan::WriteZeros
            };
            match plan {
                ZeroPlan::Nothing => {}
                ZeroPlan::WriteZeros => self.write(at, &vec![0u8; to_index(piece)?])?,
                ZeroPlan::Update { update, release } => {
                    self.update_l2(&update)?;
                    self.release(&release)?;
                }
            }
            at += piece;
        }
        Ok(())
    }

    /// Gives back the reserved clusters nobody used and returns the storage.
    pub fn close(mut self) -> io::Result<S> {
        if self.writable {
            let (writes, truncate) = self.resolve(|m| m.plan_release_pool())?;
            for write in &writes {
                self.put(write)?;
            }
            if let Some(len) = truncate {
                self.storage.set_len(len)?;
            }
        }
        Ok(self.storage)
    }
}

/// What a new image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 2 or 3.
    pub version: u32,
    /// Extended L2 entries (version 3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// log2 of the refcount width (version 2: 4).
    pub refcount_order: u32,
    /// Backing file name and format name.
    pub backing: Option<(String, String)>,
}

impl CreateOptions {
    /// A version 3 image of `size` bytes with 64 KiB clusters and 16-bit refcounts.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_bits: 16,
            version: 3,
            extended_l2: false,
            refcount_order: 4,
            backing: None,
        }
    }
}

/// The bytes of a new, empty image: header cluster, refcount table, refcount blocks, L1
/// table (the layout `qemu-img create` uses for small images).
pub fn create(options: &CreateOptions) -> Result<Vec<u8>> {
    let cs = 1u64 << options.cluster_bits;
    let l2_entries = cs / if options.extended_l2 { 16 } else { 8 };
    let l1_size = options.size.div_ceil(cs * l2_entries).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let rbe = cs * 8 / (1 << options.refcount_order);
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let (need_blocks, need_table) =
            (total.div_ceil(rbe), (total.div_ceil(rbe) * 8).div_ceil(cs));
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table.max(1);
    }
    let table_at = cs;
    let blocks_at = table_at + table_clusters * cs;
    let l1_at = blocks_at + blocks * cs;
    let total = 1 + table_clusters + blocks + l1_clusters;
    let mut extensions = Vec::new();
    if let Some((_, format)) = &options.backing {
        extensions.push(Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: format.as_bytes().to_vec(),
        });
    }
    let header = Header {
        version: options.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: options.cluster_bits,
        size: options.size,
        crypt_method: 0,
        l1_size: u32::try_from(l1_size)
            .map_err(|_| Qcow2Error::field("header", "l1_size", 36, "too many L1 entries"))?,
        l1_table_offset: l1_at,
        refcount_table_offset: table_at,
        refcount_table_clusters: u32::try_from(table_clusters).unwrap_or(u32::MAX),
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if options.extended_l2 {
            header::incompatible::EXTENDED_L2
        } else {
            0
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: if options.version == 2 {
            4
        } else {
            options.refcount_order
        },
        header_length: if options.version == 2 { 72 } else { 112 },
        additional: if options.version == 2 {
            Vec::new()
        } else {
            vec![0; 8]
        },
        extensions,
        backing_file: options
            .backing
            .as_ref()
            .map(|(name, _)| name.as_bytes().to_vec()),
    };
    let mut image = header.encode()?;
    let len =
        usize::try_from((total) * cs).map_err(|_| Qcow2Error::unsupported("image too large"))?;
    image.resize(len, 0);
    let order = header.refcount_order;
    for b in 0..blocks {
        let at = usize::try_from(table_at + b * 8).unwrap_or(0);
        image[at..at + 8].copy_from_slice(&(blocks_at + b * cs).to_be_bytes());
    }
    for cluster in 0..total {
        let block = usize::try_from(blocks_at + (cluster / rbe) * cs).unwrap_or(0);
        let block_end = block + usize::try_from(cs).unwrap_or(0);
        refcount::set(&mut image[block..block_end], cluster % rbe, order, 1);
    }
    Header::parse(&image)?;
    Ok(image)
}
