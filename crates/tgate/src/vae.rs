//! The decoder half of diffusers' `AutoencoderKL` (`vae/`), with `post_quant_conv`.
//! Both attention key namings of real checkpoints load (`to_q`… and the older `query`…).

use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use crate::attention::{Attention, AttentionKeys};
use crate::error::{Error, Result};
use crate::nn::{ActivationSize, Conv2d, GroupNorm};
use crate::resnet::ResnetBlock2D;
use crate::unet_2d_blocks::upsample_nearest;
use crate::weights::Weights;

/// The keys of `vae/config.json` the decoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn silu() -> String {
    "silu".into()
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// Refuses an image decoder whose output is not RGB (`out_channels` ≠ 3): the pipelines shape
/// its output into RGB pixels (SD's VAE and Würstchen's Stage A alike).
pub fn check_rgb(file: &str, out_channels: usize) -> Result<()> {
    if out_channels == 3 {
        return Ok(());
    }
    Err(Error::config(
        file,
        format!("out_channels {out_channels}: the pipeline makes RGB images and needs a 3-channel decoder"),
    ))
}

impl VaeConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: VaeConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        if cfg.block_out_channels.is_empty() {
            return Err(Error::config(file, "`block_out_channels` is empty"));
        }
        if cfg.block_out_channels.len() != 4 {
            return Err(Error::config(
                file,
                format!(
                    "{} levels: the pipeline assumes 4 (an 8x latent scale, as every SD 1.x/2.x VAE)",
                    cfg.block_out_channels.len()
                ),
            ));
        }
        check_rgb(file, cfg.out_channels)?;
        if cfg.act_fn != "silu" {
            return Err(Error::config(
                file,
                format!("unsupported act_fn `{}`", cfg.act_fn),
            ));
        }
        let g = cfg.norm_num_groups;
        if g == 0 || cfg.block_out_channels.iter().any(|c| c % g != 0) {
            return Err(Error::config(
                file,
                "`block_out_channels` do not split into `norm_num_groups` groups",
            ));
        }
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(Error::config(
                file,
                format!("unsupported up block type `{t}`"),
            ));
        }
        Ok(cfg)
    }
}

/// VAE attention: group norm, single-head self-attention over pixels, residual.
#[derive(Clone, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn load(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        let keys = if w.contains("to_q.weight") || !w.contains("query.weight") {
            AttentionKeys::CURRENT
        } else {
            AttentionKeys::LEGACY
        };
        Ok(SpatialAttention {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, channels, 1e-6)?,
            attn: Attention::load_self(w, channels, 1, channels, true, keys)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let out = self.attn.forward(tokens, None);
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `AutoencoderKL`'s decoder.
#[derive(Clone, Debug)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<SpatialAttention>,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
}

impl VaeDecoder {
    /// Loads from the root of `vae/diffusion_pytorch_model.safetensors` (the encoder is ignored).
    pub fn load(config: &VaeConfig, root: &Weights) -> Result<Self> {
        let (g, eps) = (config.norm_num_groups, 1e-6);
        let boc = &config.block_out_channels;
        let top = *boc.last().unwrap_or(&0);
        let w = root.pp("decoder");
        let mid = w.pp("mid_block");
        let resnet = |w: &Weights, a, b| ResnetBlock2D::load(w, a, b, None, g, eps);
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &c_out) in boc.iter().rev().enumerate() {
            let bw = w.pp("up_blocks").pp(i);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    resnet(
                        &bw.pp("resnets").pp(j),
                        if j == 0 { prev } else { c_out },
                        c_out,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < boc.len() {
                Some(Conv2d::load(
                    &bw.pp("upsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push((resnets, up));
            prev = c_out;
        }
        let lat = config.latent_channels;
        Ok(VaeDecoder {
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(
                    &root.pp("post_quant_conv"),
                    lat,
                    lat,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            conv_in: Conv2d::load(&w.pp("conv_in"), lat, top, 3, 1, 1)?,
            mid_resnets: [
                resnet(&mid.pp("resnets.0"), top, top)?,
                resnet(&mid.pp("resnets.1"), top, top)?,
            ],
            mid_attention: if config.mid_block_add_attention {
                Some(SpatialAttention::load(&mid.pp("attentions.0"), top, g)?)
            } else {
                None
            },
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), g, boc[0], eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), boc[0], config.out_channels, 3, 1, 1)?,
            config: config.clone(),
            dtype: root.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The largest activation of decoding one `[1, c, h, w]` latent (the mid attention's
    /// scores excepted): a feature map at the resolution of up block `j`, with that block's
    /// channels or the channels coming up from the block before, in the bytes its group norms
    /// hold it in (the decoder's dtype with tgate's norm kernel, f32 with burn's ops).
    pub fn largest_activation(&self, h: usize, w: usize) -> ActivationSize {
        let rev: Vec<usize> = self
            .config
            .block_out_channels
            .iter()
            .rev()
            .copied()
            .collect();
        let mut largest = ActivationSize::new("nothing", &[0], 0);
        let bytes = self.conv_norm_out.map_bytes(self.dtype);
        for j in 0..rev.len() {
            let ch = rev[j].max(rev[j.saturating_sub(1)]);
            let (fh, fw) = (h << j, w << j);
            largest = largest.max(ActivationSize::new(
                format!("a VAE decoder feature map (1×{ch}×{fh}×{fw})"),
                &[ch, fh, fw],
                bytes,
            ));
        }
        largest
    }

    /// Decodes unscaled latents `z = latents / scaling_factor (+ shift)` `[b, 4, h, w]` to an
    /// image `[b, 3, 8h, 8w]` in about `[-1, 1]`.
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let z = z.cast(self.dtype);
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        let mut x = self.conv_in.forward(z);
        x = self.mid_resnets[0].forward(x, None);
        if let Some(attn) = &self.mid_attention {
            x = attn.forward(x);
        }
        x = self.mid_resnets[1].forward(x, None);
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                x = r.forward(x, None);
            }
            if let Some(conv) = up {
                let [_, _, h, w] = x.dims();
                x = conv.forward(upsample_nearest(x, [h * 2, w * 2]));
            }
        }
        self.conv_out
            .forward(self.conv_norm_out.forward_silu(x))
            .cast(DType::F32)
    }

    /// The Stable Diffusion pipeline's hand-over: `latents / scaling_factor`, then decode
    /// (diffusers' SD pipeline does not apply `shift_factor`).
    pub fn decode_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        self.decode(latents.div_scalar(self.config.scaling_factor))
    }
}
