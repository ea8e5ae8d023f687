//! diffusers' `ResnetBlock2D` (with a time embedding, as the UNet uses it, or without, as the VAE).

use burn::tensor::Tensor;

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::Weights;

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// `temb_channels = None` for blocks without a time embedding (the VAE's).
    pub fn load(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, c_in, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: temb_channels
                .map(|t| Linear::load(&w.pp("time_emb_proj"), t, c_out, true))
                .transpose()?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::load(&w.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `x: [b, c_in, h, w]`, `temb_act: [b, temb_channels]` = silu(time embedding), which every
    /// block of a UNet shares (the UNet activates it once per forward) -> `[b, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb_act: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        if let (Some(proj), Some(temb_act)) = (&self.time_emb_proj, temb_act) {
            let t = proj.forward(temb_act.clone());
            let [b, c] = t.dims();
            h = h + t.reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}
