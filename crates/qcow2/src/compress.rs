//! Decompression of compressed clusters: raw deflate streams (compression type zlib) and
//! zstd frames. The stored data may be followed by unrelated bytes (the rest of its last
//! sector, or the next compressed cluster); decompression stops once a cluster is produced.

use std::io::Read;

use crate::error::{Qcow2Error, Result};
use crate::header::CompressionType;

/// Fills `out` (one cluster) by decompressing `input`, read at host offset `offset` (for
/// error messages).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8], offset: u64) -> Result<()> {
    let failed = |reason: String| Qcow2Error::Compressed { offset, reason };
    match kind {
        CompressionType::Zlib => {
            use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
            use miniz_oxide::inflate::TINFLStatus;
            let mut state = DecompressorOxide::new();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _, produced) = decompress(&mut state, input, out, 0, flags);
            match status {
                TINFLStatus::Done | TINFLStatus::HasMoreOutput if produced == out.len() => Ok(()),
                TINFLStatus::Done => Err(failed(format!(
                    "deflate stream ends after {produced} of {} bytes",
                    out.len()
                ))),
                other => Err(failed(format!("deflate stream is invalid ({other:?})"))),
            }
        }
        CompressionType::Zstd => {
            let mut source = input;
            let mut decoder = ruzstd::StreamingDecoder::new(&mut source)
                .map_err(|e| failed(format!("zstd frame header is invalid: {e}")))?;
            decoder
                .read_exact(out)
                .map_err(|e| failed(format!("zstd data is invalid or short: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_with_trailing_bytes() {
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut stream = miniz_oxide::deflate::compress_to_vec(&cluster, 6);
        stream.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &stream, &mut out, 0).unwrap();
        assert_eq!(out, cluster);
        let err = decompress(CompressionType::Zlib, &stream[..10], &mut out, 77).unwrap_err();
        assert!(err.to_string().contains("offset 77"), "{err}");
        let err = decompress(CompressionType::Zstd, &stream, &mut out, 5).unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
    }
}
