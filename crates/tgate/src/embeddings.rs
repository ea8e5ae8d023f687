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

/// diffusers' `TimestepEmbedding`: linear → SiLU → linear.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(&w.pp("linear_1"), d_in, d_out, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), d_out, d_out, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2
            .forward(Activation::Silu.forward(self.linear_1.forward(x)))
    }
}
