//! LlamaGen's VQ-VAE in candle (design §2).
//!
//! Parameter names are LlamaGen's checkpoint keys (`encoder.conv_blocks.{i}.res.{j}.conv1.weight`,
//! `quantize.embedding.weight`, `quant_conv.weight`, …) so that released VQ-16 weights load by
//! name. Differences from the reference: no LPIPS/GAN losses (optional in LlamaGen too; design §2), and the
//! L2 normalisation adds 1e-12 under the square root instead of clamping the norm (both only
//! matter for an all-zero latent).
//!
//! # Shapes
//! B batch, C channels, H×W pixels, h×w = G×G latent grid, Cd code dim, V codebook size.

use candle_core::{DType, Tensor, D};

use super::{Result, TokenizerError, VqConfig};
use crate::kernels::conv::{conv2d, ConvParams};
use crate::params::{Init, Pb};

/// A 2-D convolution with bias, initialised like PyTorch's `nn.Conv2d` (U(±1/√fan_in)).
struct Conv {
    weight: Tensor,
    bias: Tensor,
    params: ConvParams,
}

impl Conv {
    fn new(pb: &Pb, cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let bound = 1.0 / ((cin * kernel * kernel) as f64).sqrt();
        Ok(Self {
            weight: pb.get((cout, cin, kernel, kernel), "weight", Init::Uniform(bound))?,
            bias: pb.get(cout, "bias", Init::Uniform(bound))?,
            params: ConvParams::symmetric(stride, padding),
        })
    }

    /// # Shapes
    /// (B, Cin, H, W) → (B, Cout, H', W')
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.params)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

/// GroupNorm(groups, eps 1e-6) with affine weight and bias, run by our fused kernel (optionally
/// with the swish that follows it).
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

fn group_norm(pb: &Pb, channels: usize, groups: usize) -> Result<GroupNorm> {
    Ok(GroupNorm {
        weight: pb.get(channels, "weight", Init::Const(1.0))?,
        bias: pb.get(channels, "bias", Init::Const(0.0))?,
        groups,
    })
}

impl GroupNorm {
    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        Ok(crate::kernels::group_norm::group_norm(x, &self.weight, &self.bias, self.groups, 1e-6, silu)?)
    }
}

/// x + conv2(swish(GN(conv1(swish(GN(x)))))), with a 1×1 `nin_shortcut` when channels change.
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResBlock {
    fn new(pb: &Pb, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(&pb.pp("norm1"), cin, groups)?,
            conv1: Conv::new(&pb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(&pb.pp("norm2"), cout, groups)?,
            conv2: Conv::new(&pb.pp("conv2"), cout, cout, 3, 1, 1)?,
            nin_shortcut: if cin != cout { Some(Conv::new(&pb.pp("nin_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        let skip = match &self.nin_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// Single-head self-attention over the spatial positions, with 1×1 q/k/v/proj convolutions.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(pb: &Pb, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: group_norm(&pb.pp("norm"), channels, groups)?,
            q: Conv::new(&pb.pp("q"), channels, channels, 1, 1, 0)?,
            k: Conv::new(&pb.pp("k"), channels, channels, 1, 1, 0)?,
            v: Conv::new(&pb.pp("v"), channels, channels, 1, 1, 0)?,
            proj_out: Conv::new(&pb.pp("proj_out"), channels, channels, 1, 1, 0)?,
        })
    }

    /// # Shapes
    /// (B, C, h, w) → (B, C, h, w)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x, false)?;
        let q = self.q.forward(&normed)?.reshape((b, c, h * w))?.transpose(1, 2)?; // (B, hw, C)
        let k = self.k.forward(&normed)?.reshape((b, c, h * w))?; // (B, C, hw)
        let v = self.v.forward(&normed)?.reshape((b, c, h * w))?; // (B, C, hw)
        let scores = (q.contiguous()?.matmul(&k)? * (c as f64).powf(-0.5))?; // (B, hw_q, hw_k)
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = v.matmul(&probs.transpose(1, 2)?.contiguous()?)?; // (B, C, hw_q)
        let out = self.proj_out.forward(&out.reshape((b, c, h, w))?)?;
        Ok((x + out)?)
    }
}

struct Level {
    res: Vec<ResBlock>,
    attn: Vec<AttnBlock>,
    /// Encoder: downsample; decoder: upsample.
    resample: Option<Conv>,
}

impl Level {
    fn forward(&self, mut h: Tensor, up: bool) -> Result<Tensor> {
        for (i, block) in self.res.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward(&h)?;
            }
        }
        if let Some(conv) = &self.resample {
            h = if up {
                let (_, _, hh, ww) = h.dims4()?;
                conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?
            } else {
                // Pad right and bottom by one, then a 3×3 stride-2 convolution.
                conv.forward(&h)?
            };
        }
        Ok(h)
    }
}

struct Mid {
    res1: ResBlock,
    attn: AttnBlock,
    res2: ResBlock,
}

impl Mid {
    fn new(pb: &Pb, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            res1: ResBlock::new(&pb.pp(0), channels, channels, groups)?,
            attn: AttnBlock::new(&pb.pp(1), channels, groups)?,
            res2: ResBlock::new(&pb.pp(2), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.res2.forward(&self.attn.forward(&self.res1.forward(x)?)?)
    }
}

struct Encoder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(pb: &Pb, c: &VqConfig) -> Result<Self> {
        let g = c.norm_groups;
        let n = c.ch_mult.len();
        let conv_in = Conv::new(&pb.pp("conv_in"), c.in_channels, c.ch, 3, 1, 1)?;
        let mut levels = Vec::with_capacity(n);
        let mut block_in = c.ch;
        for (i, &mult) in c.ch_mult.iter().enumerate() {
            let lp = pb.pp("conv_blocks").pp(i);
            let block_out = c.ch * mult;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..c.num_res_blocks {
                res.push(ResBlock::new(&lp.pp("res").pp(j), block_in, block_out, g)?);
                block_in = block_out;
                if i == n - 1 && c.attn_at_lowest {
                    attn.push(AttnBlock::new(&lp.pp("attn").pp(j), block_in, g)?);
                }
            }
            let resample = if i != n - 1 {
                let mut conv = Conv::new(&lp.pp("downsample").pp("conv"), block_in, block_in, 3, 2, 0)?;
                conv.params.pad = (0, 1, 0, 1);
                Some(conv)
            } else {
                None
            };
            levels.push(Level { res, attn, resample });
        }
        Ok(Self {
            conv_in,
            levels,
            mid: Mid::new(&pb.pp("mid"), block_in, g)?,
            norm_out: group_norm(&pb.pp("norm_out"), block_in, g)?,
            conv_out: Conv::new(&pb.pp("conv_out"), block_in, c.z_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.levels {
            h = level.forward(h, false)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

struct Decoder {
    conv_in: Conv,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(pb: &Pb, c: &VqConfig) -> Result<Self> {
        let g = c.norm_groups;
        let n = c.ch_mult.len();
        let mut block_in = c.ch * c.ch_mult[n - 1];
        let conv_in = Conv::new(&pb.pp("conv_in"), c.z_channels, block_in, 3, 1, 1)?;
        let mid = Mid::new(&pb.pp("mid"), block_in, g)?;
        // conv_blocks.0 is the lowest resolution (ch_mult[n-1]), as in LlamaGen.
        let mut levels = Vec::with_capacity(n);
        for (i, level_mult) in c.ch_mult.iter().rev().enumerate() {
            let lp = pb.pp("conv_blocks").pp(i);
            let block_out = c.ch * level_mult;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..=c.num_res_blocks {
                res.push(ResBlock::new(&lp.pp("res").pp(j), block_in, block_out, g)?);
                block_in = block_out;
                if i == 0 && c.attn_at_lowest {
                    attn.push(AttnBlock::new(&lp.pp("attn").pp(j), block_in, g)?);
                }
            }
            let resample = if i != n - 1 {
                Some(Conv::new(&lp.pp("upsample").pp("conv"), block_in, block_in, 3, 1, 1)?)
            } else {
                None
            };
            levels.push(Level { res, attn, resample });
        }
        Ok(Self {
            conv_in,
            mid,
            levels,
            norm_out: group_norm(&pb.pp("norm_out"), block_in, g)?,
            conv_out: Conv::new(&pb.pp("conv_out"), block_in, c.in_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in &self.levels {
            h = level.forward(h, true)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&h, true)?)
    }
}

/// What the quantizer returns for a batch of latents.
pub struct Quantized {
    /// Straight-through quantized latents (B, Cd, h, w): forward value = codebook rows, gradient
    /// flows to the encoder as if the quantizer were the identity.
    pub z_q: Tensor,
    /// Codes (B, h·w), u32, raster order.
    pub codes: Tensor,
    /// Codebook loss mean((z_q − sg(z))²).
    pub codebook_loss: Tensor,
    /// Commitment loss β·mean((sg(z_q) − z)²).
    pub commit_loss: Tensor,
    /// The (normalised) latents, flattened (B·h·w, Cd), detached: for dead-code restarts.
    pub latents: Tensor,
}

/// LlamaGen's VQ model.
pub struct VqModel {
    config: VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// `quantize.embedding.weight`, (V, Cd).
    embedding: Tensor,
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

impl VqModel {
    /// Builds the model under `pb` (parameters are created with seeded initial values).
    pub fn new(config: &VqConfig, pb: &Pb) -> Result<Self> {
        config.validate()?;
        let v = config.codebook_size;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(&pb.pp("encoder"), config)?,
            decoder: Decoder::new(&pb.pp("decoder"), config)?,
            quant_conv: Conv::new(&pb.pp("quant_conv"), config.z_channels, config.codebook_dim, 1, 1, 0)?,
            post_quant_conv: Conv::new(&pb.pp("post_quant_conv"), config.codebook_dim, config.z_channels, 1, 1, 0)?,
            // LlamaGen: U(±1/V), then rows L2-normalised; normalisation happens at use here.
            embedding: pb.pp("quantize").pp("embedding").get(
                (v, config.codebook_dim),
                "weight",
                Init::Uniform(1.0 / v as f64),
            )?,
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.config
    }

    fn check_images(&self, x: &Tensor) -> Result<()> {
        let c = &self.config;
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != c.in_channels || dims[2] != c.image_size || dims[3] != c.image_size {
            return Err(TokenizerError::BadInput(format!(
                "expected images of shape (B, {}, {}, {}), got {:?}",
                c.in_channels, c.image_size, c.image_size, dims
            )));
        }
        Ok(())
    }

    /// The codebook as used: L2-normalised rows when `l2_norm`. (V, Cd)
    pub fn codebook(&self) -> Result<Tensor> {
        if self.config.l2_norm {
            l2_normalize(&self.embedding)
        } else {
            Ok(self.embedding.clone())
        }
    }

    /// Encoder + `quant_conv`: pre-quantisation latents (B, Cd, h, w).
    pub fn encode_latents(&self, x: &Tensor) -> Result<Tensor> {
        self.check_images(x)?;
        self.quant_conv.forward(&self.encoder.forward(x)?)
    }

    /// Nearest codes (maximal cosine similarity when `l2_norm`) and the training losses.
    pub fn quantize(&self, z: &Tensor) -> Result<Quantized> {
        let (b, cd, h, w) = z.dims4()?;
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, cd))?; // (N, Cd)
        let flat = if self.config.l2_norm { l2_normalize(&flat)? } else { flat };
        let codebook = self.codebook()?; // (V, Cd)
        let codes = nearest_codes(&flat, &codebook, self.config.l2_norm)?; // (N,)
        let z_q = codebook.index_select(&codes, 0)?; // (N, Cd)
        let codebook_loss = (&z_q - flat.detach())?.sqr()?.mean_all()?;
        let commit_loss = ((z_q.detach() - &flat)?.sqr()?.mean_all()? * self.config.commit_beta)?;
        let z_st = (&flat + (&z_q - &flat)?.detach())?;
        let z_st = z_st.reshape((b, h, w, cd))?.permute((0, 3, 1, 2))?.contiguous()?; // (B, Cd, h, w)
        Ok(Quantized {
            z_q: z_st,
            codes: codes.reshape((b, h * w))?,
            codebook_loss,
            commit_loss,
            latents: flat.detach(),
        })
    }

    /// Images → codes (B, G·G), u32.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.quantize(&self.encode_latents(x)?)?.codes)
    }

    /// Quantized latents (B, Cd, h, w) → images (B, C, H, W), roughly in [−1, 1].
    pub fn decode_latents(&self, z_q: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.post_quant_conv.forward(z_q)?)
    }

    /// Codes (B, G·G) → images (B, C, H, W).
    pub fn decode_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, l) = codes.dims2()?;
        let g = self.config.grid_size();
        if l != g * g {
            return Err(TokenizerError::BadInput(format!("expected {} codes per image, got {l}", g * g)));
        }
        let max = codes.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= self.config.codebook_size {
            return Err(TokenizerError::BadInput(format!(
                "code {max} is outside the codebook of {}",
                self.config.codebook_size
            )));
        }
        let rows = self.codebook()?.index_select(&codes.flatten_all()?, 0)?; // (B·L, Cd)
        let z_q = rows.reshape((b, g, g, self.config.codebook_dim))?.permute((0, 3, 1, 2))?.contiguous()?;
        self.decode_latents(&z_q)
    }

    /// Full training forward: reconstruction and quantizer outputs.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Quantized)> {
        let quantized = self.quantize(&self.encode_latents(x)?)?;
        let recon = self.decode_latents(&quantized.z_q)?;
        Ok((recon, quantized))
    }
}

/// Index of the nearest codebook row for every latent: argmax of the dot product for normalised
/// vectors (= maximal cosine similarity), argmin of the squared distance otherwise.
/// (N, Cd) × (V, Cd) → (N,) u32.
pub fn nearest_codes(latents: &Tensor, codebook: &Tensor, normalized: bool) -> Result<Tensor> {
    let latents = latents.detach();
    let codebook = codebook.detach();
    let dots = latents.matmul(&codebook.t()?)?; // (N, V)
    let codes = if normalized {
        dots.argmax(D::Minus1)?
    } else {
        let sq = codebook.sqr()?.sum(D::Minus1)?.unsqueeze(0)?; // (1, V)
        (sq.broadcast_sub(&(dots * 2.0)?))?.argmin(D::Minus1)?
    };
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::Device;
    use rand::Rng;

    fn tiny_config() -> VqConfig {
        VqConfig {
            in_channels: 3,
            image_size: 8,
            ch: 8,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            attn_at_lowest: true,
            z_channels: 8,
            codebook_size: 16,
            codebook_dim: 4,
            l2_norm: true,
            norm_groups: 4,
            commit_beta: 0.25,
        }
    }

    #[test]
    fn quantizer_picks_the_code_of_maximal_cosine_similarity() {
        let mut rng = crate::util::rng_for(1, "test", 0);
        let (n, v, cd) = (64, 37, 5);
        let lat: Vec<f32> = (0..n * cd).map(|_| rng.random_range(-1.0..1.0)).collect();
        let book: Vec<f32> = (0..v * cd).map(|_| rng.random_range(-1.0..1.0)).collect();
        let codes = nearest_codes(
            &Tensor::from_vec(lat.clone(), (n, cd), &Device::Cpu).unwrap(),
            &l2_normalize(&Tensor::from_vec(book.clone(), (v, cd), &Device::Cpu).unwrap()).unwrap(),
            true,
        )
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
        for i in 0..n {
            let z = &lat[i * cd..(i + 1) * cd];
            let cos = |j: usize| {
                let e = &book[j * cd..(j + 1) * cd];
                let dot: f32 = z.iter().zip(e).map(|(a, b)| a * b).sum();
                let ne: f32 = e.iter().map(|a| a * a).sum::<f32>().sqrt();
                dot / ne
            };
            let best = (0..v).max_by(|&a, &b| cos(a).total_cmp(&cos(b))).unwrap();
            assert_eq!(codes[i] as usize, best, "latent {i}");
        }
    }

    #[test]
    fn encode_decode_shapes_for_every_preset() {
        // The small presets at their real size; VQ-16 on a 32 px input (same layers, smaller
        // image) to keep the test fast.
        let mut vq16 = VqConfig::vq16();
        vq16.image_size = 32;
        for config in [VqConfig::mnist(), vq16, tiny_config()] {
            let store = ParamStore::new(0, &Device::Cpu);
            let model = VqModel::new(&config, &store.root()).unwrap();
            let s = config.image_size;
            let x = Tensor::zeros((2, config.in_channels, s, s), DType::F32, &Device::Cpu).unwrap();
            let codes = model.encode(&x).unwrap();
            assert_eq!(codes.dims(), &[2, config.seq_len()]);
            let y = model.decode_codes(&codes).unwrap();
            assert_eq!(y.dims(), &[2, config.in_channels, s, s]);
        }
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let store = ParamStore::new(0, &Device::Cpu);
        let model = VqModel::new(&tiny_config(), &store.root()).unwrap();
        let x = Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(model.encode(&x).unwrap_err().to_string().contains("expected images of shape"));
        let codes = Tensor::new(&[[16u32; 16]], &Device::Cpu).unwrap();
        assert!(model.decode_codes(&codes).unwrap_err().to_string().contains("outside the codebook"));
    }

    #[test]
    fn every_trainable_parameter_gets_a_finite_nonzero_gradient() {
        let store = ParamStore::new(5, &Device::Cpu);
        let config = tiny_config();
        let model = VqModel::new(&config, &store.root()).unwrap();
        let mut rng = crate::util::rng_for(2, "x", 0);
        let vals: Vec<f32> = (0..2 * 3 * 8 * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x = Tensor::from_vec(vals, (2, 3, 8, 8), &Device::Cpu).unwrap();
        let (recon, q) = model.forward(&x).unwrap();
        let loss =
            ((recon - &x).unwrap().sqr().unwrap().mean_all().unwrap() + q.codebook_loss + q.commit_loss).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in store.vars() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "non-finite gradient for {name}");
            assert!(v.iter().any(|&x| x != 0.0), "zero gradient for {name}");
        }
    }
}
