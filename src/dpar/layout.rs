//! From per-image patch lengths to the indices every stage of the forward pass needs
//! (design §5, indexed exactly as written there).
//!
//! For an image of `n` predicted positions (n = L in training) with patch lengths covering all
//! n codes (N patches, patch 0 = {z_0}):
//!
//! - encoder inputs are z_0 … z_{n−2}; the patch vectors needed are those of patches
//!   0 … N−2, which all end before z_{n−1} (the last patch's vector would only feed g_N, which
//!   no code uses, so it is never computed);
//! - the patch transformer sees `[class, patch_0, …, patch_{N−2}]`: N positions, outputs
//!   g_0 … g_{N−1}; g_j has seen the class and patches 0 … j−1;
//! - decoder position p (target z_p) reads g[pid(p)], pid(p) = the patch holding z_p, so a code
//!   sees the global state after the previous patch, never its own patch's.
//!
//! # Shapes
//! B images; flat encoder rows B·(n−1); packed patch-transformer rows S = Σ_b N_b.

use crate::nn::rope::{patch_angles, PatchRope, RopeRows};
use crate::patching::{patch_ids, patch_starts};

use super::{DparError, Result};

/// Everything the forward pass derives from a batch's patch lengths.
#[derive(Debug, Clone)]
pub struct PatchLayout {
    /// Positions per image (codes predicted).
    pub n: usize,
    /// Per image: patch lengths summing to n.
    pub lengths: Vec<Vec<usize>>,
    /// Per image: N_b, the patch transformer's positions (class + N_b − 1 patch vectors).
    pub patch_counts: Vec<usize>,
    /// Patch segments `(row, len)` over the flat encoder rows (image b's code k is row
    /// b·(n−1) + k), for patches 0 … N_b−2 of every image, image by image.
    pub enc_segments: Vec<(usize, usize)>,
    /// Packed layout: per image, `(start, N_b)` in the flat patch-transformer sequence.
    pub packed_segments: Vec<(usize, usize)>,
    /// Packed RoPE rows (S rows): the class row (zero) then each patch's angles.
    pub packed_rope: RopeRows,
    /// For every (image, position p): the packed row of g[pid(p)]. B·n entries.
    pub packed_gather: Vec<u32>,
    /// The longest image's N_b (padded layout).
    pub max_patches: usize,
    /// Padded RoPE rows (B·max_patches rows; padding rows zero).
    pub padded_rope: RopeRows,
    /// For every (image, position p): the padded row b·max_patches + pid(p).
    pub padded_gather: Vec<u32>,
}

impl PatchLayout {
    /// Builds the layout of a batch. Every image's lengths must be positive and sum to `n`.
    pub fn new(
        lengths: Vec<Vec<usize>>,
        n: usize,
        grid: usize,
        head_dim: usize,
        base: f64,
        mode: PatchRope,
    ) -> Result<Self> {
        if n == 0 || lengths.is_empty() {
            return Err(DparError::BadInput("a batch needs at least one image of at least one code".into()));
        }
        for (b, l) in lengths.iter().enumerate() {
            let total: usize = l.iter().sum();
            if total != n || l.contains(&0) {
                return Err(DparError::BadInput(format!(
                    "image {b}: patch lengths {:?}… sum to {total} (with {} empty) but the image has {n} codes",
                    &l[..l.len().min(8)],
                    l.iter().filter(|&&x| x == 0).count()
                )));
            }
            if l[0] != 1 {
                return Err(DparError::BadInput(format!(
                    "image {b}: z_0 must be a patch of its own, got first length {}",
                    l[0]
                )));
            }
        }
        let half = head_dim / 2;
        let zero_row = vec![None];
        let patch_counts: Vec<usize> = lengths.iter().map(|l| l.len()).collect();
        let max_patches = patch_counts.iter().copied().max().unwrap_or(1);
        let mut enc_segments = Vec::new();
        let mut packed_segments = Vec::new();
        let mut packed_rows: Vec<Option<Vec<f32>>> = Vec::new();
        let mut padded_rows: Vec<Option<Vec<f32>>> = Vec::new();
        let mut packed_gather = Vec::with_capacity(lengths.len() * n);
        let mut padded_gather = Vec::with_capacity(lengths.len() * n);
        for (b, l) in lengths.iter().enumerate() {
            let starts = patch_starts(l);
            let count = l.len();
            packed_segments.push((packed_rows.len(), count));
            let offset = packed_rows.len();
            let mut rows: Vec<Option<Vec<f32>>> = zero_row.clone();
            for j in 0..count - 1 {
                enc_segments.push((b * (n - 1) + starts[j], l[j]));
                rows.push(Some(patch_angles(starts[j], starts[j] + l[j] - 1, grid, head_dim, base, mode)));
            }
            packed_rows.extend(rows.iter().cloned());
            padded_rows.extend(rows);
            padded_rows.extend(std::iter::repeat_n(None, max_patches - count));
            for pid in patch_ids(l) {
                packed_gather.push((offset + pid) as u32);
                padded_gather.push((b * max_patches + pid) as u32);
            }
        }
        Ok(Self {
            n,
            lengths,
            patch_counts,
            enc_segments,
            packed_segments,
            packed_rope: RopeRows::from_angles(&packed_rows, half),
            packed_gather,
            max_patches,
            padded_rope: RopeRows::from_angles(&padded_rows, half),
            padded_gather,
        })
    }

    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// Total patch-transformer positions of the packed batch.
    pub fn packed_len(&self) -> usize {
        self.patch_counts.iter().sum()
    }

    /// Mean patch-transformer positions per image (class slot included).
    pub fn mean_patches(&self) -> f64 {
        self.packed_len() as f64 / self.batch() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2×2 grid (n = 4): image 0 = [1, 3] (z_0; z_1..z_3), image 1 = [1, 1, 2].
    #[test]
    fn indices_follow_the_design() {
        let l = PatchLayout::new(vec![vec![1, 3], vec![1, 1, 2]], 4, 2, 16, 10000.0, PatchRope::Dynamic4d).unwrap();
        assert_eq!(l.patch_counts, vec![2, 3]);
        // Encoder rows: image 0 rows 0..3, image 1 rows 3..6. Patches 0..N−2 only.
        assert_eq!(l.enc_segments, vec![(0, 1), (3, 1), (4, 1)]);
        assert_eq!(l.packed_segments, vec![(0, 2), (2, 3)]);
        // pid: image 0 → [0, 1, 1, 1]; image 1 → [0, 1, 2, 2].
        assert_eq!(l.packed_gather, vec![0, 1, 1, 1, 2, 3, 4, 4]);
        assert_eq!(l.padded_gather, vec![0, 1, 1, 1, 3, 4, 5, 5]);
        // Class rows and padding rows are zero rotations (cos = sin = 0).
        assert!(l.packed_rope.cos[..8].iter().all(|&c| c == 0.0));
        assert_eq!(l.padded_rope.rows, 6);
        assert!(l.padded_rope.cos[2 * 8..3 * 8].iter().all(|&c| c == 0.0));
        // Patch 0 = {z_0} at (row 0, col 0): identity rotation.
        assert!(l.packed_rope.cos[8..16].iter().all(|&c| (c - 1.0).abs() < 1e-6));
    }

    #[test]
    fn lengths_that_do_not_sum_to_the_codes_are_errors() {
        let err = PatchLayout::new(vec![vec![1, 2]], 4, 2, 16, 10000.0, PatchRope::Dynamic4d).unwrap_err().to_string();
        assert!(err.contains("sum to 3") && err.contains("4 codes"), "{err}");
        assert!(PatchLayout::new(vec![vec![2, 2]], 4, 2, 16, 10000.0, PatchRope::Dynamic4d).is_err());
        assert!(PatchLayout::new(vec![vec![1, 0, 3]], 4, 2, 16, 10000.0, PatchRope::Dynamic4d).is_err());
    }
}
