//! Rotation tables of RoPE (cos and sin per position), the form the fused kernels consume. The
//! angles themselves (2D RoPE, Dynamic RoPE) are built in [`crate::nn::rope`]; the table lives
//! here so that the kernels do not depend on the layer above them.

use std::sync::Arc;

/// Per-position rotation angles, stored as cos and sin (`rows × half`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeRows {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub rows: usize,
    /// d/2: rotation pairs per head.
    pub half: usize,
}

impl RopeRows {
    /// Builds rows from angles (`rows × half`); `None` marks a class slot (cos = sin = 0).
    pub fn from_angles(angles: &[Option<Vec<f32>>], half: usize) -> Self {
        let mut cos = Vec::with_capacity(angles.len() * half);
        let mut sin = Vec::with_capacity(angles.len() * half);
        for row in angles {
            match row {
                Some(a) => {
                    debug_assert_eq!(a.len(), half);
                    cos.extend(a.iter().map(|t| t.cos()));
                    sin.extend(a.iter().map(|t| t.sin()));
                }
                None => {
                    cos.extend(std::iter::repeat_n(0.0, half));
                    sin.extend(std::iter::repeat_n(0.0, half));
                }
            }
        }
        Self { cos: Arc::new(cos), sin: Arc::new(sin), rows: angles.len(), half }
    }

    /// The rows `idx` of this table, in that order.
    pub fn select(&self, idx: &[usize]) -> Self {
        let mut cos = Vec::with_capacity(idx.len() * self.half);
        let mut sin = Vec::with_capacity(idx.len() * self.half);
        for &i in idx {
            cos.extend_from_slice(&self.cos[i * self.half..(i + 1) * self.half]);
            sin.extend_from_slice(&self.sin[i * self.half..(i + 1) * self.half]);
        }
        Self { cos: Arc::new(cos), sin: Arc::new(sin), rows: idx.len(), half: self.half }
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        self.select(&(start..start + len).collect::<Vec<_>>())
    }

    /// Concatenates several tables (e.g. the rows of every image of a packed batch).
    pub fn concat(parts: &[RopeRows]) -> Self {
        let half = parts.first().map(|p| p.half).unwrap_or(0);
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in parts {
            cos.extend_from_slice(&p.cos);
            sin.extend_from_slice(&p.sin);
        }
        Self { rows: cos.len() / half.max(1), cos: Arc::new(cos), sin: Arc::new(sin), half }
    }

    /// The angle of row `r`, pair `i` (for tests): atan2(sin, cos).
    pub fn angle(&self, r: usize, i: usize) -> f32 {
        self.sin[r * self.half + i].atan2(self.cos[r * self.half + i])
    }
}
