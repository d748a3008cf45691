//! A TARSIS container as it arrives from an edge site: decoded as a stream to a cube, and read
//! at random (each block, one spaxel). Nothing may panic; every failure is a typed error.
//!
//! A sender can compute checksums as easily as this target does, so the header's and the aux
//! vectors' sha256 are recomputed over whatever the fuzzer wrote: mutations of the header
//! (dimensions, planes, types) reach the decoder instead of stopping at the checksum.
#![no_main]

use std::io::Cursor;

use astro_fit::edge::container::{ContainerReader, StreamDecoder};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// Rewrites the sha256 after the header (magic, u32 length, JSON) and after the aux vectors
/// (u64 length, bytes), where the input is long enough to hold them.
fn with_valid_checksums(data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    let mut at = 8;
    for width in [4usize, 8] {
        let Some(len) = d.get(at..at + width).map(|b| {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(b);
            u64::from_le_bytes(buf)
        }) else {
            return d;
        };
        let Some(start) = at.checked_add(width) else {
            return d;
        };
        let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else {
            return d;
        };
        if d.len() < end.saturating_add(32) {
            return d;
        }
        let sum = Sha256::digest(&d[start..end]);
        d[end..end + 32].copy_from_slice(&sum);
        at = end + 32;
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let data = with_valid_checksums(data);
    if let Ok(decoder) = StreamDecoder::new(Cursor::new(&data)) {
        let _ = decoder.into_cube();
    }
    if let Ok(mut reader) = ContainerReader::new(Cursor::new(&data)) {
        let blocks = reader.header.n_blocks();
        for b in 0..blocks.min(64) {
            let _ = reader.read_block(b);
        }
        let _ = reader.read_spaxel(0, 0);
    }
});
