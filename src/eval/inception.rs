//! InceptionV3 pool3 features and logits, as pytorch-fid computes them for FID (design §8).
//!
//! The network is pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True,
//! use_fid_inception=True)`, the PyTorch port of the TensorFlow FID graph, plus its final fully
//! connected layer (2048 → 1008 logits) for an Inception Score:
//!
//! 1. bilinear resize to 299 × 299 (`F.interpolate`, `align_corners=False`, no antialias), then
//!    `2x − 1`;
//! 2. torchvision's `inception_v3` trunk (`Conv2d_1a_3x3` … `Mixed_7c`; every conv is a
//!    *BasicConv2d*: conv without bias, BatchNorm with eps 0.001, ReLU), with pytorch-fid's
//!    blocks: `Mixed_5b/c/d` FIDInceptionA and `Mixed_6b…e` FIDInceptionC (3 × 3 average pool,
//!    stride 1, pad 1, padding left out of the count), `Mixed_7b` FIDInceptionE_1 (same pool) and
//!    `Mixed_7c` FIDInceptionE_2 (3 × 3 *max* pool in the pool branch); torchvision's InceptionB
//!    (`Mixed_6a`) and InceptionD (`Mixed_7a`);
//! 3. global average pool → the 2048 pool3 features; `fc` → 1008 logits.
//!
//! Weights load by pytorch-fid's key names (those of `pt_inception-2015-12-05-6726825d.pth`).
//!
//! Differences from the reference: inference only, in f32. Each BatchNorm (running statistics) is
//! folded into its convolution at load time, in f64: `w' = w·γ/√(σ²+ε)`, `shift = β − μ·γ/√(σ²+ε)`.
//! `tests/inception_parity.rs` compares the features with pytorch-fid run in float64.
//!
//! # Shapes
//! images (B, 3, H, W) in [0, 1] → pool (B, 2048), logits (B, 1008). Legend: B batch, C channels,
//! H × W spatial size, O output channels.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{EvalError, Result};

/// Side of the square input the network sees after resizing.
pub const INPUT_SIZE: usize = 299;
/// Width of the pool3 features.
pub const POOL_FEATURES: usize = 2048;
/// Number of logits of the FID weights' classifier (1000 ImageNet classes and 8 unused).
pub const LOGITS: usize = 1008;
/// BatchNorm epsilon of torchvision's BasicConv2d.
const BN_EPS: f64 = 1e-3;

/// Where the weights come from: named tensors, or a recorder of the keys and shapes asked for
/// (which gives [`InceptionV3::weight_shapes`] from the same code that loads).
enum Source<'a> {
    Tensors { map: &'a HashMap<String, Tensor>, device: &'a Device },
    Record(Vec<(String, Vec<usize>)>),
}

impl Source<'_> {
    /// The tensor `key` in f64 after checking its shape; `None` when recording.
    fn get(&mut self, key: String, shape: &[usize]) -> Result<Option<Tensor>> {
        match self {
            Source::Record(list) => {
                list.push((key, shape.to_vec()));
                Ok(None)
            }
            Source::Tensors { map, .. } => {
                let tensor = map.get(&key).ok_or_else(|| EvalError::MissingWeight { key: key.clone() })?;
                if tensor.dims() != shape {
                    return Err(EvalError::WeightShape { key, want: shape.to_vec(), got: tensor.dims().to_vec() });
                }
                Ok(Some(tensor.to_dtype(DType::F64)?))
            }
        }
    }

    /// The BasicConv2d `name` (conv + BatchNorm + ReLU) with BatchNorm folded into the conv,
    /// unpadded (see [`BasicConv::padded`]).
    fn conv(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        kernel: (usize, usize),
        stride: usize,
    ) -> Result<BasicConv> {
        let (kh, kw) = kernel;
        let weight = self.get(format!("{name}.conv.weight"), &[cout, cin, kh, kw])?;
        let gamma = self.get(format!("{name}.bn.weight"), &[cout])?;
        let beta = self.get(format!("{name}.bn.bias"), &[cout])?;
        let mean = self.get(format!("{name}.bn.running_mean"), &[cout])?;
        let var = self.get(format!("{name}.bn.running_var"), &[cout])?;
        let (weight, shift) = match (self, weight, gamma, beta, mean, var) {
            (Source::Tensors { device, .. }, Some(w), Some(gamma), Some(beta), Some(mean), Some(var)) => {
                let scale = (gamma / (var + BN_EPS)?.sqrt()?)?; // (O)
                let weight = w.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
                let shift = (beta - (mean * &scale)?)?.reshape((1, cout, 1, 1))?;
                (to_f32(&weight, device)?, to_f32(&shift, device)?)
            }
            // Recording: the network is only walked for its keys, never run.
            _ => (placeholder()?, placeholder()?),
        };
        Ok(BasicConv { weight, shift, stride, pad: (0, 0) })
    }
}

/// An empty stand-in for a weight while recording the shapes.
fn placeholder() -> Result<Tensor> {
    Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?)
}

fn to_f32(tensor: &Tensor, device: &Device) -> Result<Tensor> {
    Ok(tensor.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
}

/// Convolution with BatchNorm folded in, then ReLU.
struct BasicConv {
    /// (O, C, kh, kw), already scaled by the BatchNorm.
    weight: Tensor,
    /// (1, O, 1, 1)
    shift: Tensor,
    stride: usize,
    /// Zero padding (rows, columns) on each side.
    pad: (usize, usize),
}

impl BasicConv {
    /// The same conv with zero padding `(rows, columns)` on each side.
    fn padded(self, pad: (usize, usize)) -> Self {
        Self { pad, ..self }
    }

    /// # Shapes
    /// x (B, C, H, W) → (B, O, H', W')
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.pad;
        let y = if rows == cols {
            x.conv2d(&self.weight, rows, self.stride, 1, 1)?
        } else {
            // candle pads both axes alike; the 1 × 7 and 7 × 1 convs pad one axis only.
            let padded = x.pad_with_zeros(2, rows, rows)?.pad_with_zeros(3, cols, cols)?;
            padded.conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        Ok(y.broadcast_add(&self.shift)?.relu()?)
    }
}

/// Runs `x` through `convs` in order.
fn chain(x: &Tensor, convs: &[BasicConv]) -> Result<Tensor> {
    let mut x = x.clone();
    for conv in convs {
        x = conv.forward(&x)?;
    }
    Ok(x)
}

/// 3 × 3 max pool, stride 2, no padding (sizes round down, as PyTorch's default).
fn max_pool_3x3_stride2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// 3 × 3 max pool, stride 1, padding 1. Replicating the edge equals padding with −∞ for a max:
/// the replicated value is itself inside the window.
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    Ok(x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?.max_pool2d_with_stride(3, 1)?)
}

/// 3 × 3 average pool, stride 1, padding 1, dividing by the number of in-bounds values
/// (`count_include_pad=False`): the zero-padded mean (sum / 9) times 9 / count.
///
/// # Shapes
/// x (B, C, H, W) → (B, C, H, W)
fn avg_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let padded_mean = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)?;
    // In-bounds neighbours along one axis of length `len` at position `i` (window i−1..=i+1).
    let in_bounds = |i: usize, len: usize| (i.min(1) + 1 + usize::from(i + 1 < len)) as f32;
    let mut rescale = Vec::with_capacity(height * width);
    for row in 0..height {
        for col in 0..width {
            rescale.push(9.0 / (in_bounds(row, height) * in_bounds(col, width)));
        }
    }
    let rescale = Tensor::from_vec(rescale, (1, 1, height, width), x.device())?;
    Ok(padded_mean.broadcast_mul(&rescale)?)
}

/// The (out_len × in_len) matrix of 1-D linear interpolation with `align_corners=False`, as
/// PyTorch's `upsample_bilinear2d` samples: output `o` reads the source coordinate
/// `max((o + ½)·in/out − ½, 0)` from its floor `i0` and `min(i0 + 1, in − 1)`.
fn linear_resize_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    let scale = in_len as f64 / out_len as f64;
    let mut matrix = vec![0f64; out_len * in_len];
    for o in 0..out_len {
        let source = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (source.floor() as usize).min(in_len - 1);
        let i1 = (i0 + 1).min(in_len - 1);
        let frac = source - i0 as f64;
        matrix[o * in_len + i0] += 1.0 - frac;
        matrix[o * in_len + i1] += frac;
    }
    matrix.into_iter().map(|w| w as f32).collect()
}

/// Bilinear resize (`align_corners=False`, no antialias) as one matrix product per axis.
///
/// # Shapes
/// images (B, C, H, W) → (B, C, out_h, out_w)
fn resize_bilinear(images: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (batch, channels, height, width) = images.dims4()?;
    let device = images.device();
    let rows = Tensor::from_vec(linear_resize_matrix(height, out_h), (out_h, height), device)?;
    let cols = Tensor::from_vec(linear_resize_matrix(width, out_w), (out_w, width), device)?;
    // (B·C·H, W) × (W, out_w): resize along the width.
    let x = images.contiguous()?.reshape((batch * channels * height, width))?.matmul(&cols.t()?)?;
    // (out_h, H) × (B·C, H, out_w): resize along the height.
    let x = rows.broadcast_matmul(&x.reshape((batch * channels, height, out_w))?)?;
    Ok(x.reshape((batch, channels, out_h, out_w))?)
}

/// FIDInceptionA (`Mixed_5b/c/d`): 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 | avg pool → 1×1.
struct BlockA {
    branch1x1: BasicConv,
    branch5x5: [BasicConv; 2],
    branch3x3dbl: [BasicConv; 3],
    branch_pool: BasicConv,
}

impl BlockA {
    fn new(src: &mut Source, name: &str, cin: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            branch1x1: src.conv(&format!("{name}.branch1x1"), cin, 64, (1, 1), 1)?,
            branch5x5: [
                src.conv(&format!("{name}.branch5x5_1"), cin, 48, (1, 1), 1)?,
                src.conv(&format!("{name}.branch5x5_2"), 48, 64, (5, 5), 1)?.padded((2, 2)),
            ],
            branch3x3dbl: [
                src.conv(&format!("{name}.branch3x3dbl_1"), cin, 64, (1, 1), 1)?,
                src.conv(&format!("{name}.branch3x3dbl_2"), 64, 96, (3, 3), 1)?.padded((1, 1)),
                src.conv(&format!("{name}.branch3x3dbl_3"), 96, 96, (3, 3), 1)?.padded((1, 1)),
            ],
            branch_pool: src.conv(&format!("{name}.branch_pool"), cin, pool_features, (1, 1), 1)?,
        })
    }

    /// # Shapes
    /// x (B, C, 35, 35) → (B, 224 + pool_features, 35, 35)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.branch1x1.forward(x)?,
            chain(x, &self.branch5x5)?,
            chain(x, &self.branch3x3dbl)?,
            self.branch_pool.forward(&avg_pool_3x3_same(x)?)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// InceptionB (`Mixed_6a`): 3×3 stride 2 | 1×1 → 3×3 → 3×3 stride 2 | max pool stride 2.
struct BlockB {
    branch3x3: BasicConv,
    branch3x3dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(src: &mut Source, name: &str, cin: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: src.conv(&format!("{name}.branch3x3"), cin, 384, (3, 3), 2)?,
            branch3x3dbl: [
                src.conv(&format!("{name}.branch3x3dbl_1"), cin, 64, (1, 1), 1)?,
                src.conv(&format!("{name}.branch3x3dbl_2"), 64, 96, (3, 3), 1)?.padded((1, 1)),
                src.conv(&format!("{name}.branch3x3dbl_3"), 96, 96, (3, 3), 2)?,
            ],
        })
    }

    /// # Shapes
    /// x (B, 288, 35, 35) → (B, 768, 17, 17)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [self.branch3x3.forward(x)?, chain(x, &self.branch3x3dbl)?, max_pool_3x3_stride2(x)?];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// FIDInceptionC (`Mixed_6b…e`): factorised 7×7 convolutions as 1×7 and 7×1 pairs.
struct BlockC {
    branch1x1: BasicConv,
    branch7x7: [BasicConv; 3],
    branch7x7dbl: [BasicConv; 5],
    branch_pool: BasicConv,
}

impl BlockC {
    fn new(src: &mut Source, name: &str, cin: usize, c7: usize) -> Result<Self> {
        let mut conv = |branch: &str, cin: usize, cout: usize, kernel: (usize, usize)| {
            // 1×7 pads (0, 3) and 7×1 pads (3, 0): the size is kept.
            src.conv(&format!("{name}.{branch}"), cin, cout, kernel, 1).map(|c| c.padded((kernel.0 / 2, kernel.1 / 2)))
        };
        Ok(Self {
            branch1x1: conv("branch1x1", cin, 192, (1, 1))?,
            branch7x7: [
                conv("branch7x7_1", cin, c7, (1, 1))?,
                conv("branch7x7_2", c7, c7, (1, 7))?,
                conv("branch7x7_3", c7, 192, (7, 1))?,
            ],
            branch7x7dbl: [
                conv("branch7x7dbl_1", cin, c7, (1, 1))?,
                conv("branch7x7dbl_2", c7, c7, (7, 1))?,
                conv("branch7x7dbl_3", c7, c7, (1, 7))?,
                conv("branch7x7dbl_4", c7, c7, (7, 1))?,
                conv("branch7x7dbl_5", c7, 192, (1, 7))?,
            ],
            branch_pool: conv("branch_pool", cin, 192, (1, 1))?,
        })
    }

    /// # Shapes
    /// x (B, 768, 17, 17) → (B, 768, 17, 17)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.branch1x1.forward(x)?,
            chain(x, &self.branch7x7)?,
            chain(x, &self.branch7x7dbl)?,
            self.branch_pool.forward(&avg_pool_3x3_same(x)?)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// InceptionD (`Mixed_7a`): 1×1 → 3×3 stride 2 | 1×1 → 1×7 → 7×1 → 3×3 stride 2 | max pool.
struct BlockD {
    branch3x3: [BasicConv; 2],
    branch7x7x3: [BasicConv; 4],
}

impl BlockD {
    fn new(src: &mut Source, name: &str, cin: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: [
                src.conv(&format!("{name}.branch3x3_1"), cin, 192, (1, 1), 1)?,
                src.conv(&format!("{name}.branch3x3_2"), 192, 320, (3, 3), 2)?,
            ],
            branch7x7x3: [
                src.conv(&format!("{name}.branch7x7x3_1"), cin, 192, (1, 1), 1)?,
                src.conv(&format!("{name}.branch7x7x3_2"), 192, 192, (1, 7), 1)?.padded((0, 3)),
                src.conv(&format!("{name}.branch7x7x3_3"), 192, 192, (7, 1), 1)?.padded((3, 0)),
                src.conv(&format!("{name}.branch7x7x3_4"), 192, 192, (3, 3), 2)?,
            ],
        })
    }

    /// # Shapes
    /// x (B, 768, 17, 17) → (B, 1280, 8, 8)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [chain(x, &self.branch3x3)?, chain(x, &self.branch7x7x3)?, max_pool_3x3_stride2(x)?];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// The pool branch of an InceptionE block: pytorch-fid's `Mixed_7b` averages, `Mixed_7c` takes
/// the max.
#[derive(Debug, Clone, Copy)]
enum PoolKind {
    Average,
    Max,
}

/// FIDInceptionE_1 / _2 (`Mixed_7b/c`): branches that split into a 1×3 and a 3×1 conv.
struct BlockE {
    branch1x1: BasicConv,
    branch3x3_1: BasicConv,
    /// `branch3x3_2a` (1×3) and `branch3x3_2b` (3×1), both applied to `branch3x3_1`'s output.
    branch3x3_2: [BasicConv; 2],
    /// `branch3x3dbl_1` → `branch3x3dbl_2`.
    branch3x3dbl_12: [BasicConv; 2],
    /// `branch3x3dbl_3a` and `branch3x3dbl_3b`, both applied to `branch3x3dbl_12`'s output.
    branch3x3dbl_3: [BasicConv; 2],
    branch_pool: BasicConv,
    pool: PoolKind,
}

impl BlockE {
    fn new(src: &mut Source, name: &str, cin: usize, pool: PoolKind) -> Result<Self> {
        let mut conv = |branch: &str, cin: usize, cout: usize, kernel: (usize, usize)| {
            src.conv(&format!("{name}.{branch}"), cin, cout, kernel, 1).map(|c| c.padded((kernel.0 / 2, kernel.1 / 2)))
        };
        Ok(Self {
            branch1x1: conv("branch1x1", cin, 320, (1, 1))?,
            branch3x3_1: conv("branch3x3_1", cin, 384, (1, 1))?,
            branch3x3_2: [conv("branch3x3_2a", 384, 384, (1, 3))?, conv("branch3x3_2b", 384, 384, (3, 1))?],
            branch3x3dbl_12: [conv("branch3x3dbl_1", cin, 448, (1, 1))?, conv("branch3x3dbl_2", 448, 384, (3, 3))?],
            branch3x3dbl_3: [conv("branch3x3dbl_3a", 384, 384, (1, 3))?, conv("branch3x3dbl_3b", 384, 384, (3, 1))?],
            branch_pool: conv("branch_pool", cin, 192, (1, 1))?,
            pool,
        })
    }

    /// # Shapes
    /// x (B, C, 8, 8) → (B, 2048, 8, 8)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branch3x3 = self.branch3x3_1.forward(x)?;
        let branch3x3dbl = chain(x, &self.branch3x3dbl_12)?;
        let pooled = match self.pool {
            PoolKind::Average => avg_pool_3x3_same(x)?,
            PoolKind::Max => max_pool_3x3_same(x)?,
        };
        let branches = [
            self.branch1x1.forward(x)?,
            self.branch3x3_2[0].forward(&branch3x3)?,
            self.branch3x3_2[1].forward(&branch3x3)?,
            self.branch3x3dbl_3[0].forward(&branch3x3dbl)?,
            self.branch3x3dbl_3[1].forward(&branch3x3dbl)?,
            self.branch_pool.forward(&pooled)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// pytorch-fid's FID InceptionV3 with its fc layer, inference only.
pub struct InceptionV3 {
    stem: [BasicConv; 3],
    stem2: [BasicConv; 2],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    /// (1008, 2048)
    fc_weight: Tensor,
    /// (1008)
    fc_bias: Tensor,
    device: Device,
}

impl InceptionV3 {
    fn build(src: &mut Source, device: &Device) -> Result<Self> {
        let stem = [
            src.conv("Conv2d_1a_3x3", 3, 32, (3, 3), 2)?,
            src.conv("Conv2d_2a_3x3", 32, 32, (3, 3), 1)?,
            src.conv("Conv2d_2b_3x3", 32, 64, (3, 3), 1)?.padded((1, 1)),
        ];
        let stem2 = [src.conv("Conv2d_3b_1x1", 64, 80, (1, 1), 1)?, src.conv("Conv2d_4a_3x3", 80, 192, (3, 3), 1)?];
        let mixed_5 = [
            BlockA::new(src, "Mixed_5b", 192, 32)?,
            BlockA::new(src, "Mixed_5c", 256, 64)?,
            BlockA::new(src, "Mixed_5d", 288, 64)?,
        ];
        let mixed_6a = BlockB::new(src, "Mixed_6a", 288)?;
        let mixed_6 = [
            BlockC::new(src, "Mixed_6b", 768, 128)?,
            BlockC::new(src, "Mixed_6c", 768, 160)?,
            BlockC::new(src, "Mixed_6d", 768, 160)?,
            BlockC::new(src, "Mixed_6e", 768, 192)?,
        ];
        let mixed_7a = BlockD::new(src, "Mixed_7a", 768)?;
        let mixed_7 = [
            BlockE::new(src, "Mixed_7b", 1280, PoolKind::Average)?,
            BlockE::new(src, "Mixed_7c", 2048, PoolKind::Max)?,
        ];
        let fc_weight = src.get("fc.weight".into(), &[LOGITS, POOL_FEATURES])?;
        let fc_bias = src.get("fc.bias".into(), &[LOGITS])?;
        let (fc_weight, fc_bias) = match (fc_weight, fc_bias) {
            (Some(weight), Some(bias)) => (to_f32(&weight, device)?, to_f32(&bias, device)?),
            _ => (placeholder()?, placeholder()?),
        };
        Ok(Self {
            stem,
            stem2,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7,
            fc_weight,
            fc_bias,
            device: device.clone(),
        })
    }

    /// The network from tensors named as in pytorch-fid's checkpoint (any float dtype, on any
    /// device; extra keys such as `*.num_batches_tracked` are ignored). Errors name the first
    /// missing key or the first one of the wrong shape.
    pub fn from_tensors(map: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        Self::build(&mut Source::Tensors { map, device }, device)
    }

    /// The network from a weights file: pytorch-fid's `.pth` or a `.safetensors` with its keys.
    /// Both `torch.save` formats are read (the zip format of torch ≥ 1.6 and the legacy one; see
    /// [`crate::tensor_io::read_pytorch`]).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = crate::tensor_io::read_weights(path, device, None)?;
        Self::from_tensors(&map, device)
            .map_err(|source| EvalError::WeightsFile { path: path.to_path_buf(), source: Box::new(source) })
    }

    /// Every key the network reads, with its shape, in load order (472 tensors: 94 convolutions
    /// with their BatchNorms, and the fc weight and bias).
    pub fn weight_shapes() -> Vec<(String, Vec<usize>)> {
        let mut src = Source::Record(Vec::new());
        if let Err(err) = Self::build(&mut src, &Device::Cpu) {
            unreachable!("recording reads no tensor and allocates only empty ones, yet failed: {err}");
        }
        match src {
            Source::Record(list) => list,
            Source::Tensors { .. } => unreachable!("src was built as a recorder"),
        }
    }

    /// The pool3 features and the fc logits of `images` (values in [0, 1], any size; resized to
    /// 299 × 299 as pytorch-fid does). Memory grows with B (tens of MB per image), so feed large
    /// sets in batches.
    ///
    /// # Shapes
    /// images (B, 3, H, W) → pool (B, 2048), logits (B, 1008)
    pub fn features(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[0] == 0 || dims[2] == 0 || dims[3] == 0 {
            return Err(EvalError::Bad(format!(
                "inception: images must be (B, 3, H, W) with B, H, W > 0, got {dims:?}"
            )));
        }
        let images = images.to_dtype(DType::F32)?.to_device(&self.device)?;
        let x = resize_bilinear(&images, INPUT_SIZE, INPUT_SIZE)?.affine(2.0, -1.0)?; // (B, 3, 299, 299)
        let x = max_pool_3x3_stride2(&chain(&x, &self.stem)?)?; // (B, 64, 73, 73)
        let mut x = max_pool_3x3_stride2(&chain(&x, &self.stem2)?)?; // (B, 192, 35, 35)
        for block in &self.mixed_5 {
            x = block.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?; // (B, 768, 17, 17)
        for block in &self.mixed_6 {
            x = block.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?; // (B, 1280, 8, 8)
        for block in &self.mixed_7 {
            x = block.forward(&x)?;
        }
        let pool = x.mean((2, 3))?; // (B, 2048)
        let logits = pool.matmul(&self.fc_weight.t()?)?.broadcast_add(&self.fc_bias)?; // (B, 1008)
        Ok((pool, logits))
    }
}

/// Deterministic stand-in weights and inputs, by formula: for tests and for dry runs of the FID
/// pipeline where the real weights are not at hand. They are **not trained**: a distance in
/// their features is an FD, never FID. `scripts/make-inception-fixture.py` computes the same
/// formula in numpy (tensor values: FNV-1a of the name seeds a splitmix64 stream, 24-bit uniforms
/// in [−1, 1), scaled per kind of tensor; `input.*` names give images in [0, 1]).
pub mod stand_in {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};

    use super::{InceptionV3, Result};

    /// Gain on the He-uniform scale of the conv weights: activations keep an O(1) scale.
    pub const CONV_GAIN: f64 = 1.1;

    fn fnv1a64(name: &str) -> u64 {
        name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Output `i` of the splitmix64 stream of `seed`, mapped to [−1, 1) with 24 bits (exact in f32).
    fn uniform(seed: u64, i: u64) -> f64 {
        let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f64 / (1u64 << 23) as f64 - 1.0
    }

    /// The formula tensor `name` of `shape`; `None` for a name of no known kind.
    pub fn tensor(name: &str, shape: &[usize], device: &Device) -> Option<Result<Tensor>> {
        let count: usize = shape.iter().product();
        let seed = fnv1a64(name);
        let fan_in: usize = shape.iter().skip(1).product();
        let conv_scale = (6.0 / fan_in.max(1) as f64).sqrt() * CONV_GAIN;
        let fc_scale = (3.0f64 / 2048.0).sqrt();
        let kind: Box<dyn Fn(f64) -> f64> = if name.starts_with("input.") {
            Box::new(|u| (u + 1.0) / 2.0)
        } else if name.ends_with("conv.weight") {
            Box::new(move |u| u * conv_scale)
        } else if name.ends_with("bn.weight") {
            Box::new(|u| 1.0 + 0.1 * u)
        } else if name.ends_with("bn.running_var") {
            Box::new(|u| 1.0 + 0.5 * u.abs())
        } else if name.ends_with("bn.bias") || name.ends_with("bn.running_mean") || name.ends_with("fc.bias") {
            Box::new(|u| 0.1 * u)
        } else if name == "fc.weight" {
            Box::new(move |u| u * fc_scale)
        } else {
            return None;
        };
        let values: Vec<f32> = (0..count as u64).map(|i| kind(uniform(seed, i)) as f32).collect();
        Some(Tensor::from_vec(values, shape, device).map_err(Into::into))
    }

    /// Every weight of the network, by pytorch-fid's key names.
    pub fn weights(device: &Device) -> Result<HashMap<String, Tensor>> {
        InceptionV3::weight_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let t = tensor(&name, &shape, device).expect("every network key has a formula kind")?;
                Ok((name, t))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(values: &[f32], height: usize, width: usize) -> Tensor {
        Tensor::from_vec(values.to_vec(), (1, 1, height, width), &Device::Cpu).unwrap()
    }

    fn plane(x: &Tensor) -> Vec<Vec<f32>> {
        x.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
        for (got_row, want_row) in got.iter().zip(want) {
            for (g, w) in got_row.iter().zip(want_row) {
                assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
            }
        }
    }

    #[test]
    fn bilinear_upsampling_2x2_to_4x4_matches_the_hand_computed_grid() {
        // align_corners=False: output o reads source (o + ½)/2 − ½, clamped to [0, 1], so the
        // weights per axis are [1, 0], [¾, ¼], [¼, ¾], [0, 1].
        let got = plane(&resize_bilinear(&image(&[0., 1., 2., 3.], 2, 2), 4, 4).unwrap());
        let want = [
            vec![0.0, 0.25, 0.75, 1.0],
            vec![0.5, 0.75, 1.25, 1.5],
            vec![1.5, 1.75, 2.25, 2.5],
            vec![2.0, 2.25, 2.75, 3.0],
        ];
        assert_close(&got, &want, 1e-6);
    }

    #[test]
    fn bilinear_downsampling_4x4_to_3x3_samples_the_align_corners_false_coordinates() {
        // Source coordinates (o + ½)·4/3 − ½ = 1/6, 3/2, 17/6. Bilinear interpolation of the
        // linear image 60·row + 6·col gives 60·src_row + 6·src_col exactly.
        let values: Vec<f32> = (0..16).map(|i| (60 * (i / 4) + 6 * (i % 4)) as f32).collect();
        let got = plane(&resize_bilinear(&image(&values, 4, 4), 3, 3).unwrap());
        let want: Vec<Vec<f32>> =
            [10.0, 90.0, 170.0].iter().map(|row| [1.0, 9.0, 17.0].iter().map(|col| row + col).collect()).collect();
        assert_close(&got, &want, 1e-4);
    }

    #[test]
    fn bilinear_resize_to_the_same_size_returns_the_input_unchanged() {
        let values: Vec<f32> = (0..35).map(|i| ((i * 37) % 11) as f32 / 7.0 - 0.3).collect();
        let x = image(&values, 5, 7);
        assert_eq!(plane(&resize_bilinear(&x, 5, 7).unwrap()), plane(&x));
    }

    /// Mean or max over the in-bounds 3 × 3 neighbourhood of each pixel, by loops.
    fn neighbourhood(values: &[f32], height: usize, width: usize, reduce: fn(&[f32]) -> f32) -> Vec<Vec<f32>> {
        (0..height as isize)
            .map(|row| {
                (0..width as isize)
                    .map(|col| {
                        let mut window = Vec::new();
                        for r in row - 1..=row + 1 {
                            for c in col - 1..=col + 1 {
                                if (0..height as isize).contains(&r) && (0..width as isize).contains(&c) {
                                    window.push(values[r as usize * width + c as usize]);
                                }
                            }
                        }
                        reduce(&window)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn average_pool_leaves_padding_out_of_the_count() {
        let values: Vec<f32> = (0..20).map(|i| ((i * 13) % 7) as f32 - 2.5).collect();
        let got = plane(&avg_pool_3x3_same(&image(&values, 4, 5)).unwrap());
        // The corner averages its 4 in-bounds values.
        let corner = (values[0] + values[1] + values[5] + values[6]) / 4.0;
        assert!((got[0][0] - corner).abs() < 1e-6, "corner {} vs {corner}", got[0][0]);
        let mean = |w: &[f32]| w.iter().sum::<f32>() / w.len() as f32;
        assert_close(&got, &neighbourhood(&values, 4, 5, mean), 1e-5);
    }

    #[test]
    fn same_size_max_pool_ignores_the_padding_of_negative_inputs() {
        let values: Vec<f32> = (0..20).map(|i| -(((i * 13) % 7) as f32) - 1.0).collect();
        let got = plane(&max_pool_3x3_same(&image(&values, 4, 5)).unwrap());
        let max = |w: &[f32]| w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(got, neighbourhood(&values, 4, 5, max));
    }

    fn zero_weights() -> HashMap<String, Tensor> {
        InceptionV3::weight_shapes()
            .into_iter()
            .map(|(key, shape)| {
                let tensor = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
                (key, tensor)
            })
            .collect()
    }

    #[test]
    fn weight_shapes_list_every_conv_batchnorm_and_the_fc_layer() {
        let shapes = InceptionV3::weight_shapes();
        assert_eq!(shapes.len(), 94 * 5 + 2);
        assert_eq!(shapes[0], ("Conv2d_1a_3x3.conv.weight".to_string(), vec![32, 3, 3, 3]));
        assert_eq!(shapes[shapes.len() - 1], ("fc.bias".to_string(), vec![LOGITS]));
        let elements: usize = shapes.iter().map(|(_, shape)| shape.iter().product::<usize>()).sum();
        assert_eq!(elements, 23_885_392, "pytorch-fid's FID InceptionV3 without num_batches_tracked");
    }

    #[test]
    fn a_missing_weight_is_an_error_naming_its_key() {
        let mut weights = zero_weights();
        weights.remove("Mixed_5c.branch5x5_2.bn.running_var");
        let err = InceptionV3::from_tensors(&weights, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "weights: missing tensor `Mixed_5c.branch5x5_2.bn.running_var`");
    }

    #[test]
    fn a_weight_of_the_wrong_shape_is_an_error_naming_both_shapes() {
        let mut weights = zero_weights();
        weights.insert(
            "Conv2d_1a_3x3.conv.weight".into(),
            Tensor::zeros((32, 3, 5, 5), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = InceptionV3::from_tensors(&weights, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "weights: `Conv2d_1a_3x3.conv.weight` has shape [32, 3, 5, 5], expected [32, 3, 3, 3]");
    }

    #[test]
    fn features_reject_images_without_three_channels() {
        let model = InceptionV3::from_tensors(&zero_weights(), &Device::Cpu).unwrap();
        let gray = Tensor::zeros((2, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let err = model.features(&gray).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("(B, 3, H, W)") && err.contains("[2, 1, 8, 8]"), "{err}");
    }
}
