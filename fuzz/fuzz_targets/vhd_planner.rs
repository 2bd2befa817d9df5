//! Fuzz target: the VHD core's plans, executed by the library's synchronous executor, over
//! arbitrary (possibly corrupt) metadata. An image the core accepts for writing is driven
//! with arbitrary writes, discards, write-zeroes and reads: nothing may panic, every write
//! must land in the data area (see `vhd_inputs::Guard`), reads must match a model of the
//! disk, and the image must still open and read like the model afterwards. Images the core
//! refuses must still open for inspection and map without panicking.
#![no_main]

#[path = "vhd_inputs.rs"]
mod vhd_inputs;

use std::io;

use libfuzzer_sys::fuzz_target;
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{BlockFile, MemFile};
use vhd_inputs::{
    clamp, open_case, pattern, read_all, reopen_and_verify, Case, FuzzOp, Guard, Model,
};

/// A memory file whose writes are checked by a [`Guard`].
struct GuardFile {
    inner: MemFile,
    guard: Guard,
}

impl BlockFile for GuardFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.guard.check_write(offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = Case::decode(data) else {
        return;
    };
    let Some(probe) = open_case(&case) else {
        if let Ok(image) = VhdImage::open(case.file(), "fuzz.vhd", OpenOptions::inspect()) {
            let _ = image.map(0, image.total_sectors().min(1 << 16));
        }
        return;
    };
    let guard = Guard::new(probe.metadata());
    let total = probe.total_sectors();
    let mut model = Model::new(total, |buf| read_all(&probe, buf));
    drop(probe);
    let file = GuardFile {
        inner: case.file(),
        guard,
    };
    let mut image =
        VhdImage::open(file, "fuzz.vhd", OpenOptions::read_write()).expect("opened before");
    for op in case.ops.iter().filter_map(|op| clamp(*op, total)) {
        let ok = match op {
            FuzzOp::Write {
                sector,
                count,
                seed,
            } => image
                .write_sectors(sector, &pattern(seed, sector, count))
                .is_ok(),
            FuzzOp::Zero {
                sector,
                count,
                deallocate,
            } => image.zero_sectors(sector, count, deallocate).is_ok(),
            FuzzOp::Read { sector, count } => {
                let mut buf = vec![0u8; usize::try_from(count * 512).unwrap_or(0)];
                if image.read_sectors(sector, &mut buf).is_ok() {
                    if let Some(model) = &model {
                        model.verify(sector, &buf);
                    }
                }
                true
            }
        };
        if let Some(model) = model.as_mut() {
            model.apply(&op, ok);
        }
    }
    // What we wrote must still open as a writer would, and read like the model.
    reopen_and_verify(&case, image.into_file().inner.contents(), model.as_ref());
});
