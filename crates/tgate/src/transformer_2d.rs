//! diffusers' `Transformer2DModel` for continuous inputs (the UNet's spatial transformer).

use burn::tensor::Tensor;

use crate::attention::BasicTransformerBlock;
use crate::error::Result;
use crate::nn::{channels_last_weights, Conv2d, GroupNorm, Linear};
use crate::tgate::AttentionCache;
use crate::weights::Weights;

/// `proj_in` / `proj_out` are 1×1 convolutions (SD 1.x) or linear layers (SD 2.x).
#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    /// Whether the maps it receives are channels last (GPU devices running tgate's kernels):
    /// tokens are then taken as a view of the channels-last memory.
    channels_last: bool,
}

/// Shape parameters of one spatial transformer.
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    /// Transformer blocks (each one self-attention and one cross-attention).
    pub fn depth(&self) -> usize {
        self.transformer_blocks.len()
    }

    pub fn load(w: &Weights, cfg: Transformer2DConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let proj = |name: &str, a: usize, b: usize| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(Linear::load(&w.pp(name), a, b, true)?)
            } else {
                Projection::Conv(Conv2d::load(&w.pp(name), a, b, 1, 1, 0)?)
            })
        };
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&w.pp("norm"), cfg.groups, cfg.channels, 1e-6)?,
            proj_in: proj("proj_in", cfg.channels, inner)?,
            transformer_blocks: (0..cfg.depth)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &w.pp("transformer_blocks").pp(i),
                        inner,
                        cfg.heads,
                        cfg.head_dim,
                        cfg.cross_attention_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out", inner, cfg.channels)?,
            channels_last: channels_last_weights(w),
        })
    }

    /// `[b, c, h, w] -> [b, c, h, w]`
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = self.norm.forward(x.clone());
        // Tokens as a view of the map's memory: a channels-last map (what the convolutions and
        // tgate's norms leave on GPU devices) is permuted before the reshape (reshaping its
        // `[b, c, h, w]` view would copy it), a contiguous one reshaped, then transposed.
        let channels_last = self.channels_last;
        let to_tokens = |t: Tensor<4>| {
            let ch = t.dims()[1];
            if channels_last {
                t.permute([0, 2, 3, 1]).reshape([b, h * w, ch])
            } else {
                t.reshape([b, ch, h * w]).swap_dims(1, 2)
            }
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(normed)),
            Projection::Linear(lin) => lin.forward(to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context, cache);
        }
        // And back: a channels-last view of the tokens.
        let to_image = |t: Tensor<3>| {
            let ch = t.dims()[2];
            if channels_last {
                t.reshape([b, h, w, ch]).permute([0, 3, 1, 2])
            } else {
                t.swap_dims(1, 2).reshape([b, ch, h, w])
            }
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_image(tokens)),
            Projection::Linear(lin) => to_image(lin.forward(tokens)),
        };
        debug_assert_eq!(out.dims()[1], c);
        out + x
    }
}
