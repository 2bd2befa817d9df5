//! Fuzz target: tapdisk's `vhd` driver over arbitrary (possibly corrupt) VHD metadata, with an
//! in-memory I/O engine. Every image the driver accepts is driven with arbitrary writes,
//! discards, write-zeroes and reads (some pairs concurrently, on disjoint ranges) on a
//! current-thread runtime: nothing may panic, no write may land outside the data area (see
//! `vhd_inputs::Guard`: never on the header, parent locators or footers, the BAT and batmap
//! only as whole structures of theirs), reads must match a model of the disk, and the image
//! must still open afterwards.
#![no_main]

#[path = "vhd_inputs.rs"]
mod vhd_inputs;

use std::io;
use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tapdisk::driver::vhd::VhdDriver;
use tapdisk::driver::ImageDriver;
use tapdisk::engine::{IoEngine, IoFuture};
use tapdisk::iobuf::IoBuf;
use vhd::io::{BlockFile, MemFile};
use vhd_inputs::{
    clamp, open_case, pattern, read_all, reopen_and_verify, Case, FuzzOp, Guard, Model,
};

/// An I/O engine over a memory file whose writes are checked by a [`Guard`].
#[derive(Debug)]
struct GuardEngine {
    file: MemFile,
    guard: Guard,
}

impl GuardEngine {
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guard.check_write(offset, len);
        // Like fallocate with KEEP_SIZE: nothing past the end of the file.
        let end = offset.saturating_add(len).min(self.file.len()?);
        if end > offset {
            let zeros = vec![0u8; usize::try_from(end - offset).unwrap_or(0)];
            self.file.write_at(&zeros, offset)?;
        }
        Ok(())
    }
}

impl IoEngine for GuardEngine {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        let len = self.file.len().unwrap_or(0);
        let have = usize::try_from(len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let result = if have > 0 {
            self.file.read_at(&mut buf.as_mut_slice()[..have], offset)
        } else {
            Ok(())
        };
        buf.as_mut_slice()[have..].fill(0);
        Box::pin(std::future::ready(result.map(|()| buf)))
    }
    fn write_at(&self, buf: Arc<IoBuf>, offset: u64) -> IoFuture<'_, ()> {
        self.guard.check_write(offset, buf.len() as u64);
        Box::pin(std::future::ready(
            self.file.write_at(buf.as_slice(), offset),
        ))
    }
    fn sync_data(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.zero(offset, len)))
    }
    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.zero(offset, len)))
    }
    fn pending(&self) -> usize {
        0
    }
    fn name(&self) -> &'static str {
        "memory"
    }
}

/// Runs `op` through the driver; `true` when it completed.
async fn run(driver: &VhdDriver, model: Option<&Model>, op: FuzzOp) -> bool {
    match op {
        FuzzOp::Write {
            sector,
            count,
            seed,
        } => driver
            .write(
                sector,
                Arc::new(IoBuf::copy_from(&pattern(seed, sector, count))),
            )
            .await
            .is_ok(),
        FuzzOp::Zero {
            sector,
            count,
            deallocate: true,
        } => driver.discard(sector, count).await.is_ok(),
        FuzzOp::Zero { sector, count, .. } => driver
            .write_zeroes(
                sector,
                count,
                tapdisk::driver::ZeroFlags {
                    may_deallocate: false,
                },
            )
            .await
            .is_ok(),
        FuzzOp::Read { sector, count } => {
            let buf = IoBuf::zeroed(usize::try_from(count * 512).unwrap_or(0));
            if let Ok(mut out) = driver.read(sector, buf).await {
                for range in out.absent {
                    let at = usize::try_from(range.start * 512).unwrap_or(0);
                    let end = usize::try_from(range.end * 512).unwrap_or(0);
                    out.buf.as_mut_slice()[at..end].fill(0);
                }
                if let Some(model) = model {
                    model.verify(sector, out.buf.as_slice());
                }
            }
            let _ = driver.block_status(sector, count).await;
            true
        }
    }
}

fn disjoint(a: &FuzzOp, b: &FuzzOp) -> bool {
    let ((s0, c0), (s1, c1)) = (a.range(), b.range());
    s0 + c0 <= s1 || s1 + c1 <= s0
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = Case::decode(data) else {
        return;
    };
    let Some(image) = open_case(&case) else {
        return;
    };
    let total = image.total_sectors();
    let mut model = Model::new(total, |buf| read_all(&image, buf));
    let file = case.file();
    let engine = GuardEngine {
        file: file.clone(),
        guard: Guard::new(image.metadata()),
    };
    let driver = VhdDriver::from_image(Path::new("fuzz.vhd"), image, Box::new(engine), false);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let ops: Vec<FuzzOp> = case.ops.iter().filter_map(|op| clamp(*op, total)).collect();
    runtime.block_on(async {
        let mut i = 0;
        while i < ops.len() {
            let op = ops[i];
            match ops.get(i + 1).filter(|next| disjoint(&op, next)) {
                Some(next) if !matches!(op, FuzzOp::Read { .. }) => {
                    let (a, b) = tokio::join!(
                        run(&driver, model.as_ref(), op),
                        run(&driver, model.as_ref(), *next)
                    );
                    if let Some(model) = model.as_mut() {
                        model.apply(&op, a);
                        model.apply(next, b);
                    }
                    i += 2;
                }
                _ => {
                    let ok = run(&driver, model.as_ref(), op).await;
                    if let Some(model) = model.as_mut() {
                        model.apply(&op, ok);
                    }
                    i += 1;
                }
            }
        }
    });
    drop(driver);
    reopen_and_verify(&case, file.contents(), model.as_ref());
});
