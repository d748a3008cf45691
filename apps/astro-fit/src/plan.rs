//! Chunk planning: bins -> chunks of spectra, the unit a worker fits and the control plane
//! schedules. A pure function over plain, serialisable structs.
//!
//! Chunks are built in row order so that a chunk reads a bounded band of cube rows
//! (`rows`), which keeps streamed reading cheap and memory bounded; a chunk holds at most
//! `max_spectra` bins (each bin is one spectrum to fit) unless one bin alone is wider than
//! `max_rows`, in which case it gets a chunk of its own.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// One bin to fit: its spaxels as `[x, y]` cube coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinSpec {
    pub id: usize,
    pub spaxels: Vec<[u32; 2]>,
    /// S/N of the bin in the chosen window (for metadata and scheduling).
    pub sn: f64,
}

impl BinSpec {
    /// Cube rows the bin's spaxels occupy.
    pub fn rows(&self) -> Range<usize> {
        let min = self.spaxels.iter().map(|s| s[1]).min().unwrap_or(0) as usize;
        let max = self.spaxels.iter().map(|s| s[1]).max().unwrap_or(0) as usize;
        min..max + 1
    }
}

/// A unit of work: the bins it fits and the band of rows it must read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: usize,
    pub rows: Range<usize>,
    pub bins: Vec<usize>,
    /// Spaxels read and spectra fitted: what a scheduler's cost model wants to know.
    pub nspaxels: usize,
    pub nspectra: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLimits {
    pub max_spectra: usize,
    pub max_rows: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_spectra: 256,
            max_rows: 8,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("chunk limits must be positive (max_spectra {max_spectra}, max_rows {max_rows})")]
    BadLimits { max_spectra: usize, max_rows: usize },
    #[error("bin {0} has no spaxels")]
    EmptyBin(usize),
    #[error("bin id {0} appears more than once")]
    DuplicateBin(usize),
}

/// Splits `bins` into chunks within `limits`. Every bin lands in exactly one chunk; chunks are
/// numbered from 0 in order of their first row.
pub fn plan_chunks(bins: &[BinSpec], limits: ChunkLimits) -> Result<Vec<Chunk>, PlanError> {
    if limits.max_spectra == 0 || limits.max_rows == 0 {
        return Err(PlanError::BadLimits {
            max_spectra: limits.max_spectra,
            max_rows: limits.max_rows,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for b in bins {
        if b.spaxels.is_empty() {
            return Err(PlanError::EmptyBin(b.id));
        }
        if !seen.insert(b.id) {
            return Err(PlanError::DuplicateBin(b.id));
        }
    }
    let mut order: Vec<&BinSpec> = bins.iter().collect();
    order.sort_by_key(|b| (b.rows().start, b.id));

    let mut chunks: Vec<Chunk> = Vec::new();
    let mut open: Option<Chunk> = None;
    for bin in order {
        let rows = bin.rows();
        if let Some(chunk) = open.as_mut() {
            let span = chunk.rows.start.min(rows.start)..chunk.rows.end.max(rows.end);
            if chunk.bins.len() < limits.max_spectra && span.len() <= limits.max_rows {
                chunk.rows = span;
                chunk.bins.push(bin.id);
                chunk.nspaxels += bin.spaxels.len();
                chunk.nspectra += 1;
                continue;
            }
            chunks.extend(open.take());
        }
        open = Some(Chunk {
            id: chunks.len(),
            rows,
            bins: vec![bin.id],
            nspaxels: bin.spaxels.len(),
            nspectra: 1,
        });
    }
    chunks.extend(open);
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One single-spaxel bin per spaxel of an nx x ny grid, numbered row-major.
    fn grid(nx: u32, ny: u32) -> Vec<BinSpec> {
        (0..ny)
            .flat_map(|y| (0..nx).map(move |x| (x, y)))
            .enumerate()
            .map(|(id, (x, y))| BinSpec {
                id,
                spaxels: vec![[x, y]],
                sn: 10.0,
            })
            .collect()
    }

    #[test]
    fn every_bin_lands_in_exactly_one_chunk_within_limits() {
        let bins = grid(10, 7);
        let limits = ChunkLimits {
            max_spectra: 16,
            max_rows: 2,
        };
        let chunks = plan_chunks(&bins, limits).unwrap();
        let mut all: Vec<usize> = chunks.iter().flat_map(|c| c.bins.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..70).collect::<Vec<_>>());
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.id, i);
            assert!(c.nspectra <= 16 && c.rows.len() <= 2, "{c:?}");
            assert_eq!(c.nspectra, c.bins.len());
        }
        // 70 spectra in chunks of at most 16: 5 chunks, the first full.
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[0].bins, (0..16).collect::<Vec<_>>());
        assert_eq!(chunks[0].rows, 0..2);
    }

    #[test]
    fn a_row_band_limit_splits_chunks_before_the_spectra_limit() {
        let chunks = plan_chunks(
            &grid(3, 6),
            ChunkLimits {
                max_spectra: 100,
                max_rows: 2,
            },
        )
        .unwrap();
        let rows: Vec<_> = chunks.iter().map(|c| c.rows.clone()).collect();
        assert_eq!(rows, vec![0..2, 2..4, 4..6]);
    }

    #[test]
    fn a_bin_wider_than_the_row_limit_gets_its_own_chunk() {
        let tall = BinSpec {
            id: 7,
            spaxels: (0..5).map(|y| [0, y]).collect(),
            sn: 50.0,
        };
        let small = BinSpec {
            id: 3,
            spaxels: vec![[1, 0]],
            sn: 50.0,
        };
        let chunks = plan_chunks(&[tall, small], ChunkLimits::default().with_rows(2)).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].bins, vec![3]);
        assert_eq!(chunks[1].bins, vec![7]);
        assert_eq!(chunks[1].rows, 0..5);
        assert_eq!(chunks[1].nspaxels, 5);
    }

    #[test]
    fn planning_is_deterministic_and_serialisable() {
        let mut bins = grid(5, 5);
        let a = plan_chunks(&bins, ChunkLimits::default()).unwrap();
        bins.reverse();
        let b = plan_chunks(&bins, ChunkLimits::default()).unwrap();
        assert_eq!(a, b);
        let json = serde_json::to_string(&a).unwrap();
        let back: Vec<Chunk> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(plan_chunks(&[], ChunkLimits::default()), Ok(vec![]));
        let zero = ChunkLimits {
            max_spectra: 0,
            max_rows: 1,
        };
        assert!(matches!(
            plan_chunks(&grid(1, 1), zero),
            Err(PlanError::BadLimits { .. })
        ));
        let empty = BinSpec {
            id: 1,
            spaxels: vec![],
            sn: 0.0,
        };
        assert_eq!(
            plan_chunks(&[empty], ChunkLimits::default()),
            Err(PlanError::EmptyBin(1))
        );
        let mut dup = grid(2, 1);
        dup[1].id = 0;
        assert_eq!(
            plan_chunks(&dup, ChunkLimits::default()),
            Err(PlanError::DuplicateBin(0))
        );
    }

    impl ChunkLimits {
        fn with_rows(self, max_rows: usize) -> Self {
            ChunkLimits { max_rows, ..self }
        }
    }
}
