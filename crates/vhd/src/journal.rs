//! Undo journal for metadata-moving operations (resize). Before a region of
//! the VHD is changed, its old bytes are appended to the journal and
//! synced; while the operation runs the VHD's footers are poisoned
//! (`v_poison`) so nothing opens a half-changed image. Reverting writes
//! every saved region back and truncates the VHD to its old length.
//!
//! Layout (big-endian): a 512-byte header `{ "vjournal", vhd uuid[16],
//! vhd_footer_offset u64, data_entries u32, metadata_entries u32,
//! data_offset u64, metadata_offset u64, journal_eof u64, zero pad }`,
//! then entries `{ cookie u64 = 0xaaaa12344321aaaa, type u32, size u32,
//! offset u64, checksum u32, pad u32 }` each followed by `size` bytes.
//! The field order follows the C journal; byte compatibility with journals
//! written by the C tools is not a goal.
//!
//! [`Transaction`] wraps a journal for one update: it creates the journal
//! file (refusing to overwrite an existing one, which may be the only way
//! back for an interrupted operation), saves every region the update will
//! change before the caller touches the image, and on [`Transaction::finish`]
//! commits (entry counts zeroed) and removes the file.
//!
//! A journal may also be a block device made for it (LVHD storage keeps
//! journals on logical volumes): it is written over, never truncated or
//! removed, and a committed header (no entries) is what marks it done.

use std::path::{Path, PathBuf};

use crate::bytes::{array, be32, be64, ones_complement_checksum, put32, put64};
use crate::error::{FormatError, Result, VhdError};
use crate::io::{BlockFile, Opener};

/// Journal header cookie.
pub const JOURNAL_COOKIE: [u8; 8] = *b"vjournal";
/// Entry cookie.
pub const ENTRY_COOKIE: u64 = 0xaaaa_1234_4321_aaaa;
const HEADER: u64 = 512;
const ENTRY: usize = 32;

/// What a journal entry saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Primary footer.
    Footer = 1,
    /// Backup footer at offset 0.
    FooterCopy = 2,
    /// Dynamic header.
    Header = 3,
    /// Parent locator payload.
    Locator = 4,
    /// BAT.
    Bat = 5,
    /// Batmap header.
    BatmapHeader = 6,
    /// Batmap map.
    BatmapMap = 7,
    /// A data block (bitmap and data).
    Data = 8,
}

impl EntryKind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Footer,
            2 => Self::FooterCopy,
            3 => Self::Header,
            4 => Self::Locator,
            5 => Self::Bat,
            6 => Self::BatmapHeader,
            7 => Self::BatmapMap,
            8 => Self::Data,
            _ => return None,
        })
    }
}

/// One saved region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Offset in the VHD.
    pub offset: u64,
    /// Old bytes.
    pub data: Vec<u8>,
}

/// Decoded journal header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHeader {
    /// UUID of the journaled VHD.
    pub uuid: [u8; 16],
    /// Primary footer offset of the VHD before the operation; the VHD is
    /// truncated to this plus 512 on revert.
    pub vhd_footer_offset: u64,
    /// Data block entries.
    pub data_entries: u32,
    /// Metadata entries.
    pub metadata_entries: u32,
    /// End of the last committed entry.
    pub journal_eof: u64,
}

impl JournalHeader {
    fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(&JOURNAL_COOKIE);
        b[8..24].copy_from_slice(&self.uuid);
        put64(&mut b, 24, self.vhd_footer_offset);
        put32(&mut b, 32, self.data_entries);
        put32(&mut b, 36, self.metadata_entries);
        put64(&mut b, 40, HEADER);
        put64(&mut b, 48, HEADER);
        put64(&mut b, 56, self.journal_eof);
        b
    }

    /// Parses a journal header.
    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < 512 {
            return Err(FormatError::Truncated {
                structure: "journal header",
                offset: 0,
                needed: 512,
                available: b.len(),
            });
        }
        if b[..8] != JOURNAL_COOKIE {
            return Err(FormatError::field(
                "journal header",
                "cookie",
                0,
                "expected \"vjournal\"",
            ));
        }
        Ok(Self {
            uuid: array(b, 8),
            vhd_footer_offset: be64(b, 24),
            data_entries: be32(b, 32),
            metadata_entries: be32(b, 36),
            journal_eof: be64(b, 56),
        })
    }
}

/// A journal being written.
#[derive(Debug)]
pub struct Journal<J: BlockFile> {
    file: J,
    header: JournalHeader,
    name: String,
}

impl<J: BlockFile> Journal<J> {
    /// Starts a journal in `file` for a VHD with `uuid` whose primary footer
    /// is at `vhd_footer_offset`.
    pub fn create(file: J, name: &str, uuid: [u8; 16], vhd_footer_offset: u64) -> Result<Self> {
        let header = JournalHeader {
            uuid,
            vhd_footer_offset,
            data_entries: 0,
            metadata_entries: 0,
            journal_eof: HEADER,
        };
        let j = Self {
            file,
            header,
            name: name.to_string(),
        };
        j.file
            .set_len(0)
            .map_err(|e| VhdError::io(format!("{name}: truncate journal"), e))?;
        j.write_header()?;
        j.sync()?;
        Ok(j)
    }

    fn write_header(&self) -> Result<()> {
        self.file
            .write_at(&self.header.to_bytes(), 0)
            .map_err(|e| VhdError::io(format!("{}: write journal header", self.name), e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync()
            .map_err(|e| VhdError::io(format!("{}: sync journal", self.name), e))
    }

    /// Saves `data` (the current bytes at `offset` of the VHD) and makes the
    /// entry durable before returning.
    pub fn add(&mut self, kind: EntryKind, offset: u64, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| VhdError::InvalidArgument("journal entry too large".into()))?;
        let mut e = [0u8; ENTRY];
        put64(&mut e, 0, ENTRY_COOKIE);
        put32(&mut e, 8, kind as u32);
        put32(&mut e, 12, size);
        put64(&mut e, 16, offset);
        put32(&mut e, 24, ones_complement_checksum(data, None));
        let mut buf = e.to_vec();
        buf.extend_from_slice(data);
        let at = self.header.journal_eof;
        self.file
            .write_at(&buf, at)
            .map_err(|e| VhdError::io(format!("{}: write journal entry at {at}", self.name), e))?;
        self.sync()?;
        self.header.journal_eof += buf.len() as u64;
        if kind == EntryKind::Data {
            self.header.data_entries += 1;
        } else {
            self.header.metadata_entries += 1;
        }
        self.write_header()?;
        self.sync()
    }

    /// Saves the current bytes of `vhd` in `[offset, offset + len)`, clipped
    /// to its end.
    pub fn save<F: BlockFile>(
        &mut self,
        vhd: &F,
        kind: EntryKind,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let flen = vhd
            .len()
            .map_err(|e| VhdError::io(format!("{}: size", self.name), e))?;
        let len = len.min(flen.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
        vhd.read_at(&mut b, offset)
            .map_err(|e| VhdError::io(format!("{}: read VHD at {offset}", self.name), e))?;
        self.add(kind, offset, &b)
    }

    /// Marks the operation complete: the entry counts are zeroed and the
    /// journal truncated (the caller then removes the file).
    pub fn commit(mut self) -> Result<J> {
        self.header.data_entries = 0;
        self.header.metadata_entries = 0;
        self.header.journal_eof = HEADER;
        self.write_header()?;
        self.file
            .set_len(HEADER)
            .map_err(|e| VhdError::io(format!("{}: truncate journal", self.name), e))?;
        self.sync()?;
        Ok(self.file)
    }
}

/// A region of the image an update will change: `(kind, offset, length)`.
pub type Region = (EntryKind, u64, u64);

/// Largest single journal entry; bigger regions are split.
const MAX_ENTRY: u64 = 4 << 20;

/// One journaled update of an image file (see the module docs).
#[derive(Debug)]
pub struct Transaction<J: BlockFile> {
    journal: Journal<J>,
    path: PathBuf,
}

impl<J: BlockFile> Transaction<J> {
    /// Creates the journal at `journal_path` for the image in `vhd` (UUID
    /// `uuid`) and saves `regions` (clipped to the image's end; large ones
    /// split). On revert the image is truncated back to its current length.
    /// Fails with `EEXIST` if the journal file exists.
    pub fn begin<O: Opener<File = J>, F: BlockFile>(
        opener: &O,
        journal_path: &Path,
        vhd: &F,
        uuid: [u8; 16],
        regions: &[Region],
    ) -> Result<Self> {
        let jname = journal_path.display().to_string();
        let old_len = vhd
            .len()
            .map_err(|e| VhdError::io(format!("{jname}: size of the image"), e))?;
        let created = if crate::io::is_block_device(journal_path) {
            opener.open(journal_path, true)
        } else {
            opener.create(journal_path)
        };
        let file = created.map_err(|e| {
            let context = if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "journal {jname} already exists (an earlier operation was interrupted: \
                     run `vhd-util revert` with it, or remove it if the image checks valid)"
                )
            } else {
                format!("{jname}: create journal")
            };
            VhdError::io(context, e)
        })?;
        let journal = Journal::create(file, &jname, uuid, old_len.saturating_sub(512))?;
        sync_parent_dir(journal_path);
        let mut t = Self {
            journal,
            path: journal_path.to_path_buf(),
        };
        for &(kind, offset, len) in regions {
            t.save(vhd, kind, offset, len)?;
        }
        Ok(t)
    }

    /// Saves one more region (before the caller changes it).
    pub fn save<F: BlockFile>(
        &mut self,
        vhd: &F,
        kind: EntryKind,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(MAX_ENTRY);
            self.journal.save(vhd, kind, at, n)?;
            at += n;
        }
        Ok(())
    }

    /// The journal file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits and removes the journal. The caller must have synced the
    /// image first.
    pub fn finish(self) -> Result<()> {
        self.journal.commit()?;
        remove_journal(&self.path)
    }
}

/// Removes a finished journal file; a journal device stays (its committed
/// header says there is nothing to revert).
pub fn remove_journal(path: &Path) -> Result<()> {
    if crate::io::is_block_device(path) {
        return Ok(());
    }
    std::fs::remove_file(path)
        .map_err(|e| VhdError::io(format!("{}: remove journal", path.display()), e))?;
    sync_parent_dir(path);
    Ok(())
}

/// Marks a journal whose entries were restored as committed (entry counts
/// zeroed), so running revert again restores nothing.
pub fn mark_committed<J: BlockFile>(journal: &J) -> Result<()> {
    let mut hb = [0u8; 512];
    journal
        .read_at(&mut hb, 0)
        .map_err(|e| VhdError::io("read journal header", e))?;
    let mut header = JournalHeader::parse(&hb)?;
    header.data_entries = 0;
    header.metadata_entries = 0;
    header.journal_eof = HEADER;
    journal
        .write_at(&header.to_bytes(), 0)
        .map_err(|e| VhdError::io("write journal header", e))?;
    journal.sync().map_err(|e| VhdError::io("sync journal", e))
}

/// Makes a file's creation or removal durable (best effort: some file
/// systems refuse to sync directories).
fn sync_parent_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Reads a journal's header and committed entries.
pub fn read_journal<J: BlockFile>(j: &J) -> Result<(JournalHeader, Vec<Entry>)> {
    let mut hb = [0u8; 512];
    j.read_at(&mut hb, 0)
        .map_err(|e| VhdError::io("read journal header", e))?;
    let header = JournalHeader::parse(&hb)?;
    let total = u64::from(header.data_entries) + u64::from(header.metadata_entries);
    let len = j.len().map_err(|e| VhdError::io("journal size", e))?;
    let mut at = HEADER;
    let mut entries = Vec::new();
    for i in 0..total {
        let mut e = [0u8; ENTRY];
        j.read_at(&mut e, at)
            .map_err(|err| VhdError::io(format!("read journal entry {i} at {at}"), err))?;
        if be64(&e, 0) != ENTRY_COOKIE {
            return Err(FormatError::field("journal entry", "cookie", at, "bad cookie").into());
        }
        let kind = EntryKind::from_u32(be32(&e, 8))
            .ok_or_else(|| FormatError::field("journal entry", "type", at + 8, "unknown type"))?;
        let size = u64::from(be32(&e, 12));
        let offset = be64(&e, 16);
        if at + ENTRY as u64 + size > len {
            return Err(FormatError::field(
                "journal entry",
                "size",
                at + 12,
                "past end of journal",
            )
            .into());
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        j.read_at(&mut data, at + ENTRY as u64)
            .map_err(|err| VhdError::io(format!("read journal entry {i} data"), err))?;
        if ones_complement_checksum(&data, None) != be32(&e, 24) {
            return Err(
                FormatError::field("journal entry", "checksum", at + 24, "mismatch").into(),
            );
        }
        entries.push(Entry { kind, offset, data });
        at += ENTRY as u64 + size;
    }
    Ok((header, entries))
}

/// Rolls `vhd` back to the state saved in `journal`: restores every saved
/// region and truncates to the old length. A committed (empty) journal
/// leaves the VHD untouched.
///
/// A journal shorter than its header is the trace of a crash while the
/// journal was being created, before anything of the VHD was saved or
/// changed: it reverts nothing.
pub fn revert<F: BlockFile, J: BlockFile>(vhd: &F, journal: &J) -> Result<usize> {
    if journal.len().map_err(|e| VhdError::io("journal size", e))? < HEADER {
        return Ok(0);
    }
    let (header, entries) = read_journal(journal)?;
    if entries.is_empty() {
        return Ok(0);
    }
    for e in &entries {
        vhd.write_at(&e.data, e.offset)
            .map_err(|err| VhdError::io(format!("revert: write at {}", e.offset), err))?;
    }
    vhd.set_len(header.vhd_footer_offset + 512)
        .map_err(|e| VhdError::io("revert: truncate", e))?;
    vhd.sync().map_err(|e| VhdError::io("revert: sync", e))?;
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFile;

    #[test]
    fn save_and_revert() {
        let vhd = MemFile::new(b"0123456789".repeat(60));
        let jf = MemFile::default();
        let mut j = Journal::create(jf.clone(), "j", [1; 16], 88).unwrap();
        j.save(&vhd, EntryKind::Header, 2, 4).unwrap();
        j.save(&vhd, EntryKind::Data, 598, 100).unwrap();
        vhd.write_at(b"xxxx", 2).unwrap();
        vhd.write_at(b"yyyyyyyy", 596).unwrap();
        let (h, e) = read_journal(&jf).unwrap();
        assert_eq!(h.metadata_entries, 1);
        assert_eq!(h.data_entries, 1);
        assert_eq!(e[1].data, b"89");
        assert_eq!(revert(&vhd, &jf).unwrap(), 2);
        let c = vhd.contents();
        assert_eq!(c.len(), 600);
        assert_eq!(&c[..10], b"0123456789");
        assert_eq!(&c[590..600], b"012345yy89");
        // committed journals revert nothing
        let j = Journal::create(MemFile::default(), "j", [1; 16], 88).unwrap();
        let f = j.commit().unwrap();
        assert_eq!(revert(&vhd, &f).unwrap(), 0);
        assert!(read_journal(&MemFile::new(vec![0; 512])).is_err());
    }

    #[test]
    fn transaction_saves_before_and_removes_after() {
        let dir = tempfile::tempdir().unwrap();
        let jp = dir.path().join("img.journal");
        let vhd = MemFile::new(b"abcdefgh".repeat(128));
        let t = Transaction::begin(
            &crate::io::StdOpener,
            &jp,
            &vhd,
            [3; 16],
            &[
                (EntryKind::Footer, 512, 512),
                (EntryKind::FooterCopy, 0, 512),
            ],
        )
        .unwrap();
        // An existing journal is never overwritten.
        let e = Transaction::begin(&crate::io::StdOpener, &jp, &vhd, [3; 16], &[]).unwrap_err();
        assert_eq!(e.errno(), 17, "{e}");
        assert!(e.to_string().contains("vhd-util revert"), "{e}");
        vhd.write_at(b"XY", 1000).unwrap();
        vhd.write_at(b"Z", 1024).unwrap();
        let jf = std::fs::File::open(&jp).unwrap();
        let (h, entries) = read_journal(&jf).unwrap();
        assert_eq!((h.metadata_entries, h.vhd_footer_offset), (2, 512));
        assert_eq!(revert(&vhd, &jf).unwrap(), 2);
        assert_eq!(vhd.contents(), b"abcdefgh".repeat(128));
        assert_eq!(entries[0].data.len(), 512);
        t.finish().unwrap();
        assert!(!jp.exists());
        // A journal cut short while being created reverts nothing.
        assert_eq!(revert(&vhd, &MemFile::new(vec![b'v'; 100])).unwrap(), 0);
    }
}
