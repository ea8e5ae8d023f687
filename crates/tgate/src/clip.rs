//! CLIP text encoder, as transformers' `CLIPTextModel` (`text_encoder/` of a diffusers folder).
//!
//! Works for any size from its `config.json`: ViT-L/14 (quick_gelu, SD 1.x), OpenCLIP ViT-H
//! (gelu, SD 2.x), ViT-bigG. Causal self-attention, an optional padding mask, and clip skip.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{multi_head_attention, Activation, Embedding, LayerNorm, Linear};
use crate::weights::Weights;

/// The keys of transformers' `CLIPTextConfig` that change the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Pipelines pass the tokenizer's padding mask when set (diffusers' `use_attention_mask`).
    #[serde(default)]
    pub use_attention_mask: bool,
}

fn default_max_positions() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: ClipTextConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::config(
                file,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        if Activation::parse(&cfg.hidden_act).is_none() {
            return Err(Error::config(
                file,
                format!("unsupported hidden_act `{}`", cfg.hidden_act),
            ));
        }
        Ok(cfg)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(cfg: &ClipTextConfig, w: &Weights) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attn = w.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), h, eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), h, eps)?,
            fc1: Linear::load(&w.pp("mlp").pp("fc1"), h, i, true)?,
            fc2: Linear::load(&w.pp("mlp").pp("fc2"), i, h, true)?,
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        heads: usize,
        mask: &Option<Tensor<4, Bool>>,
        act: Activation,
    ) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let (q, k, v) = (
            self.q_proj.forward(h.clone()),
            self.k_proj.forward(h.clone()),
            self.v_proj.forward(h),
        );
        // With a padding mask the causal part is folded into it; without one the kernel's causal mode is used.
        let attn = multi_head_attention(q, k, v, heads, mask.clone(), mask.is_none(), None);
        let x = x + self.out_proj.forward(attn);
        let h = self
            .fc2
            .forward(act.forward(self.fc1.forward(self.layer_norm2.forward(x.clone()))));
        x + h
    }
}

/// transformers' `CLIPTextModel` (the text transformer without the projection).
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    act: Activation,
}

impl ClipTextModel {
    /// Loads from the root of `text_encoder/model.safetensors`: keys `text_model.*` as in every
    /// released checkpoint, or without that prefix as transformers 5 writes them.
    pub fn load(config: &ClipTextConfig, root: &Weights) -> Result<Self> {
        let w = if root.contains("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else {
            root.clone()
        };
        let emb = w.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(config, &w.pp("encoder").pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextModel {
            token_embedding: Embedding::load(
                &emb.pp("token_embedding"),
                config.vocab_size,
                config.hidden_size,
            )?,
            position_embedding: Embedding::load(
                &emb.pp("position_embedding"),
                config.max_position_embeddings,
                config.hidden_size,
            )?,
            layers,
            final_layer_norm: LayerNorm::load(
                &w.pp("final_layer_norm"),
                config.hidden_size,
                config.layer_norm_eps,
            )?,
            act: Activation::parse(&config.hidden_act).unwrap_or(Activation::QuickGelu),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encodes token ids `[b][n]` to `[b, n, hidden]` (f32, whatever the parameter dtype).
    ///
    /// `attention_mask` (1 = token, 0 = padding) masks padded keys as transformers does.
    /// `clip_skip = k` returns the output of layer `L - k` passed through the final layer norm,
    /// which is what diffusers' `encode_prompt(clip_skip=k)` uses; 0 is the last hidden state.
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<u32>]>,
        clip_skip: usize,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let b = ids.len();
        let n = ids.first().map(|r| r.len()).unwrap_or(0);
        if b == 0 || n == 0 || ids.iter().any(|r| r.len() != n) {
            return Err(Error::input(
                "input_ids",
                "expected a non-empty batch of equal-length rows",
            ));
        }
        if n > self.config.max_position_embeddings {
            return Err(Error::input(
                "input_ids",
                format!(
                    "{n} tokens exceed max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::input(
                "input_ids",
                format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.config.vocab_size
                ),
            ));
        }
        if clip_skip >= self.config.num_hidden_layers {
            return Err(Error::param(
                "clip_skip",
                format!(
                    "{clip_skip} skips all {} layers",
                    self.config.num_hidden_layers
                ),
            ));
        }
        let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
        let ids_t = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, n]), device);
        let positions: Vec<i64> = (0..n as i64).collect();
        let pos = Tensor::<2, Int>::from_data(TensorData::new(positions, [1, n]), device);
        let mut x = self.token_embedding.forward(ids_t) + self.position_embedding.forward(pos);

        let mask = match attention_mask {
            None => None,
            Some(m) => {
                if m.len() != b || m.iter().any(|r| r.len() != n) {
                    return Err(Error::input(
                        "attention_mask",
                        "shape differs from input_ids",
                    ));
                }
                // true = masked: future keys (causal) and padded keys.
                let mut data = Vec::with_capacity(b * n * n);
                for row in m {
                    for i in 0..n {
                        for (j, &keep) in row.iter().enumerate() {
                            data.push(j > i || keep == 0);
                        }
                    }
                }
                Some(Tensor::<4, Bool>::from_data(
                    TensorData::new(data, [b, 1, n, n]),
                    device,
                ))
            }
        };

        let heads = self.config.num_attention_heads;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            x = layer.forward(x, heads, &mask, self.act);
        }
        Ok(self.final_layer_norm.forward(x).cast(DType::F32))
    }
}
