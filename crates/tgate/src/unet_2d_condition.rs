//! diffusers' `UNet2DConditionModel`, built from its `config.json`.
//!
//! Supports what SD 1.x / 2.x checkpoints use: `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`, `attention_head_dim` as an
//! int or a per-block list, conv or linear projections. Anything else is refused by name.

use burn::tensor::{DType, Tensor};
use serde_json::Value;

use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::error::{Error, Result};
use crate::nn::{Activation, ActivationSize, Conv2d, GroupNorm};
use crate::tgate::AttentionCache;
use crate::unet_2d_blocks::{BlockCommon, CrossAttn, DownBlock, MidBlock, UpBlock};
use crate::weights::Weights;

/// The UNet's shape, with diffusers' naming quirks resolved (`heads` is what diffusers calls
/// `attention_head_dim` when `num_attention_heads` is unset).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    /// Per down block: has cross-attention.
    pub down_cross: Vec<bool>,
    /// Per up block (in up order): has cross-attention.
    pub up_cross: Vec<bool>,
    /// Attention heads per down block.
    pub heads: Vec<usize>,
    /// Transformer depth per down block.
    pub transformer_depth: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub sample_size: usize,
    pub center_input_sample: bool,
}

fn per_block(v: Option<&Value>, n: usize, name: &str, file: &str) -> Result<Option<Vec<usize>>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(x)) => match x.as_u64() {
            Some(x) => Ok(Some(vec![x as usize; n])),
            None => Err(Error::config(
                file,
                format!("`{name}` must be a non-negative int, got {x}"),
            )),
        },
        Some(Value::Array(a)) => {
            let list: Option<Vec<usize>> =
                a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect();
            match list {
                Some(l) if l.len() == n => Ok(Some(l)),
                _ => Err(Error::config(
                    file,
                    format!("`{name}` must be an int or a list of {n} ints"),
                )),
            }
        }
        Some(_) => Err(Error::config(
            file,
            format!("`{name}` must be an int or a list"),
        )),
    }
}

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        let err = |m: String| Error::config(file, m);
        let usize_of = |k: &str, default: Option<usize>| -> Result<usize> {
            match v.get(k) {
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| err(format!("`{k}` must be a non-negative int"))),
                None => default.ok_or_else(|| err(format!("missing `{k}`"))),
            }
        };
        let str_list = |k: &str| -> Result<Vec<String>> {
            v.get(k)
                .and_then(|x| x.as_array())
                .and_then(|a| a.iter().map(|s| s.as_str().map(String::from)).collect())
                .ok_or_else(|| err(format!("missing or malformed `{k}`")))
        };
        let block_out_channels: Vec<usize> = v
            .get("block_out_channels")
            .and_then(|x| x.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|c| c.as_u64().map(|c| c as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| err("missing or malformed `block_out_channels`".into()))?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(err("`block_out_channels` is empty".into()));
        }
        let down = str_list("down_block_types")?;
        let up = str_list("up_block_types")?;
        if down.len() != n || up.len() != n {
            return Err(err(format!(
                "{} down and {} up block types for {n} levels",
                down.len(),
                up.len()
            )));
        }
        let kind = |t: &str, cross: &str, plain: &str| -> Result<bool> {
            if t == cross {
                Ok(true)
            } else if t == plain {
                Ok(false)
            } else {
                Err(err(format!("unsupported block type `{t}`")))
            }
        };
        let down_cross = down
            .iter()
            .map(|t| kind(t, "CrossAttnDownBlock2D", "DownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_cross = up
            .iter()
            .map(|t| kind(t, "CrossAttnUpBlock2D", "UpBlock2D"))
            .collect::<Result<Vec<_>>>()?;

        // Refuse the variants that change the computation and are not implemented.
        let must_be = |k: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
            match v.get(k) {
                Some(x) if !ok(x) => Err(err(format!("unsupported `{k}` = {x}"))),
                _ => Ok(()),
            }
        };
        let null = |x: &Value| x.is_null();
        let falsy = |x: &Value| x.is_null() || x == &Value::Bool(false);
        for k in [
            "class_embed_type",
            "addition_embed_type",
            "time_cond_proj_dim",
            "encoder_hid_dim",
            "num_class_embeds",
        ] {
            must_be(k, &null)?;
        }
        for k in ["only_cross_attention", "dual_cross_attention"] {
            must_be(k, &falsy)?;
        }
        must_be("act_fn", &|x| x == "silu")?;
        must_be("attention_type", &|x| x == "default")?;
        must_be("resnet_time_scale_shift", &|x| x == "default")?;
        must_be("time_embedding_type", &|x| x == "positional")?;
        must_be("mid_block_type", &|x| x == "UNetMidBlock2DCrossAttn")?;
        // diffusers 0.42 itself refuses `num_attention_heads` for this model (its
        // `attention_head_dim` carries the head counts).
        must_be("num_attention_heads", &null)?;
        must_be("conv_in_kernel", &|x| x.as_u64() == Some(3))?;
        must_be("conv_out_kernel", &|x| x.as_u64() == Some(3))?;
        must_be("mid_block_scale_factor", &|x| x.as_f64() == Some(1.0))?;
        must_be("downsample_padding", &|x| x.as_u64() == Some(1))?;

        let heads = per_block(v.get("attention_head_dim"), n, "attention_head_dim", file)?
            .unwrap_or(vec![8; n]);
        let layers_per_block = per_block(v.get("layers_per_block"), n, "layers_per_block", file)?
            .unwrap_or(vec![2; n]);
        let transformer_depth = per_block(
            v.get("transformer_layers_per_block"),
            n,
            "transformer_layers_per_block",
            file,
        )?
        .unwrap_or(vec![1; n]);
        let cross_attention_dim = match v.get("cross_attention_dim") {
            None => 1280,
            Some(x) => x
                .as_u64()
                .ok_or_else(|| err("`cross_attention_dim` must be an int".into()))?
                as usize,
        };
        let cfg = UNetConfig {
            in_channels: usize_of("in_channels", Some(4))?,
            out_channels: usize_of("out_channels", Some(4))?,
            layers_per_block,
            down_cross,
            up_cross,
            heads,
            transformer_depth,
            cross_attention_dim,
            use_linear_projection: v
                .get("use_linear_projection")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            norm_num_groups: usize_of("norm_num_groups", Some(32))?,
            norm_eps: v.get("norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            flip_sin_to_cos: v
                .get("flip_sin_to_cos")
                .and_then(|x| x.as_bool())
                .unwrap_or(true),
            freq_shift: v.get("freq_shift").and_then(|x| x.as_f64()).unwrap_or(0.0),
            sample_size: usize_of("sample_size", Some(64))?,
            center_input_sample: v
                .get("center_input_sample")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            block_out_channels,
        };
        if cfg.norm_num_groups == 0 {
            return Err(err("`norm_num_groups` must be at least 1".into()));
        }
        if let Some(i) = cfg.layers_per_block.iter().position(|&l| l == 0) {
            return Err(err(format!(
                "block {i}: `layers_per_block` must be at least 1"
            )));
        }
        if let Some(i) = cfg.transformer_depth.iter().position(|&l| l == 0) {
            return Err(err(format!(
                "block {i}: `transformer_layers_per_block` must be at least 1"
            )));
        }
        for (i, (&c, &h)) in cfg.block_out_channels.iter().zip(&cfg.heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels do not split into {h} attention heads"
                )));
            }
            if c % cfg.norm_num_groups != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels do not split into {} groups",
                    cfg.norm_num_groups
                )));
            }
        }
        Ok(cfg)
    }

    /// Time-embedding width (4 × the first block's channels).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

/// The conditional UNet.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
}

impl UNet2DConditionModel {
    /// The largest activation of a forward pass on `[batch, c, h, w]` latents (attention scores
    /// excepted): the feed-forward's GEGLU projection (`8 × channels` per token) or an up-block
    /// resnet's input (its channels plus the skip's), whichever is bigger. Group norms compute
    /// in f32, so feature maps count 4 bytes per element.
    pub fn largest_activation(&self, batch: usize, h: usize, w: usize) -> ActivationSize {
        let c = &self.config.block_out_channels;
        let n = c.len();
        let dtype = self.dtype.size();
        let mut largest = ActivationSize::new("nothing", &[0], 0);
        let (mut lh, mut lw) = (h, w);
        for l in 0..n {
            let skip = c[(l + 1).min(n - 1)].max(c[l.saturating_sub(1)]);
            let ch = c[l] + skip;
            largest = largest.max(ActivationSize::new(
                format!("a UNet up-block feature map ({batch}×{ch}×{lh}×{lw})"),
                &[batch, ch, lh, lw],
                4,
            ));
            let attention =
                self.config.down_cross[l] || self.config.up_cross[n - 1 - l] || l == n - 1;
            if attention {
                let tokens = lh * lw;
                largest = largest.max(ActivationSize::new(
                    format!(
                        "a UNet feed-forward projection ({batch}×{tokens}×{})",
                        8 * c[l]
                    ),
                    &[batch, tokens, 8 * c[l]],
                    dtype,
                ));
            }
            // A stride-2 convolution with padding 1 rounds up.
            (lh, lw) = (lh.div_ceil(2), lw.div_ceil(2));
        }
        largest
    }

    /// Loads from `unet/diffusion_pytorch_model.safetensors`.
    pub fn load(config: &UNetConfig, w: &Weights) -> Result<Self> {
        let c = config;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let common = BlockCommon {
            temb_channels: c.time_embed_dim(),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            cross_attention_dim: c.cross_attention_dim,
            use_linear_projection: c.use_linear_projection,
        };
        let cross = |i: usize, on: bool| {
            on.then_some(CrossAttn {
                heads: c.heads[i],
                depth: c.transformer_depth[i],
            })
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_in = boc[0];
        for i in 0..n {
            let w = w.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::load(
                &w,
                c_in,
                boc[i],
                c.layers_per_block[i],
                cross(i, c.down_cross[i]),
                i + 1 < n,
                &common,
            )?);
            c_in = boc[i];
        }
        let mid_block = MidBlock::load(
            &w.pp("mid_block"),
            boc[n - 1],
            cross(n - 1, true).unwrap_or(CrossAttn { heads: 1, depth: 1 }),
            &common,
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = boc[n - 1];
        for i in 0..n {
            let level = n - 1 - i; // the down level this up block mirrors
            let c_out = boc[level];
            let skip_in = boc[level.saturating_sub(1)];
            let w = w.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::load(
                &w,
                skip_in,
                prev_out,
                c_out,
                c.layers_per_block[level] + 1,
                cross(level, c.up_cross[i]),
                i + 1 < n,
                &common,
            )?);
            prev_out = c_out;
        }
        Ok(UNet2DConditionModel {
            conv_in: Conv2d::load(&w.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::load(
                &w.pp("time_embedding"),
                boc[0],
                c.time_embed_dim(),
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &w.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&w.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            config: config.clone(),
            dtype: w.dtype(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One denoiser call: `sample [b, in, h, w]` at `timestep`, conditioned on `context
    /// [b, 77, cross_attention_dim]`; the attention caches follow the gate's current modes.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timestep: f64,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        let b = sample.dims()[0];
        let device = sample.device();
        let sample = sample.cast(self.dtype);
        let context = &context.clone().cast(self.dtype);
        // 1. time
        let t = timestep_embedding(
            &vec![timestep; b],
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &device,
        )
        .cast(self.dtype);
        let temb = self.time_embedding.forward(t);
        // 2. pre-process
        let sample = if self.config.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let mut x = self.conv_in.forward(sample);
        // 3. down
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, context, cache, &mut skips);
        }
        // 4. mid
        x = self.mid_block.forward(x, &temb, context, cache);
        // 5. up
        for block in &self.up_blocks {
            let rest = skips.len().saturating_sub(block.num_layers());
            let upsample_to = rest.checked_sub(1).and_then(|k| skips.get(k)).map(|s| {
                let [_, _, h, w] = s.dims();
                [h, w]
            });
            x = block.forward(x, &temb, context, cache, &mut skips, upsample_to);
        }
        // 6. post-process
        self.conv_out
            .forward(Activation::Silu.forward(self.conv_norm_out.forward(x)))
            .cast(DType::F32)
    }
}
