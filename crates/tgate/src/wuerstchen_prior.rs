//! Würstchen Stage C, diffusers' `WuerstchenPrior` (`prior/` or `prior_prior/` of a model folder):
//! text embeddings → the 16-channel image embedding that Stage B decodes.

use burn::tensor::{activation, DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{ActivationSize, Conv2d, Linear};
use crate::tgate::AttentionCache;
use crate::weights::Weights;
use crate::wuerstchen_common::{
    check_c_r, AttnBlock, ChannelNorm, RTable, ResBlock, TimestepBlock,
};

/// `WuerstchenPrior`'s `config.json` (defaults as diffusers' constructor).
#[derive(Debug, Clone, Deserialize)]
pub struct PriorConfig {
    #[serde(default = "d16")]
    pub c_in: usize,
    #[serde(default = "d1280")]
    pub c: usize,
    #[serde(default = "d1024")]
    pub c_cond: usize,
    #[serde(default = "d64")]
    pub c_r: usize,
    #[serde(default = "d16")]
    pub depth: usize,
    #[serde(default = "d16")]
    pub nhead: usize,
}

fn d16() -> usize {
    16
}
fn d64() -> usize {
    64
}
fn d1024() -> usize {
    1024
}
fn d1280() -> usize {
    1280
}

impl PriorConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: PriorConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        check_c_r(file, cfg.c_r)?;
        if cfg.nhead == 0 || cfg.c % cfg.nhead != 0 {
            return Err(Error::config(
                file,
                format!("c {} is not divisible by nhead {}", cfg.c, cfg.nhead),
            ));
        }
        if cfg.c_in == 0 || cfg.depth == 0 {
            return Err(Error::config(file, "c_in and depth must be positive"));
        }
        Ok(cfg)
    }
}

#[derive(Clone, Debug)]
struct Layer {
    res: ResBlock,
    time: TimestepBlock,
    attn: AttnBlock,
}

/// Stage C.
#[derive(Clone, Debug)]
pub struct WuerstchenPrior {
    config: PriorConfig,
    projection: Conv2d,
    cond_in: Linear,
    cond_out: Linear,
    layers: Vec<Layer>,
    out_norm: ChannelNorm,
    out: Conv2d,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
    /// The largest tensor the device takes (the weights' cap), if known.
    max_tensor_bytes: Option<u64>,
}

impl WuerstchenPrior {
    pub fn load(config: &PriorConfig, w: &Weights) -> Result<Self> {
        let c = config.c;
        let layers = (0..config.depth)
            .map(|i| {
                let block = |k: usize| w.pp("blocks").pp(3 * i + k);
                Ok(Layer {
                    res: ResBlock::load(&block(0), c, 0, 3)?,
                    time: TimestepBlock::load(&block(1), c, config.c_r)?,
                    attn: AttnBlock::load(&block(2), c, c, config.nhead)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WuerstchenPrior {
            projection: Conv2d::load(&w.pp("projection"), config.c_in, c, 1, 1, 0)?,
            cond_in: Linear::load(&w.pp("cond_mapper").pp("0"), config.c_cond, c, true)?,
            cond_out: Linear::load(&w.pp("cond_mapper").pp("2"), c, c, true)?,
            layers,
            out_norm: ChannelNorm::load(w, c),
            out: Conv2d::load(&w.pp("out").pp("1"), c, 2 * config.c_in, 1, 1, 0)?,
            config: config.clone(),
            dtype: w.dtype(),
            max_tensor_bytes: w.max_tensor_bytes(),
        })
    }

    /// The largest activation of a forward pass on `[batch, c_in, h, w]` latents (attention
    /// scores excepted): a residual block's channel MLP hidden layer, in f32 (response norm).
    pub fn largest_activation(&self, batch: usize, h: usize, w: usize) -> ActivationSize {
        let c4 = 4 * self.config.c;
        ActivationSize::new(
            format!("a Stage C channel MLP activation ({batch}×{h}×{w}×{c4})"),
            &[batch, h, w, c4],
            4,
        )
    }

    pub fn config(&self) -> &PriorConfig {
        &self.config
    }

    /// The dtype of the parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `cond_mapper`: text embeddings `[b, n, c_cond]` → `[b, n, c]`, the same at every step, so
    /// the pipeline maps them once per generation.
    pub fn map_text(&self, text: Tensor<3>) -> Tensor<3> {
        self.cond_out.forward(activation::leaky_relu(
            self.cond_in.forward(text.cast(self.dtype)),
            0.2,
        ))
    }

    /// Every timestep block's scale and shift for each ratio of `r` (see [`RTable`]): one row
    /// per ratio, on the device.
    pub fn r_table(&self, r: &[f32]) -> RTable {
        let device = self.projection.device();
        let blocks = self.layers.iter().map(|l| &l.time);
        RTable::new(blocks, r, self.config.c_r, self.dtype, &device)
    }

    /// The largest tensor the device takes, as given to the weights
    /// ([`Weights::with_max_tensor_bytes`]); `None`: no cap given.
    pub fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }

    /// The bytes of an [`RTable`] of `rows` ratios.
    pub fn r_table_bytes(&self, rows: usize) -> u64 {
        let channels = self.layers.iter().map(|l| l.time.channels());
        RTable::bytes(channels, rows, self.dtype)
    }

    /// `x: [b, c_in, h, w]`, one noise ratio per batch row, mapped text `[b, n, c]` (see
    /// [`Self::map_text`]) → the model's estimate `[b, c_in, h, w]`. `cache` carries the gate
    /// (see [`AttnBlock`]) and each block's text keys and values, so it belongs to one
    /// generation: a new text needs a new cache.
    pub fn forward(
        &self,
        x: Tensor<4>,
        r: &[f32],
        mapped_text: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        self.forward_table(x, &self.r_table(r), mapped_text, cache)
    }

    /// [`Self::forward`] with the noise ratios' modulation made beforehand: `table` has one
    /// row per batch row of `x`, or one row for all of them (a row of a generation's table).
    pub fn forward_table(
        &self,
        x: Tensor<4>,
        table: &RTable,
        mapped_text: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        let x_in = x.clone().cast(DType::F32);
        let mut x = self.projection.forward(x.cast(self.dtype));
        for (k, layer) in self.layers.iter().enumerate() {
            x = layer.res.forward(x, None);
            x = table.block(k).apply(x);
            x = layer.attn.forward(x, mapped_text, cache);
        }
        let ab = self.out.forward(self.out_norm.forward(x)).cast(DType::F32);
        let c_in = self.config.c_in;
        let a = ab.clone().narrow(1, 0, c_in);
        let b = ab.narrow(1, c_in, c_in);
        (x_in - a) / b.neg().add_scalar(1.0).abs().add_scalar(1e-5)
    }
}
