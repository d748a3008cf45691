//! Adaptive spatial binning to a target S/N: the Voronoi binning of Cappellari & Copin (2003,
//! MNRAS 342, 345, section 5.1: bin accretion, reassignment of failed bins, then a centroidal
//! Voronoi tessellation), with the weighted-Voronoi-tessellation modification of Diehl &
//! Statler (2006, MNRAS 368, 497), which is also vorbin's default.
//!
//! S/N of a set of spaxels: `sum(signal) / sqrt(sum(noise^2))` (CC03 eq. 2).
//!
//! Two inputs have no binning in the paper, and get these documented outcomes instead of an
//! error:
//! - every spaxel already at or above the target: each spaxel is its own bin
//!   ([`BinningOutcome::AllAboveTarget`]);
//! - the target cannot be reached (all spaxels together are below it, or accretion leaves no
//!   bin within 80% of the target): every spaxel goes into one bin, the best S/N the data allow
//!   ([`BinningOutcome::TargetUnreachable`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VoronoiError {
    #[error("nothing to bin: no spaxels")]
    Empty,
    #[error("x, y, signal and noise must have the same length (got {x}, {y}, {signal}, {noise})")]
    LengthMismatch {
        x: usize,
        y: usize,
        signal: usize,
        noise: usize,
    },
    #[error("spaxel {index}: coordinates, signal and noise must be finite and noise > 0")]
    BadValue { index: usize },
    #[error("target S/N must be finite and > 0, got {0}")]
    BadTarget(f64),
    #[error("pixel size must be given for {0} spaxels (it is only guessed below 10,000)")]
    PixelSizeRequired(usize),
}

/// What the binning did, for the summary and the user.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum BinningOutcome {
    /// Accretion and `cvt_iterations` WVT iterations, as in the paper.
    Binned { cvt_iterations: usize },
    /// Every spaxel already reaches the target: one bin per spaxel.
    AllAboveTarget,
    /// The target is out of reach: one bin holding every spaxel, at S/N `achieved_sn`.
    TargetUnreachable { achieved_sn: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binning {
    /// Bin number (0-based) of every input spaxel.
    pub bin_of: Vec<usize>,
    /// Geometric centroid, S/N and number of spaxels of every bin.
    pub x_bar: Vec<f64>,
    pub y_bar: Vec<f64>,
    pub sn: Vec<f64>,
    pub npix: Vec<usize>,
    pub outcome: BinningOutcome,
}

impl Binning {
    pub fn nbins(&self) -> usize {
        self.sn.len()
    }
}

/// Maximum distance (in pixels) from a bin to the spaxel it accretes, and maximum roundness:
/// the values of CC03 section 5.1.
const MAX_ACCRETION_DISTANCE: f64 = 1.2;
const MAX_ROUNDNESS: f64 = 0.3;
/// A bin whose accretion stopped below this fraction of the target is dissolved.
const GOOD_BIN_FRACTION: f64 = 0.8;

struct Points<'a> {
    x: &'a [f64],
    y: &'a [f64],
    signal: &'a [f64],
    noise: &'a [f64],
}

impl Points<'_> {
    fn len(&self) -> usize {
        self.x.len()
    }
    fn d2(&self, i: usize, x: f64, y: f64) -> f64 {
        (self.x[i] - x).powi(2) + (self.y[i] - y).powi(2)
    }
    fn sn_of(&self, members: &[usize]) -> f64 {
        let s: f64 = members.iter().map(|&i| self.signal[i]).sum();
        let n2: f64 = members.iter().map(|&i| self.noise[i].powi(2)).sum();
        s / n2.sqrt()
    }
    fn centroid(&self, members: &[usize]) -> (f64, f64) {
        let n = members.len() as f64;
        let sx: f64 = members.iter().map(|&i| self.x[i]).sum();
        let sy: f64 = members.iter().map(|&i| self.y[i]).sum();
        (sx / n, sy / n)
    }
}

/// Uniform grid over the points, for nearest-unbinned-point queries in O(1) on average.
struct Grid {
    x0: f64,
    y0: f64,
    cell: f64,
    nx: usize,
    ny: usize,
    cells: Vec<Vec<usize>>,
}

impl Grid {
    fn new(p: &Points, cell: f64) -> Self {
        let fold = |v: &[f64], f: fn(f64, f64) -> f64, init| v.iter().copied().fold(init, f);
        let (x0, x1) = (
            fold(p.x, f64::min, f64::INFINITY),
            fold(p.x, f64::max, f64::NEG_INFINITY),
        );
        let (y0, y1) = (
            fold(p.y, f64::min, f64::INFINITY),
            fold(p.y, f64::max, f64::NEG_INFINITY),
        );
        let nx = ((x1 - x0) / cell) as usize + 1;
        let ny = ((y1 - y0) / cell) as usize + 1;
        let mut cells = vec![Vec::new(); nx * ny];
        let mut grid = Grid {
            x0,
            y0,
            cell,
            nx,
            ny,
            cells: Vec::new(),
        };
        for i in 0..p.len() {
            let (cx, cy) = grid.cell_of(p.x[i], p.y[i]);
            cells[cy * nx + cx].push(i);
        }
        grid.cells = cells;
        grid
    }

    fn cell_of(&self, x: f64, y: f64) -> (usize, usize) {
        let cx = ((x - self.x0) / self.cell)
            .floor()
            .clamp(0.0, (self.nx - 1) as f64);
        let cy = ((y - self.y0) / self.cell)
            .floor()
            .clamp(0.0, (self.ny - 1) as f64);
        (cx as usize, cy as usize)
    }

    /// Nearest point to (x, y) with `free[i]`; ties go to the lowest index.
    fn nearest(&self, p: &Points, x: f64, y: f64, free: &[bool]) -> Option<usize> {
        let (cx, cy) = self.cell_of(x, y);
        let mut best: Option<(f64, usize)> = None;
        let max_ring = self.nx.max(self.ny);
        for ring in 0..=max_ring {
            // Every point in ring r+1 or beyond is at least r cells away from the query.
            if let Some((d2, _)) = best {
                let reach = (ring as f64 - 1.0).max(0.0) * self.cell;
                if d2 < reach * reach {
                    break;
                }
            }
            let (r, cx, cy) = (ring as isize, cx as isize, cy as isize);
            for gy in cy - r..=cy + r {
                for gx in cx - r..=cx + r {
                    let on_ring = (gy - cy).abs() == r || (gx - cx).abs() == r;
                    if !on_ring
                        || gx < 0
                        || gy < 0
                        || gx >= self.nx as isize
                        || gy >= self.ny as isize
                    {
                        continue;
                    }
                    for &i in &self.cells[gy as usize * self.nx + gx as usize] {
                        if !free[i] {
                            continue;
                        }
                        let d2 = p.d2(i, x, y);
                        if best.is_none_or(|(b, j)| d2 < b || (d2 == b && i < j)) {
                            best = Some((d2, i));
                        }
                    }
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

/// CC03 eq. (5): how far the farthest member is from the centroid, relative to the radius of a
/// disc of the same area, minus one.
fn roundness(p: &Points, members: &[usize], pixel_size: f64) -> f64 {
    let (xb, yb) = p.centroid(members);
    let equivalent_radius = (members.len() as f64 / std::f64::consts::PI).sqrt() * pixel_size;
    let max_d2 = members.iter().map(|&i| p.d2(i, xb, yb)).fold(0.0, f64::max);
    max_d2.sqrt() / equivalent_radius - 1.0
}

/// Running totals of the accretion: what is still free and where the binned spaxels are.
struct Tally {
    free: Vec<bool>,
    free_signal: f64,
    free_noise2: f64,
    binned_x: f64,
    binned_y: f64,
    nbinned: usize,
}

impl Tally {
    fn new(p: &Points) -> Self {
        Tally {
            free: vec![true; p.len()],
            free_signal: p.signal.iter().sum(),
            free_noise2: p.noise.iter().map(|v| v * v).sum(),
            binned_x: 0.0,
            binned_y: 0.0,
            nbinned: 0,
        }
    }
    fn take(&mut self, p: &Points, i: usize) {
        self.free[i] = false;
        self.free_signal -= p.signal[i];
        self.free_noise2 -= p.noise[i] * p.noise[i];
        self.binned_x += p.x[i];
        self.binned_y += p.y[i];
        self.nbinned += 1;
    }
}

/// Steps (i)-(v) of CC03 section 5.1. Returns the accreted bin (1-based) of every spaxel, 0 for
/// spaxels left out or in bins that failed to reach 80% of the target.
#[allow(clippy::needless_range_loop)] // bin numbers are the loop's subject, not indices
fn accrete(p: &Points, target: f64, pixel_size: f64, grid: &Grid) -> Vec<usize> {
    let n = p.len();
    let mut class = vec![0usize; n];
    let mut good_bins = vec![false; n + 1];
    let mut tally = Tally::new(p);
    let sn_single = |i: usize| p.signal[i] / p.noise[i];
    let mut current = (0..n).fold(0, |best, i| {
        if sn_single(i) > sn_single(best) {
            i
        } else {
            best
        }
    });
    for bin in 1..=n {
        let mut members = vec![current];
        class[current] = bin;
        tally.take(p, current);
        let mut sn = sn_single(current);
        let (mut xb, mut yb) = (p.x[current], p.y[current]);
        while tally.nbinned < n {
            let Some(k) = grid.nearest(p, xb, yb, &tally.free) else {
                break;
            };
            let min_d2 = members
                .iter()
                .map(|&i| p.d2(i, p.x[k], p.y[k]))
                .fold(f64::INFINITY, f64::min);
            members.push(k);
            let r = roundness(p, &members, pixel_size);
            let sn_old = sn;
            sn = p.sn_of(&members);
            if min_d2.sqrt() > MAX_ACCRETION_DISTANCE * pixel_size
                || r > MAX_ROUNDNESS
                || (sn - target).abs() > (sn_old - target).abs()
                || sn_old > sn
            {
                members.pop();
                if sn_old > GOOD_BIN_FRACTION * target {
                    good_bins[bin] = true;
                }
                break;
            }
            class[k] = bin;
            tally.take(p, k);
            (xb, yb) = p.centroid(&members);
        }
        // As in CC03's reference code, a bin that swallows the last free spaxel is not
        // accepted: its spaxels are reassigned to their neighbours below.
        if tally.nbinned == n || tally.free_signal / tally.free_noise2.sqrt() < target {
            break; // the spaxels left cannot make another bin
        }
        let centroid = (
            tally.binned_x / tally.nbinned as f64,
            tally.binned_y / tally.nbinned as f64,
        );
        let Some(next) = grid.nearest(p, centroid.0, centroid.1, &tally.free) else {
            break;
        };
        current = next;
    }
    for c in &mut class {
        if !good_bins[*c] {
            *c = 0;
        }
    }
    class
}

/// Assigns each spaxel to the node minimising distance / scale (all scales 1: plain Voronoi).
fn tessellate(p: &Points, xnode: &[f64], ynode: &[f64], scale: &[f64]) -> Vec<usize> {
    use rayon::prelude::*;
    (0..p.len())
        .into_par_iter()
        .map(|i| {
            let mut best = (f64::INFINITY, 0);
            for k in 0..xnode.len() {
                let d = p.d2(i, xnode[k], ynode[k]) / (scale[k] * scale[k]);
                if d < best.0 {
                    best = (d, k);
                }
            }
            best.1
        })
        .collect()
}

/// Members of each class `0..nclass`.
fn members_of(class: &[usize], nclass: usize) -> Vec<Vec<usize>> {
    let mut m = vec![Vec::new(); nclass];
    for (i, &c) in class.iter().enumerate() {
        m[c].push(i);
    }
    m
}

/// Renumbers classes to 0..n in increasing order of their old number, dropping empty ones.
fn compact(class: &mut [usize]) -> usize {
    let max = class.iter().copied().max().unwrap_or(0);
    let mut map = vec![usize::MAX; max + 1];
    let mut used: Vec<usize> = class.to_vec();
    used.sort_unstable();
    used.dedup();
    for (new, old) in used.iter().enumerate() {
        map[*old] = new;
    }
    for c in class.iter_mut() {
        *c = map[*c];
    }
    used.len()
}

/// Smallest distance between two spaxels: the pixel size when the caller does not give it.
fn guess_pixel_size(p: &Points) -> Result<f64, VoronoiError> {
    if p.len() > 10_000 {
        return Err(VoronoiError::PixelSizeRequired(p.len()));
    }
    let mut best = f64::INFINITY;
    for i in 0..p.len() {
        for j in i + 1..p.len() {
            let d2 = p.d2(j, p.x[i], p.y[i]);
            if d2 > 0.0 && d2 < best {
                best = d2;
            }
        }
    }
    Ok(if best.is_finite() { best.sqrt() } else { 1.0 })
}

/// Voronoi binning of spaxels at `(x, y)` with `signal` and `noise` to `target_sn`.
pub fn bin2d(
    x: &[f64],
    y: &[f64],
    signal: &[f64],
    noise: &[f64],
    target_sn: f64,
    pixel_size: Option<f64>,
) -> Result<Binning, VoronoiError> {
    let n = x.len();
    if y.len() != n || signal.len() != n || noise.len() != n {
        return Err(VoronoiError::LengthMismatch {
            x: n,
            y: y.len(),
            signal: signal.len(),
            noise: noise.len(),
        });
    }
    if n == 0 {
        return Err(VoronoiError::Empty);
    }
    if !(target_sn.is_finite() && target_sn > 0.0) {
        return Err(VoronoiError::BadTarget(target_sn));
    }
    if let Some(index) = (0..n).find(|&i| {
        !(x[i].is_finite()
            && y[i].is_finite()
            && signal[i].is_finite()
            && noise[i].is_finite()
            && noise[i] > 0.0)
    }) {
        return Err(VoronoiError::BadValue { index });
    }
    let p = Points {
        x,
        y,
        signal,
        noise,
    };
    let all: Vec<usize> = (0..n).collect();
    let summarise = |class: Vec<usize>, nbins: usize, outcome| {
        let members = members_of(&class, nbins);
        let (x_bar, y_bar): (Vec<f64>, Vec<f64>) = members.iter().map(|m| p.centroid(m)).unzip();
        Binning {
            sn: members.iter().map(|m| p.sn_of(m)).collect(),
            npix: members.iter().map(Vec::len).collect(),
            bin_of: class,
            x_bar,
            y_bar,
            outcome,
        }
    };
    if (0..n).all(|i| signal[i] / noise[i] >= target_sn) {
        return Ok(summarise(all, n, BinningOutcome::AllAboveTarget));
    }
    let total_sn = p.sn_of(&all);
    let unreachable = || {
        summarise(
            vec![0; n],
            1,
            BinningOutcome::TargetUnreachable {
                achieved_sn: total_sn,
            },
        )
    };
    if total_sn < target_sn {
        return Ok(unreachable());
    }
    let pixel_size = match pixel_size {
        Some(s) if s.is_finite() && s > 0.0 => s,
        _ => guess_pixel_size(&p)?,
    };
    let grid = Grid::new(&p, pixel_size);
    let mut class = accrete(&p, target_sn, pixel_size, &grid);
    if class.iter().all(|&c| c == 0) {
        return Ok(unreachable());
    }

    // Steps (vi)-(vii): spaxels of failed bins join the nearest good bin's centroid.
    let nclass = class.iter().max().copied().unwrap_or(0) + 1;
    let members = members_of(&class, nclass);
    let good: Vec<usize> = (1..nclass).filter(|&c| !members[c].is_empty()).collect();
    let (gx, gy): (Vec<f64>, Vec<f64>) = good.iter().map(|&c| p.centroid(&members[c])).unzip();
    let bad: Vec<usize> = (0..n).filter(|&i| class[i] == 0).collect();
    if !bad.is_empty() {
        let bad_points = Points {
            x: &bad.iter().map(|&i| x[i]).collect::<Vec<_>>(),
            y: &bad.iter().map(|&i| y[i]).collect::<Vec<_>>(),
            signal: &bad.iter().map(|&i| signal[i]).collect::<Vec<_>>(),
            noise: &bad.iter().map(|&i| noise[i]).collect::<Vec<_>>(),
        };
        let ones = vec![1.0; gx.len()];
        for (j, k) in tessellate(&bad_points, &gx, &gy, &ones)
            .into_iter()
            .enumerate()
        {
            class[bad[j]] = good[k];
        }
    }
    let nbins = compact(&mut class);
    let members = members_of(&class, nbins);
    let (mut xnode, mut ynode): (Vec<f64>, Vec<f64>) =
        members.iter().map(|m| p.centroid(m)).unzip();

    // WVT iterations (modified Lloyd algorithm with Diehl & Statler scale lengths).
    let mut scale = vec![1.0; nbins];
    let mut diffs: Vec<f64> = Vec::new();
    let mut iterations = 0;
    for _ in 0..nbins {
        iterations += 1;
        let (xold, yold) = (xnode.clone(), ynode.clone());
        let class_now = tessellate(&p, &xnode, &ynode, &scale);
        for (k, m) in members_of(&class_now, nbins).iter().enumerate() {
            if m.is_empty() {
                continue;
            }
            (xnode[k], ynode[k]) = p.centroid(m);
            scale[k] = (m.len() as f64 / p.sn_of(m)).sqrt();
        }
        let diff2: f64 = (0..nbins)
            .map(|k| (xnode[k] - xold[k]).powi(2) + (ynode[k] - yold[k]).powi(2))
            .sum();
        let diff = diff2.sqrt() / pixel_size;
        if diff < 0.1 || diffs.contains(&diff) {
            break;
        }
        diffs.push(diff);
    }
    let mut class = tessellate(&p, &xnode, &ynode, &scale);
    let nbins = compact(&mut class);
    Ok(summarise(
        class,
        nbins,
        BinningOutcome::Binned {
            cvt_iterations: iterations,
        },
    ))
}

/// Fraction of spaxels whose bin in `a` and in `b` correspond, after matching each bin of `a` to
/// the bin of `b` it shares most spaxels with (bin numbers need not agree).
pub fn membership_agreement(a: &[usize], b: &[usize]) -> f64 {
    use std::collections::HashMap;
    let mut overlap: HashMap<(usize, usize), usize> = HashMap::new();
    for (&ka, &kb) in a.iter().zip(b) {
        *overlap.entry((ka, kb)).or_default() += 1;
    }
    let mut best: HashMap<usize, (usize, usize)> = HashMap::new();
    for (&(ka, kb), &count) in &overlap {
        let entry = best.entry(ka).or_insert((kb, 0));
        if count > entry.1 || (count == entry.1 && kb < entry.0) {
            *entry = (kb, count);
        }
    }
    let same = a
        .iter()
        .zip(b)
        .filter(|(ka, kb)| best[ka].0 == **kb)
        .count();
    same as f64 / a.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    type Columns = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<usize>);

    fn reference() -> Columns {
        let dir = crate::synthetic::shared_data_dir().join("binning");
        let input =
            std::fs::read_to_string(dir.join("voronoi_2d_binning_example_input.txt")).unwrap();
        let output =
            std::fs::read_to_string(dir.join("voronoi_2d_binning_example_output.txt")).unwrap();
        let rows = |text: &str| -> Vec<Vec<f64>> {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
                .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
                .collect()
        };
        let inp = rows(&input);
        let out = rows(&output);
        assert_eq!(inp.len(), out.len());
        (
            inp.iter().map(|r| r[0]).collect(),
            inp.iter().map(|r| r[1]).collect(),
            inp.iter().map(|r| r[2]).collect(),
            inp.iter().map(|r| r[3]).collect(),
            out.iter().map(|r| r[2] as usize).collect(),
        )
    }

    #[test]
    fn sauron_example_matches_vorbin_at_target_50() {
        let (x, y, s, n, expected) = reference();
        let b = bin2d(&x, &y, &s, &n, 50.0, None).unwrap();
        let nref = expected.iter().max().unwrap() + 1;
        let agreement = membership_agreement(&b.bin_of, &expected);
        println!(
            "bins: ours {} vorbin {nref}; agreement {agreement:.4}; {:?}",
            b.nbins(),
            b.outcome
        );
        assert!(matches!(b.outcome, BinningOutcome::Binned { .. }));
        assert_eq!(b.nbins(), nref);
        // Same algorithm, same tie-breaking: the very same bins, numbered alike.
        assert_eq!(agreement, 1.0);
        assert_eq!(b.bin_of, expected);
        // Binned bins sit near the target: CC03 report a scatter of a few per cent.
        let multi: Vec<f64> = (0..b.nbins())
            .filter(|&k| b.npix[k] > 1)
            .map(|k| b.sn[k])
            .collect();
        let mean = multi.iter().sum::<f64>() / multi.len() as f64;
        assert!((mean - 50.0).abs() < 5.0, "mean S/N of bins {mean}");
    }

    #[test]
    fn unreachable_target_falls_back_to_one_bin() {
        let x = [0.0, 1.0, 0.0, 1.0];
        let y = [0.0, 0.0, 1.0, 1.0];
        let s = [1.0; 4];
        let n = [1.0; 4];
        let b = bin2d(&x, &y, &s, &n, 100.0, None).unwrap();
        assert_eq!(b.bin_of, vec![0; 4]);
        match b.outcome {
            BinningOutcome::TargetUnreachable { achieved_sn } => {
                assert!((achieved_sn - 2.0).abs() < 1e-12)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spaxels_above_target_stay_single() {
        let b = bin2d(
            &[0.0, 1.0],
            &[0.0, 0.0],
            &[10.0, 20.0],
            &[1.0, 1.0],
            5.0,
            None,
        )
        .unwrap();
        assert_eq!(b.bin_of, vec![0, 1]);
        assert_eq!(b.outcome, BinningOutcome::AllAboveTarget);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert_eq!(
            bin2d(&[], &[], &[], &[], 5.0, None),
            Err(VoronoiError::Empty)
        );
        assert_eq!(
            bin2d(&[0.0], &[0.0], &[1.0], &[0.0], 5.0, None),
            Err(VoronoiError::BadValue { index: 0 })
        );
        assert_eq!(
            bin2d(&[0.0], &[0.0], &[1.0], &[1.0], f64::NAN, None)
                .unwrap_err()
                .to_string(),
            "target S/N must be finite and > 0, got NaN"
        );
        assert!(matches!(
            bin2d(&[0.0], &[0.0, 1.0], &[1.0], &[1.0], 5.0, None),
            Err(VoronoiError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn agreement_ignores_bin_numbering() {
        assert_eq!(membership_agreement(&[0, 0, 1, 1], &[5, 5, 3, 3]), 1.0);
        assert_eq!(membership_agreement(&[0, 0, 0, 1], &[5, 5, 3, 3]), 0.75);
    }
}
