//! diffusers' `ResnetBlock2D` (with a time embedding, as the UNet uses it, or without, as the VAE).

use burn::tensor::Tensor;

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::Weights;

/// The time conditioning a UNet call hands its ResNet blocks.
#[derive(Clone, Debug)]
pub enum TimeInput {
    /// silu(time embedding), `[rows, temb_channels]`: each block projects it itself.
    Activated(Tensor<2>),
    /// For blocks whose projections the UNet joined (`ResnetBlock2D::take_time_projection`):
    /// `conv1.bias + time_emb_proj(silu(time embedding))` of every block side by side,
    /// `[rows, Σ c_out]`, from one matmul (per generation in a pipeline's time table, per call
    /// otherwise).
    Joined(Tensor<2>),
}

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    /// `(offset, width)` of this block in [`TimeInput::Joined`], once the UNet took its
    /// projection and conv1's bias.
    joined_at: Option<(usize, usize)>,
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
            joined_at: None,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::load(&w.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// The block's own time projection (until the UNet takes it).
    pub(crate) fn time_projection(&self) -> Option<&Linear> {
        self.time_emb_proj.as_ref()
    }

    /// Hands over this block's time projection with conv1's bias folded into its bias, for the
    /// UNet to join with the others (see [`TimeInput::Joined`]); from then on the block reads
    /// its share at `offset` of the joined input. `None` for a block without a time projection.
    pub(crate) fn take_time_projection(&mut self, offset: usize) -> Option<Linear> {
        let proj = self.time_emb_proj.take()?;
        let width = proj.out_features();
        self.joined_at = Some((offset, width));
        Some(proj.with_added_bias(self.conv1.take_bias()))
    }

    /// `x: [b, c_in, h, w]` and the UNet's time conditioning (`rows` 1, shared by the whole
    /// batch, or `b`) -> `[b, c_out, h, w]`.
    ///
    /// # Panics
    /// When a block whose projection its UNet took (`take_time_projection`) is given no
    /// [`TimeInput::Joined`]: only its UNet calls it, and always with one.
    pub fn forward(&self, x: Tensor<4>, time: Option<&TimeInput>) -> Tensor<4> {
        let x_act = self.norm1.forward_silu(x.clone());
        let h = match (time, self.joined_at, &self.time_emb_proj) {
            (Some(TimeInput::Joined(all)), Some((offset, width)), _) => {
                let mine = all.clone().narrow(1, offset, width);
                match mine.dims() {
                    // One row for the whole batch: conv1's bias plus the time term, in the
                    // convolution itself.
                    [1, c] => self.conv1.forward_with_bias(x_act, Some(mine.reshape([c]))),
                    [rows, c] => {
                        self.conv1.forward_with_bias(x_act, None) + mine.reshape([rows, c, 1, 1])
                    }
                }
            }
            (_, Some(_), _) => panic!(
                "a ResNet block joined into its UNet's time projection was called without it"
            ),
            (Some(TimeInput::Activated(temb_act)), None, Some(proj)) => {
                let t = proj.forward(temb_act.clone());
                let [rows, c] = t.dims();
                self.conv1.forward(x_act) + t.reshape([rows, c, 1, 1])
            }
            _ => self.conv1.forward(x_act),
        };
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}
