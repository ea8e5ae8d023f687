//! Würstchen Stage A, the decode path of diffusers' `PaellaVQModel` (`vqgan/` of a model folder):
//! Stage B's 4-channel latent → RGB. As the pipeline uses it: no quantisation
//! (`force_not_quantize=True`), so the codebook and the encoder are not loaded.

use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{
    norm_over, pixel_shuffle, replication_pad1, Activation, ActivationSize, Conv2d,
    ConvTranspose2d, Linear,
};
use crate::weights::Weights;

/// `PaellaVQModel`'s `config.json` (defaults as diffusers' constructor).
#[derive(Debug, Clone, Deserialize)]
pub struct PaellaConfig {
    #[serde(default = "d3")]
    pub out_channels: usize,
    #[serde(default = "d2")]
    pub up_down_scale_factor: usize,
    #[serde(default = "d2")]
    pub levels: usize,
    #[serde(default = "d12")]
    pub bottleneck_blocks: usize,
    #[serde(default = "d384")]
    pub embed_dim: usize,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "default_scale")]
    pub scale_factor: f64,
}

fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d12() -> usize {
    12
}
fn d384() -> usize {
    384
}
fn default_scale() -> f64 {
    0.3764
}

impl PaellaConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: PaellaConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        crate::vae::check_rgb(file, cfg.out_channels)?;
        if !(1..=8).contains(&cfg.levels) || !(1..=16).contains(&cfg.up_down_scale_factor) {
            return Err(Error::config(
                file,
                "levels must be in 1..=8 and up_down_scale_factor in 1..=16",
            ));
        }
        if cfg.embed_dim >> (cfg.levels - 1) == 0 {
            return Err(Error::config(
                file,
                format!(
                    "embed_dim {} is too small for {} levels",
                    cfg.embed_dim, cfg.levels
                ),
            ));
        }
        Ok(cfg)
    }

    /// Channels per level, shallowest first (`embed_dim / 2^(levels - 1 - i)`).
    fn c_levels(&self) -> Vec<usize> {
        (0..self.levels)
            .rev()
            .map(|i| self.embed_dim >> i)
            .collect()
    }
}

/// `MixingResidualBlock`: modulated norm → replicate-padded depthwise conv, then modulated norm →
/// channel MLP, each added back scaled by a learned gain (`gammas`, read as host scalars).
#[derive(Clone, Debug)]
struct MixingResidualBlock {
    gammas: [f32; 6],
    depthwise: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl MixingResidualBlock {
    fn load(w: &Weights, c: usize, embed: usize) -> Result<Self> {
        let g = w.get_host("gammas", &[6])?;
        Ok(MixingResidualBlock {
            gammas: [g[0], g[1], g[2], g[3], g[4], g[5]],
            depthwise: Conv2d::load_grouped(&w.pp("depthwise").pp(1), c, c, 3, 1, 0, c)?,
            fc1: Linear::load(&w.pp("channelwise").pp(0), c, embed, true)?,
            fc2: Linear::load(&w.pp("channelwise").pp(2), embed, c, true)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let g = self.gammas;
        let t = norm_over(x.clone(), 1, 1e-6)
            .mul_scalar(1.0 + g[0])
            .add_scalar(g[1]);
        let x = x + self.depthwise.forward(replication_pad1(t)).mul_scalar(g[2]);
        let t = norm_over(x.clone(), 1, 1e-6)
            .mul_scalar(1.0 + g[3])
            .add_scalar(g[4]);
        let t = t.permute([0, 2, 3, 1]);
        let t = self
            .fc2
            .forward(Activation::Gelu.forward(self.fc1.forward(t)));
        x + t.permute([0, 3, 1, 2]).mul_scalar(g[5])
    }
}

#[derive(Clone, Debug)]
enum UpBlock {
    Mix(MixingResidualBlock),
    Up(ConvTranspose2d),
}

/// Stage A's decoder.
#[derive(Clone, Debug)]
pub struct PaellaDecoder {
    config: PaellaConfig,
    in_conv: Conv2d,
    blocks: Vec<UpBlock>,
    out_conv: Conv2d,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
}

impl PaellaDecoder {
    pub fn load(config: &PaellaConfig, w: &Weights) -> Result<Self> {
        let c = config.c_levels();
        let levels = config.levels;
        let up = w.pp("up_blocks");
        let in_conv = Conv2d::load(
            &up.pp(0).pp(0),
            config.latent_channels,
            c[levels - 1],
            1,
            1,
            0,
        )?;
        let mut blocks = Vec::new();
        for i in 0..levels {
            let ci = c[levels - 1 - i];
            let repeats = if i == 0 { config.bottleneck_blocks } else { 1 };
            for _ in 0..repeats {
                let key = up.pp(blocks.len() + 1);
                blocks.push(UpBlock::Mix(MixingResidualBlock::load(&key, ci, ci * 4)?));
            }
            if i + 1 < levels {
                let key = up.pp(blocks.len() + 1);
                let conv = ConvTranspose2d::load(&key, ci, c[levels - 2 - i], 4, 2, 1)?;
                blocks.push(UpBlock::Up(conv));
            }
        }
        let s = config.up_down_scale_factor;
        let out_conv = Conv2d::load(
            &w.pp("out_block").pp(0),
            c[0],
            config.out_channels * s * s,
            1,
            1,
            0,
        )?;
        Ok(PaellaDecoder {
            config: config.clone(),
            in_conv,
            blocks,
            out_conv,
            dtype: w.dtype(),
        })
    }

    pub fn config(&self) -> &PaellaConfig {
        &self.config
    }

    /// The largest activation of decoding one `[1, c, h, w]` latent: at each level's
    /// resolution, the channel MLP's hidden layer (`4 × channels`, activation dtype) or the f32
    /// channel-norm input.
    pub fn largest_activation(&self, h: usize, w: usize) -> ActivationSize {
        let c = self.config.c_levels();
        let levels = self.config.levels;
        let mut largest = ActivationSize::new("nothing", &[0], 0);
        for i in 0..levels {
            let ci = c[levels - 1 - i];
            let (fh, fw) = (h << i, w << i);
            largest = largest
                .max(ActivationSize::new(
                    format!("a Stage A channel MLP activation (1×{fh}×{fw}×{})", 4 * ci),
                    &[fh, fw, 4 * ci],
                    self.dtype.size(),
                ))
                .max(ActivationSize::new(
                    format!("a Stage A feature map (1×{ci}×{fh}×{fw})"),
                    &[ci, fh, fw],
                    4,
                ));
        }
        largest
    }

    /// `PaellaVQModel.decode(h, force_not_quantize=True)`: `[b, latent, h, w]` →
    /// `[b, out, h · 2^(levels-1) · s, …]`, not clamped.
    pub fn decode(&self, h: Tensor<4>) -> Tensor<4> {
        let mut x = self.in_conv.forward(h.cast(self.dtype));
        for block in &self.blocks {
            x = match block {
                UpBlock::Mix(m) => m.forward(x),
                UpBlock::Up(conv) => conv.forward(x),
            };
        }
        pixel_shuffle(self.out_conv.forward(x), self.config.up_down_scale_factor).cast(DType::F32)
    }
}
