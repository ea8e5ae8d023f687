//! The blocks Würstchen's Stage C and Stage B share, as diffusers'
//! `pipelines/deprecated/wuerstchen/modeling_wuerstchen_common.py`: the channel LayerNorm,
//! `TimestepBlock`, `ResBlock` with `GlobalResponseNorm`, `AttnBlock`, and the r-embedding.

use burn::tensor::{activation, DType, Device, Tensor, TensorData};

use crate::attention::{Attention, AttentionKeys};
use crate::error::{Error, Result};
use crate::nn::{channels_last_weights, norm_over, Activation, Conv2d, Linear};
use crate::tgate::AttentionCache;
use crate::weights::Weights;

/// `WuerstchenLayerNorm(c, elementwise_affine=False, eps=1e-6)` on `[b, c, h, w]`.
pub fn channel_norm(x: Tensor<4>) -> Tensor<4> {
    norm_over(x, 1, 1e-6)
}

/// [`channel_norm`] as a layer: on GPU devices running tgate's kernels one launch of the
/// LayerNorm kernel (`tgate_shaders::layer_norm`) over each pixel's channel vector, read and
/// written in the map's memory order (a channels-last map is not copied), with f32 statistics
/// whatever the storage dtype; elsewhere burn's ops.
#[derive(Clone, Debug)]
pub struct ChannelNorm {
    /// The kernel's unit scale and zero shift (`[c]`, f32), where the kernel runs.
    unit_affine: Option<(Tensor<1>, Tensor<1>)>,
}

impl ChannelNorm {
    /// For `c` channels, on the weights' device.
    pub fn load(w: &Weights, c: usize) -> Self {
        let unit_affine = channels_last_weights(w).then(|| {
            let device = w.device();
            (
                Tensor::ones([c], (device, DType::F32)),
                Tensor::zeros([c], (device, DType::F32)),
            )
        });
        ChannelNorm { unit_affine }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        #[cfg(feature = "wgpu")]
        if let Some((gamma, beta)) = &self.unit_affine {
            let [n, c, h, w] = x.dims();
            let pixels = x.clone().permute([0, 2, 3, 1]).reshape([n, h * w, c]);
            if let Some(y) = tgate_shaders::layer_norm(pixels, gamma, beta, 1e-6) {
                return y.reshape([n, h, w, c]).permute([0, 3, 1, 2]);
            }
        }
        channel_norm(x)
    }
}

/// `gen_r_embedding`: the noise ratio `r ∈ [0, 1]` → `[b, c_r]`, sin first then cos, computed on
/// the host in f32 as PyTorch does (`r · 10000`, frequencies `exp(-k · ln(10000) / (c_r/2 - 1))`).
pub fn r_embedding(r: &[f32], c_r: usize, device: &Device) -> Tensor<2> {
    let half = c_r / 2;
    let step = (10000f64.ln() / (half as f64 - 1.0)) as f32;
    let freqs: Vec<f32> = (0..half).map(|k| (k as f32 * -step).exp()).collect();
    let mut data = Vec::with_capacity(r.len() * c_r);
    for &ratio in r {
        let scaled = ratio * 10000.0;
        let args: Vec<f32> = freqs.iter().map(|f| scaled * f).collect();
        data.extend(args.iter().map(|a| a.sin()));
        data.extend(args.iter().map(|a| a.cos()));
        if c_r % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(data, [r.len(), c_r]), device)
}

/// Refuses an r-embedding size the formula cannot use (`c_r / 2 - 1` is a divisor).
pub fn check_c_r(file: &str, c_r: usize) -> Result<()> {
    if c_r < 4 {
        return Err(Error::config(
            file,
            format!("c_r must be at least 4, got {c_r}"),
        ));
    }
    Ok(())
}

/// `TimestepBlock`: `x · (1 + a) + b` with `[a, b] = mapper(r_embed)`.
#[derive(Clone, Debug)]
pub struct TimestepBlock {
    mapper: Linear,
    c: usize,
}

impl TimestepBlock {
    pub fn load(w: &Weights, c: usize, c_r: usize) -> Result<Self> {
        Ok(TimestepBlock {
            mapper: Linear::load(&w.pp("mapper"), c_r, 2 * c, true)?,
            c,
        })
    }

    /// The block's scale `1 + a` and shift `b` for each row of `r_embed: [n, c_r]`.
    pub fn modulation(&self, r_embed: &Tensor<2>) -> Modulation {
        let ab = self.mapper.forward(r_embed.clone());
        Modulation {
            scale: ab.clone().narrow(1, 0, self.c).add_scalar(1.0),
            shift: ab.narrow(1, self.c, self.c),
        }
    }

    /// The channels it modulates.
    pub fn channels(&self) -> usize {
        self.c
    }
}

/// A [`TimestepBlock`]'s scale `1 + a` and shift `b`, `[n, c]` each: one row per noise ratio.
#[derive(Clone, Debug)]
pub struct Modulation {
    scale: Tensor<2>,
    shift: Tensor<2>,
}

impl Modulation {
    /// Row `i` (a view).
    fn row(&self, i: usize) -> Self {
        Modulation {
            scale: self.scale.clone().narrow(0, i, 1),
            shift: self.shift.clone().narrow(0, i, 1),
        }
    }

    /// `x · scale + shift` on `x: [b, c, h, w]`; the rows are `x`'s batch rows, or one row for
    /// all of them.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c] = self.scale.dims();
        x * self.scale.clone().reshape([n, c, 1, 1]) + self.shift.clone().reshape([n, c, 1, 1])
    }
}

/// The modulation of every [`TimestepBlock`] of a model (in the order its forward pass meets
/// them) for a list of noise ratios. A pipeline makes one for all the steps of a generation
/// (the ratios are known in advance, and the mapping is the same at every call), so a step only
/// takes row views; a direct call makes one row per batch row.
#[derive(Clone, Debug)]
pub struct RTable {
    blocks: Vec<Modulation>,
    rows: usize,
}

impl RTable {
    /// Maps `r` through each of `blocks` (`c_r`: the r-embedding size, `dtype`: the model's).
    pub fn new<'a>(
        blocks: impl Iterator<Item = &'a TimestepBlock>,
        r: &[f32],
        c_r: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let embed = r_embedding(r, c_r, device).cast(dtype);
        RTable {
            blocks: blocks.map(|b| b.modulation(&embed)).collect(),
            rows: r.len(),
        }
    }

    /// Bytes a table of `rows` ratios takes for `blocks` of `c` channels each, in `dtype`.
    pub fn bytes(channels: impl Iterator<Item = usize>, rows: usize, dtype: DType) -> u64 {
        channels.map(|c| (2 * c * rows * dtype.size()) as u64).sum()
    }

    /// Number of rows (noise ratios).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `i` of every block (views), for a call whose batch rows share that ratio. `None`
    /// past the last row.
    pub fn row(&self, i: usize) -> Option<RTable> {
        (i < self.rows).then(|| RTable {
            blocks: self.blocks.iter().map(|m| m.row(i)).collect(),
            rows: 1,
        })
    }

    /// The modulation of the `k`-th block met by the forward pass.
    ///
    /// # Panics
    /// If the table was made for a model with fewer timestep blocks (programmer error).
    pub fn block(&self, k: usize) -> &Modulation {
        &self.blocks[k]
    }
}

/// `GlobalResponseNorm` on channels-last `[b, h, w, c]`.
#[derive(Clone, Debug)]
pub struct GlobalResponseNorm {
    gamma: Tensor<4>,
    beta: Tensor<4>,
}

impl GlobalResponseNorm {
    pub fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(GlobalResponseNorm {
            gamma: w.get("gamma", [1, 1, 1, dim])?,
            beta: w.get("beta", [1, 1, 1, dim])?,
        })
    }

    /// The response statistics are computed in f32 whatever the activation dtype: the L2 norm
    /// over the pixels is one reduction (as `torch.norm(dim=(1, 2))`) over the `[b, h·w, c]`
    /// view of the map.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let agg = x
            .clone()
            .cast(DType::F32)
            .square()
            .reshape([b, h * w, c])
            .sum_dim(1)
            .sqrt()
            .reshape([b, 1, 1, c]);
        let stand = (agg.clone() / agg.mean_dim(3).add_scalar(1e-6)).cast(x.dtype());
        self.gamma.clone() * (x.clone() * stand) + self.beta.clone() + x
    }
}

/// The channel MLP of both ResBlock variants: `Linear → GELU → GRN → Linear` on channels-last.
#[derive(Clone, Debug)]
pub struct Channelwise {
    fc1: Linear,
    grn: GlobalResponseNorm,
    fc2: Linear,
}

impl Channelwise {
    pub fn load(w: &Weights, c_in: usize, c_hidden: usize, c_out: usize) -> Result<Self> {
        Ok(Channelwise {
            fc1: Linear::load(&w.pp("0"), c_in, c_hidden, true)?,
            grn: GlobalResponseNorm::load(&w.pp("2"), c_hidden)?,
            fc2: Linear::load(&w.pp("4"), c_hidden, c_out, true)?,
        })
    }

    /// `[b, c_in, h, w] -> [b, c_out, h, w]` (through the channels-last view).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = x.permute([0, 2, 3, 1]);
        let x = self.fc1.forward(x);
        let x = self.grn.forward(Activation::Gelu.forward(x));
        self.fc2.forward(x).permute([0, 3, 1, 2])
    }
}

/// Stage C's `ResBlock`: depthwise conv (on `[x, skip]`), channel norm, channel MLP, residual.
#[derive(Clone, Debug)]
pub struct ResBlock {
    depthwise: Conv2d,
    norm: ChannelNorm,
    channelwise: Channelwise,
}

impl ResBlock {
    pub fn load(w: &Weights, c: usize, c_skip: usize, kernel: usize) -> Result<Self> {
        Ok(ResBlock {
            depthwise: Conv2d::load_grouped(
                &w.pp("depthwise"),
                c + c_skip,
                c,
                kernel,
                1,
                kernel / 2,
                c,
            )?,
            norm: ChannelNorm::load(w, c),
            channelwise: Channelwise::load(&w.pp("channelwise"), c, 4 * c, c)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>, skip: Option<Tensor<4>>) -> Tensor<4> {
        let residual = x.clone();
        let x = match skip {
            Some(s) => Tensor::cat(vec![x, s], 1),
            None => x,
        };
        let x = self.norm.forward(self.depthwise.forward(x));
        self.channelwise.forward(x) + residual
    }
}

/// `AttnBlock` (with `self_attn=True`): attention of the normalised image tokens over
/// `[image tokens, kv_mapper(cond)]`. In Stage C this is where the text enters, so this is also
/// where the gate acts (see [`AttentionCache::text_kv_attention`]).
#[derive(Clone, Debug)]
pub struct AttnBlock {
    norm: ChannelNorm,
    attention: Attention,
    kv_mapper: Linear,
}

impl AttnBlock {
    pub fn load(w: &Weights, c: usize, c_cond: usize, nhead: usize) -> Result<Self> {
        if nhead == 0 || c % nhead != 0 {
            return Err(Error::param(
                "nhead",
                format!("{c} channels cannot be split into {nhead} heads"),
            ));
        }
        Ok(AttnBlock {
            norm: ChannelNorm::load(w, c),
            // The queries and the image keys and values project the same tokens: one joined
            // matmul (the text's keys and values, once per generation, use it too).
            attention: Attention::load_self(
                &w.pp("attention"),
                c,
                nhead,
                c / nhead,
                true,
                AttentionKeys::CURRENT,
            )?,
            kv_mapper: Linear::load(&w.pp("kv_mapper").pp("1"), c_cond, c, true)?,
        })
    }

    /// `x: [b, c, h, w]`, `cond: [b, n, c_cond]`, the same at every step of a generation: the
    /// cache keeps its keys and values (and, in Stage C, carries the gate), so a new text needs
    /// a new cache.
    pub fn forward(&self, x: Tensor<4>, cond: &Tensor<3>, cache: &mut AttentionCache) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        // The query and the image keys/values are shared by both attention variants, so the
        // gate step pays only one extra attention core and output projection.
        let attn = &self.attention;
        let (q, k_img, v_img) = attn.query_key_value(tokens);
        let out = cache.text_kv_attention(
            cond.dims()[0],
            || attn.key_value(self.kv_mapper.forward(activation::silu(cond.clone()))),
            // Over [image tokens, text]: one kernel walks both, the concatenation is never made.
            |k_text, v_text| {
                attn.attend_joined(q.clone(), (k_img.clone(), v_img.clone()), (k_text, v_text))
            },
            || attn.attend(q.clone(), k_img.clone(), v_img.clone()),
        );
        x + out.swap_dims(1, 2).reshape([b, c, h, w])
    }
}
