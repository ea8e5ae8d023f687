//! The UNet's down, mid and up blocks (diffusers' `unet_2d_blocks`), with `Downsample2D` and
//! `Upsample2D`. Blocks with a `Transformer2DModel` after each resnet are the `CrossAttn*` kinds.

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;

use crate::error::Result;
use crate::nn::Conv2d;
use crate::resnet::{ResnetBlock2D, TimeInput};
use crate::tgate::AttentionCache;
use crate::transformer_2d::{Transformer2DConfig, Transformer2DModel};
use crate::weights::Weights;

/// Shared settings of every block.
#[derive(Clone, Copy, Debug)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

/// Transformer settings of a cross-attention block (`None` for plain blocks).
#[derive(Clone, Copy, Debug)]
pub struct CrossAttn {
    pub heads: usize,
    pub depth: usize,
}

fn load_transformers(
    w: &Weights,
    count: usize,
    channels: usize,
    cross: Option<CrossAttn>,
    common: &BlockCommon,
) -> Result<Vec<Transformer2DModel>> {
    let Some(cross) = cross else {
        return Ok(Vec::new());
    };
    (0..count)
        .map(|j| {
            Transformer2DModel::load(
                &w.pp("attentions").pp(j),
                Transformer2DConfig {
                    channels,
                    heads: cross.heads,
                    head_dim: channels / cross.heads.max(1),
                    depth: cross.depth,
                    cross_attention_dim: common.cross_attention_dim,
                    groups: common.groups,
                    use_linear_projection: common.use_linear_projection,
                },
            )
        })
        .collect()
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Clone, Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        layers: usize,
        cross: Option<CrossAttn>,
        add_downsample: bool,
        common: &BlockCommon,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                let c = if j == 0 { c_in } else { c_out };
                ResnetBlock2D::load(
                    &w.pp("resnets").pp(j),
                    c,
                    c_out,
                    Some(common.temb_channels),
                    common.groups,
                    common.eps,
                )
            })
            .collect::<Result<_>>()?;
        Ok(DownBlock {
            resnets,
            attentions: load_transformers(w, layers, c_out, cross, common)?,
            downsampler: if add_downsample {
                Some(Conv2d::load(
                    &w.pp("downsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    2,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    /// Returns the output and pushes every intermediate state onto `skips`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        self.forward_layers(x, temb, context, cache, skips, self.num_layers(), true)
    }

    /// The first `layers` (resnet, transformer) layers and, when `downsample`, the downsampler
    /// (DeepCache's shallow branch stops inside a block).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_layers(
        &self,
        mut x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
        layers: usize,
        downsample: bool,
    ) -> Tensor<4> {
        for (j, resnet) in self.resnets.iter().enumerate().take(layers) {
            x = resnet.forward(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context, cache);
            }
            skips.push(x.clone());
        }
        if let (Some(down), true) = (&self.downsampler, downsample) {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// The block's ResNet blocks (for the UNet to join their time projections).
    pub(crate) fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }

    /// Transformer blocks (one self- and one cross-attention each) in layers `from..`.
    pub fn attention_blocks_from(&self, from: usize) -> usize {
        self.attentions.iter().skip(from).map(|a| a.depth()).sum()
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
#[derive(Clone, Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(
        w: &Weights,
        channels: usize,
        cross: CrossAttn,
        common: &BlockCommon,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|j| {
                ResnetBlock2D::load(
                    &w.pp("resnets").pp(j),
                    channels,
                    channels,
                    Some(common.temb_channels),
                    common.groups,
                    common.eps,
                )
            })
            .collect::<Result<_>>()?;
        Ok(MidBlock {
            resnets,
            attentions: load_transformers(w, 1, channels, Some(cross), common)?,
        })
    }

    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(x, context, cache);
            x = resnet.forward(x, Some(temb));
        }
        x
    }

    /// Transformer blocks (one self- and one cross-attention each).
    pub fn attention_blocks(&self) -> usize {
        self.attentions.iter().map(|a| a.depth()).sum()
    }

    /// The block's ResNet blocks (for the UNet to join their time projections).
    pub(crate) fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Clone, Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `prev_out`: channels coming from below; `skip_in`: channels of the deepest skip this
    /// block consumes last (the input channels of the matching down block).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        skip_in: usize,
        prev_out: usize,
        c_out: usize,
        layers: usize,
        cross: Option<CrossAttn>,
        add_upsample: bool,
        common: &BlockCommon,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j == layers - 1 { skip_in } else { c_out };
                let c = if j == 0 { prev_out } else { c_out };
                ResnetBlock2D::load(
                    &w.pp("resnets").pp(j),
                    c + skip,
                    c_out,
                    Some(common.temb_channels),
                    common.groups,
                    common.eps,
                )
            })
            .collect::<Result<_>>()?;
        Ok(UpBlock {
            resnets,
            attentions: load_transformers(w, layers, c_out, cross, common)?,
            upsampler: if add_upsample {
                Some(Conv2d::load(
                    &w.pp("upsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// The block's ResNet blocks (for the UNet to join their time projections).
    pub(crate) fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }

    /// Consumes skips from the end of `skips`; `upsample_to` is the size of the next level.
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
        upsample_to: Option<[usize; 2]>,
    ) -> Tensor<4> {
        let x = self.forward_layers(x, temb, context, cache, skips, 0..self.num_layers());
        self.upsample(x, upsample_to)
    }

    /// The (resnet, transformer) layers `layers` (DeepCache enters a block part-way), each
    /// consuming one skip from the end of `skips`.
    pub fn forward_layers(
        &self,
        mut x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
        layers: std::ops::Range<usize>,
    ) -> Tensor<4> {
        for j in layers {
            let Some(resnet) = self.resnets.get(j) else {
                break;
            };
            if let Some(skip) = skips.pop() {
                x = Tensor::cat(vec![x, skip], 1);
            }
            x = resnet.forward(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context, cache);
            }
        }
        x
    }

    /// The upsampler, if the block has one; `upsample_to` is the size of the next level.
    pub fn upsample(&self, x: Tensor<4>, upsample_to: Option<[usize; 2]>) -> Tensor<4> {
        match &self.upsampler {
            Some(up) => {
                let [_, _, h, w] = x.dims();
                let size = upsample_to.unwrap_or([h * 2, w * 2]);
                up.forward(upsample_nearest(x, size))
            }
            None => x,
        }
    }

    /// Transformer blocks (one self- and one cross-attention each) in layers `..to`.
    pub fn attention_blocks_before(&self, to: usize) -> usize {
        self.attentions.iter().take(to).map(|a| a.depth()).sum()
    }
}

/// PyTorch `F.interpolate(mode="nearest")` to `size`.
pub fn upsample_nearest(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
    )
}
