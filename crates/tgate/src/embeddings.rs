//! Sinusoidal timestep embeddings, as diffusers' `get_timestep_embedding` / `TimestepEmbedding`.

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::Result;
use crate::nn::{Activation, Linear};
use crate::weights::Weights;

/// diffusers' `Timesteps` projection: `[b] -> [b, dim]`, computed on the host in f32 as torch does.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Tensor<2> {
    let half = dim / 2;
    let denom = half as f32 - downscale_freq_shift as f32;
    let ln_period = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-ln_period * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (sin, cos) = (args.iter().map(|a| a.sin()), args.iter().map(|a| a.cos()));
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(data, [timesteps.len(), dim]), device)
}

/// The guidance-scale embedding of latent-consistency models (diffusers'
/// `get_guidance_scale_embedding`): the sinusoidal embedding of `w · 1000`, sines then cosines,
/// frequencies `exp(−j · ln 10000 / (dim/2 − 1))`, zero-padded to an odd `dim`; `[b, dim]`,
/// computed on the host in f32 as torch does. The pipelines pass `w = guidance_scale − 1`.
pub fn guidance_scale_embedding(w: &[f64], dim: usize, device: &Device) -> Tensor<2> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|j| (j as f32 * -step).exp()).collect();
    let mut data = Vec::with_capacity(w.len() * dim);
    for &w in w {
        let w = w as f32 * 1000.0;
        let args: Vec<f32> = freqs.iter().map(|f| w * f).collect();
        data.extend(args.iter().map(|a| a.sin()));
        data.extend(args.iter().map(|a| a.cos()));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(data, [w.len(), dim]), device)
}

/// diffusers' `TimestepEmbedding`: linear → SiLU → linear, with the optional `cond_proj` (no
/// bias) whose projection of a condition is added to the input first (latent-consistency
/// models' guidance embedding).
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    cond_proj: Option<Linear>,
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, d_in: usize, d_out: usize, cond_dim: Option<usize>) -> Result<Self> {
        Ok(TimestepEmbedding {
            cond_proj: cond_dim
                .map(|c| Linear::load(&w.pp("cond_proj"), c, d_in, false))
                .transpose()?,
            linear_1: Linear::load(&w.pp("linear_1"), d_in, d_out, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), d_out, d_out, true)?,
        })
    }

    /// `condition` is used only when the embedding has a `cond_proj` (as in diffusers).
    pub fn forward(&self, x: Tensor<2>, condition: Option<Tensor<2>>) -> Tensor<2> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => x + proj.forward(c),
            _ => x,
        };
        self.linear_2
            .forward(Activation::Silu.forward(self.linear_1.forward(x)))
    }
}
