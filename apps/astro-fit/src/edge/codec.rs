//! Lossless byte codec: a reversible filter over fixed-width little-endian samples (byte
//! shuffle, optionally after a delta or XOR with the previous sample, i.e. along wavelength),
//! then zstd. Every filter is a bijection on bytes, so any bit pattern (NaN payloads, -0.0,
//! infinities) round-trips exactly.
//!
//! Encoded form: one byte naming the filter, then one zstd frame.

use serde::{Deserialize, Serialize};

use super::EdgeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    /// zstd on the bytes as they are.
    None,
    /// Byte planes: all first bytes, then all second bytes, ...
    Shuffle,
    /// Wrapping integer difference with the previous sample, then shuffle.
    DeltaShuffle,
    /// XOR with the previous sample's bits, then shuffle.
    XorShuffle,
}

impl Filter {
    pub const ALL: [Filter; 4] = [
        Filter::None,
        Filter::Shuffle,
        Filter::DeltaShuffle,
        Filter::XorShuffle,
    ];

    fn tag(self) -> u8 {
        match self {
            Filter::None => 0,
            Filter::Shuffle => 1,
            Filter::DeltaShuffle => 2,
            Filter::XorShuffle => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Filter> {
        Filter::ALL.into_iter().find(|f| f.tag() == tag)
    }
}

/// How to choose the filter of each encoded section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterChoice {
    Fixed(Filter),
    /// Try every filter and keep the smallest output (slower to compress, same to decompress).
    Best,
}

fn check_width(width: usize) -> Result<(), EdgeError> {
    if matches!(width, 1 | 2 | 4 | 8) {
        Ok(())
    } else {
        Err(EdgeError::InvalidParameter(format!(
            "sample width {width} bytes (must be 1, 2, 4 or 8)"
        )))
    }
}

fn read_word(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(buf)
}

fn width_mask(width: usize) -> u64 {
    if width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    }
}

/// Applies `op(current, previous)` sample by sample, in place, front to back on the original
/// values (for the forward delta/XOR) when `forward`, or on the already restored values.
fn predict_in_place(data: &mut [u8], width: usize, forward: bool, op: impl Fn(u64, u64) -> u64) {
    let mask = width_mask(width);
    let mut prev = 0u64;
    for word in data.chunks_exact_mut(width) {
        let cur = read_word(word);
        let out = op(cur, prev) & mask;
        prev = if forward { cur } else { out };
        word.copy_from_slice(&out.to_le_bytes()[..width]);
    }
}

fn shuffle(data: &[u8], width: usize, out: &mut Vec<u8>) {
    let n = data.len() / width;
    out.clear();
    out.resize(data.len(), 0);
    for (i, word) in data.chunks_exact(width).enumerate() {
        for (p, &b) in word.iter().enumerate() {
            out[p * n + i] = b;
        }
    }
}

fn unshuffle(data: &[u8], width: usize, out: &mut Vec<u8>) {
    let n = data.len() / width;
    out.clear();
    out.resize(data.len(), 0);
    for (i, word) in out.chunks_exact_mut(width).enumerate() {
        for (p, b) in word.iter_mut().enumerate() {
            *b = data[p * n + i];
        }
    }
}

fn apply_filter(raw: &[u8], width: usize, filter: Filter) -> Vec<u8> {
    let mut filtered = raw.to_vec();
    match filter {
        Filter::None | Filter::Shuffle => {}
        Filter::DeltaShuffle => predict_in_place(&mut filtered, width, true, u64::wrapping_sub),
        Filter::XorShuffle => predict_in_place(&mut filtered, width, true, |c, p| c ^ p),
    }
    if filter == Filter::None {
        return filtered;
    }
    let mut shuffled = Vec::new();
    shuffle(&filtered, width, &mut shuffled);
    shuffled
}

/// Encodes `raw` (whole samples of `width` bytes) with one filter and zstd at `level`.
pub fn encode_with(
    raw: &[u8],
    width: usize,
    filter: Filter,
    level: i32,
) -> Result<Vec<u8>, EdgeError> {
    check_width(width)?;
    if !raw.len().is_multiple_of(width) {
        return Err(EdgeError::InvalidParameter(format!(
            "{} bytes is not a whole number of {width}-byte samples",
            raw.len()
        )));
    }
    let filtered = apply_filter(raw, width, filter);
    let mut out = vec![filter.tag()];
    let frame = zstd::bulk::compress(&filtered, level).map_err(|e| EdgeError::Stream {
        context: "zstd compression".into(),
        source: e,
    })?;
    out.extend_from_slice(&frame);
    Ok(out)
}

/// Encodes `raw` with the filter `choice` names (or the best of all).
pub fn encode(
    raw: &[u8],
    width: usize,
    choice: FilterChoice,
    level: i32,
) -> Result<Vec<u8>, EdgeError> {
    match choice {
        FilterChoice::Fixed(filter) => encode_with(raw, width, filter, level),
        FilterChoice::Best => {
            let mut best: Option<Vec<u8>> = None;
            for filter in Filter::ALL {
                let candidate = encode_with(raw, width, filter, level)?;
                if best.as_ref().is_none_or(|b| candidate.len() < b.len()) {
                    best = Some(candidate);
                }
            }
            Ok(best.expect("Filter::ALL is not empty"))
        }
    }
}

/// Decodes what [`encode`] produced; `expected_len` is the raw length the caller knows from the
/// container header, and anything else is reported as corruption of `part`.
pub fn decode(
    encoded: &[u8],
    width: usize,
    expected_len: usize,
    part: &str,
) -> Result<Vec<u8>, EdgeError> {
    check_width(width)?;
    let corrupt = |reason: String| EdgeError::Corrupt {
        part: part.to_string(),
        reason,
    };
    let (&tag, frame) = encoded
        .split_first()
        .ok_or_else(|| corrupt("empty section".into()))?;
    let filter =
        Filter::from_tag(tag).ok_or_else(|| corrupt(format!("unknown filter tag {tag}")))?;
    let filtered =
        zstd::bulk::decompress(frame, expected_len).map_err(|e| corrupt(format!("zstd: {e}")))?;
    if filtered.len() != expected_len {
        return Err(corrupt(format!(
            "decoded {} bytes, expected {expected_len}",
            filtered.len()
        )));
    }
    if filter == Filter::None {
        return Ok(filtered);
    }
    let mut raw = Vec::new();
    unshuffle(&filtered, width, &mut raw);
    match filter {
        Filter::None | Filter::Shuffle => {}
        Filter::DeltaShuffle => predict_in_place(&mut raw, width, false, u64::wrapping_add),
        Filter::XorShuffle => predict_in_place(&mut raw, width, false, |c, p| c ^ p),
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn special_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(-f32::NAN),
            Just(f32::from_bits(0x7fc0_1234)),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(-0.0f32),
            Just(0.0f32),
            Just(f32::MIN_POSITIVE / 3.0),
            any::<f32>(),
            -1e3f32..1e3f32,
        ]
    }

    proptest! {
        #[test]
        fn every_filter_round_trips_f32_bit_for_bit(
            values in prop::collection::vec(special_f32(), 0..600),
            filter in prop::sample::select(Filter::ALL.to_vec()),
        ) {
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let enc = encode_with(&raw, 4, filter, 3).unwrap();
            prop_assert_eq!(decode(&enc, 4, raw.len(), "test").unwrap(), raw);
        }

        #[test]
        fn every_width_round_trips(
            raw in prop::collection::vec(any::<u8>(), 0..512),
            width in prop::sample::select(vec![1usize, 2, 4, 8]),
        ) {
            let raw = &raw[..raw.len() / width * width];
            let enc = encode(raw, width, FilterChoice::Best, 1).unwrap();
            prop_assert_eq!(decode(&enc, width, raw.len(), "test").unwrap(), raw);
        }
    }

    #[test]
    fn delta_beats_plain_zstd_on_a_smooth_integer_ramp() {
        let raw: Vec<u8> = (0..4096i32)
            .flat_map(|v| (v * 3 + 1000).to_le_bytes())
            .collect();
        let plain = encode_with(&raw, 4, Filter::None, 3).unwrap();
        let delta = encode_with(&raw, 4, Filter::DeltaShuffle, 3).unwrap();
        assert!(
            delta.len() * 4 < plain.len(),
            "{} vs {}",
            delta.len(),
            plain.len()
        );
    }

    #[test]
    fn bad_input_is_reported_not_panicked() {
        assert!(matches!(
            encode_with(&[1, 2, 3], 2, Filter::None, 3),
            Err(EdgeError::InvalidParameter(_))
        ));
        assert!(matches!(
            encode_with(&[], 3, Filter::None, 3),
            Err(EdgeError::InvalidParameter(_))
        ));
        let raw = vec![7u8; 64];
        let mut enc = encode_with(&raw, 4, Filter::Shuffle, 3).unwrap();
        enc[0] = 99;
        let err = decode(&enc, 4, 64, "block 3 FLUX").unwrap_err();
        assert!(err.to_string().contains("block 3 FLUX"), "{err}");
        assert!(err.to_string().contains("unknown filter tag 99"), "{err}");
        let enc = encode_with(&raw, 4, Filter::Shuffle, 3).unwrap();
        assert!(matches!(
            decode(&enc, 4, 60, "x"),
            Err(EdgeError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(&[], 4, 0, "x"),
            Err(EdgeError::Corrupt { .. })
        ));
    }
}
