//! Fuzz target: qcow2 metadata parsing and planning over an in-memory image. The input's
//! first byte chooses how it becomes an image: used whole as the file, or a valid image made
//! by `qcow2::image::create` (shape from the next bytes) with the rest of the input patched
//! over its first 64 KiB (header, tables, the first data), which reaches the planner far more
//! often than random bytes would. Raw, the input is also parsed as a header and L2 entries.
//! The image is checked, has its refcounts rebuilt (as for a dirty image), and is opened,
//! read, written, zeroed and closed through the planner and its synchronous executor. Nothing may panic, hang or allocate without bound; errors are
//! fine.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use qcow2::check::{check, rebuild_refcounts};
use qcow2::entry::Entry;
use qcow2::header::Header;
use qcow2::image::{create, CreateOptions, Image, Storage};
use qcow2::layout::Layout;

/// Sparse storage: 4 KiB pages, so reservations that grow the file cost nothing.
#[derive(Default, Clone)]
struct Sparse {
    pages: BTreeMap<u64, Vec<u8>>,
    len: u64,
}

impl Sparse {
    fn from(data: &[u8]) -> Self {
        let mut storage = Self::default();
        let _ = storage.write_at(data, 0);
        storage
    }
}

impl Storage for Sparse {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at % 4096) as usize;
            let n = (4096 - within).min(buf.len() - done);
            if at < self.len {
                if let Some(page) = self.pages.get(&(at / 4096)) {
                    let n = n.min((self.len - at) as usize);
                    buf[done..done + n].copy_from_slice(&page[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let within = (at % 4096) as usize;
            let n = (4096 - within).min(data.len() - done);
            let page = self.pages.entry(at / 4096).or_insert_with(|| vec![0; 4096]);
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
        Ok(())
    }

    fn file_len(&mut self) -> std::io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.len = len;
        self.pages.retain(|page, _| page * 4096 < len);
        Ok(())
    }
}

/// A valid image shaped by `shape`, with `patches` (offset: 2 bytes, value: 1 byte each)
/// applied to its first 64 KiB.
fn generated(shape: &[u8], patches: &[u8]) -> Option<Vec<u8>> {
    let cluster_bits = 9 + u32::from(shape[0] % 8);
    let version = 2 + u32::from(shape[1] & 1);
    let options = CreateOptions {
        size: (u64::from(shape[2] % 16) + 1) << 20,
        cluster_bits,
        version,
        extended_l2: version == 3 && cluster_bits >= 14 && shape[1] & 2 != 0,
        refcount_order: u32::from(shape[3] % 7),
        backing: None,
    };
    let mut image = create(&options).ok()?;
    for patch in patches.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([patch[0], patch[1]]));
        if let Some(byte) = image.get_mut(at) {
            *byte = patch[2];
        }
    }
    Some(image)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 || data.len() > (4 << 20) {
        return;
    }
    let (ops, rest) = data[1..].split_at(8);
    let made;
    let image = if data[0] & 1 == 0 {
        rest
    } else {
        match generated(&rest[..4], &rest[4..]) {
            Some(bytes) => {
                made = bytes;
                &made
            }
            None => return,
        }
    };
    if let Ok(header) = Header::parse(image) {
        let _ = header.encode();
        let _ = header.check_open(true);
        let layout = Layout::of(&header);
        for words in image.chunks_exact(16).take(64) {
            let word = |i: usize| u64::from_be_bytes(words[i * 8..i * 8 + 8].try_into().unwrap());
            if let Ok(entry) = Entry::decode([word(0), word(1)], &layout, 0) {
                let _ = entry.encode(&layout);
            }
        }
        // Keep every run small: skip images whose tables alone would take long to walk.
        if u64::from(header.l1_size) > 1 << 16 || header.refcount_table_clusters > 64 {
            return;
        }
    } else {
        return;
    }
    let _ = check(&mut Sparse::from(image));
    let mut rebuilt = Sparse::from(image);
    if rebuild_refcounts(&mut rebuilt).is_ok() {
        let _ = check(&mut rebuilt);
    }
    let Ok(mut opened) = Image::open(Sparse::from(image), true) else {
        return;
    };
    let size = opened.header().size;
    if size < 512 {
        return;
    }
    let sectors = size / 512;
    for op in ops.chunks_exact(2) {
        let sector = u64::from(u16::from_le_bytes([op[0], op[1] & 0x3f])) * 131 % sectors;
        let count = (1 + u64::from(op[1] >> 6) * 7).min(sectors - sector);
        let len = count * 512;
        match op[0] % 4 {
            0 => {
                let mut buf = vec![0u8; len as usize];
                let _ = opened.read(sector * 512, &mut buf);
            }
            1 => {
                let _ = opened.write(sector * 512, &vec![op[1] | 1; len as usize]);
            }
            2 => {
                let _ = opened.zero(sector * 512, len, op[1] & 1 == 0);
            }
            _ => {
                let _ = opened.block_status(sector * 512, len);
            }
        }
    }
    if let Ok(mut storage) = opened.close() {
        let _ = check(&mut storage);
    }
});
