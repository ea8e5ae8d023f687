//! diffusers' `UNet2DConditionModel`, built from its `config.json`.
//!
//! Supports what SD 1.x / 2.x checkpoints and their distilled variants use:
//! `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn` or none (`mid_block_type:
//! null`, BK-SDM-Small / -Tiny), `UpBlock2D` / `CrossAttnUpBlock2D`, any number of levels and
//! layers per block, `attention_head_dim` as an
//! int or a per-block list, conv or linear projections. Anything else is refused by name.

use burn::tensor::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::deepcache::{BranchPlace, DeepCacheConfig, DeepStep};
use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::error::{Error, Result};
use crate::nn::{Activation, ActivationSize, Conv2d, GroupNorm, Linear};
use crate::resnet::{ResnetBlock2D, TimeInput};
use crate::tgate::AttentionCache;
use crate::unet_2d_blocks::{BlockCommon, CrossAttn, DownBlock, MidBlock, UpBlock};
use crate::weights::Weights;

/// The UNet's shape, with diffusers' naming quirks resolved (`heads` is what diffusers calls
/// `attention_head_dim` when `num_attention_heads` is unset).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    /// Per down block: has cross-attention.
    pub down_cross: Vec<bool>,
    /// Per up block (in up order): has cross-attention.
    pub up_cross: Vec<bool>,
    /// Attention heads per down block.
    pub heads: Vec<usize>,
    /// Transformer depth per down block.
    pub transformer_depth: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub sample_size: usize,
    pub center_input_sample: bool,
    /// `UNetMidBlock2DCrossAttn` between the down and up blocks; `false` for
    /// `mid_block_type: null` (BK-SDM-Small and -Tiny remove it).
    pub mid_block: bool,
    /// The width of the guidance embedding latent-consistency models add to the time embedding
    /// (`time_cond_proj_dim`; LCM-distilled SD 1.5 has 256). Such a model runs without
    /// classifier-free guidance: the guidance scale goes in through this embedding.
    pub time_cond_proj_dim: Option<usize>,
}

/// `config.json` of `UNet2DConditionModel` as diffusers writes it: the keys this crate reads,
/// with diffusers' defaults. Keys whose other values would change the maths are checked
/// separately ([`refuse_unsupported`]).
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default)]
    attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    layers_per_block: Option<PerBlock>,
    #[serde(default)]
    transformer_layers_per_block: Option<PerBlock>,
    #[serde(default = "clip_l_width")]
    cross_attention_dim: usize,
    #[serde(default)]
    use_linear_projection: Option<bool>,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    norm_eps: f64,
    #[serde(default)]
    flip_sin_to_cos: Option<bool>,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "sixty_four")]
    sample_size: usize,
    #[serde(default)]
    center_input_sample: Option<bool>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
}

fn four() -> usize {
    4
}
fn clip_l_width() -> usize {
    1280
}
fn thirty_two() -> usize {
    32
}
fn sixty_four() -> usize {
    64
}
fn norm_eps() -> f64 {
    1e-5
}

/// diffusers' "an int for every block, or one per block".
#[derive(Deserialize)]
#[serde(untagged)]
enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn resolve(
        v: Option<PerBlock>,
        n: usize,
        default: usize,
        name: &str,
        file: &str,
    ) -> Result<Vec<usize>> {
        match v {
            None => Ok(vec![default; n]),
            Some(PerBlock::One(x)) => Ok(vec![x; n]),
            Some(PerBlock::Each(l)) if l.len() == n => Ok(l),
            Some(PerBlock::Each(l)) => Err(Error::config(
                file,
                format!("`{name}` has {} entries for {n} blocks", l.len()),
            )),
        }
    }
}

/// Refuses the configuration keys whose values change the computation and are not implemented;
/// returns the config as a map for the keys whose absence and `null` differ.
fn refuse_unsupported(file: &str, bytes: &[u8]) -> Result<serde_json::Map<String, Value>> {
    let v: serde_json::Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
    let must_be = |k: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
        match v.get(k) {
            Some(x) if !ok(x) => Err(Error::config(file, format!("unsupported `{k}` = {x}"))),
            _ => Ok(()),
        }
    };
    let null = |x: &Value| x.is_null();
    let falsy = |x: &Value| x.is_null() || x == &Value::Bool(false);
    for k in [
        "class_embed_type",
        "addition_embed_type",
        "encoder_hid_dim",
        "num_class_embeds",
    ] {
        must_be(k, &null)?;
    }
    for k in ["only_cross_attention", "dual_cross_attention"] {
        must_be(k, &falsy)?;
    }
    must_be("act_fn", &|x| x == "silu")?;
    must_be("attention_type", &|x| x == "default")?;
    must_be("resnet_time_scale_shift", &|x| x == "default")?;
    must_be("time_embedding_type", &|x| x == "positional")?;
    // `null` removes the mid block (BK-SDM); absent means diffusers' default, the cross-attention one.
    must_be("mid_block_type", &|x| {
        x.is_null() || x == "UNetMidBlock2DCrossAttn"
    })?;
    // diffusers 0.42 itself refuses `num_attention_heads` for this model (its
    // `attention_head_dim` carries the head counts).
    must_be("num_attention_heads", &null)?;
    must_be("conv_in_kernel", &|x| x.as_u64() == Some(3))?;
    must_be("conv_out_kernel", &|x| x.as_u64() == Some(3))?;
    must_be("mid_block_scale_factor", &|x| x.as_f64() == Some(1.0))?;
    must_be("downsample_padding", &|x| x.as_u64() == Some(1))?;
    Ok(v)
}

/// Whether each block type has cross-attention (`cross`) or not (`plain`).
fn block_kinds(file: &str, types: &[String], cross: &str, plain: &str) -> Result<Vec<bool>> {
    types
        .iter()
        .map(|t| match t.as_str() {
            t if t == cross => Ok(true),
            t if t == plain => Ok(false),
            t => Err(Error::config(file, format!("unsupported block type `{t}`"))),
        })
        .collect()
}

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        let map = refuse_unsupported(file, bytes)?;
        let mid_block = !map.get("mid_block_type").is_some_and(Value::is_null);
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(Error::config(file, "`block_out_channels` is empty"));
        }
        if raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(Error::config(
                file,
                format!(
                    "{} down and {} up block types for {n} levels",
                    raw.down_block_types.len(),
                    raw.up_block_types.len()
                ),
            ));
        }
        let cfg = UNetConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            down_cross: block_kinds(
                file,
                &raw.down_block_types,
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            )?,
            up_cross: block_kinds(file, &raw.up_block_types, "CrossAttnUpBlock2D", "UpBlock2D")?,
            heads: PerBlock::resolve(raw.attention_head_dim, n, 8, "attention_head_dim", file)?,
            layers_per_block: PerBlock::resolve(
                raw.layers_per_block,
                n,
                2,
                "layers_per_block",
                file,
            )?,
            transformer_depth: PerBlock::resolve(
                raw.transformer_layers_per_block,
                n,
                1,
                "transformer_layers_per_block",
                file,
            )?,
            cross_attention_dim: raw.cross_attention_dim,
            use_linear_projection: raw.use_linear_projection.unwrap_or(false),
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift,
            sample_size: raw.sample_size,
            center_input_sample: raw.center_input_sample.unwrap_or(false),
            mid_block,
            time_cond_proj_dim: raw.time_cond_proj_dim,
            block_out_channels: raw.block_out_channels,
        };
        cfg.check(file)?;
        Ok(cfg)
    }

    /// Refuses shapes the model cannot be built with.
    fn check(&self, file: &str) -> Result<()> {
        let err = |m: String| Error::config(file, m);
        if self.time_cond_proj_dim == Some(0) {
            return Err(err("`time_cond_proj_dim` must be at least 1".into()));
        }
        if self.norm_num_groups == 0 {
            return Err(err("`norm_num_groups` must be at least 1".into()));
        }
        if let Some(i) = self.layers_per_block.iter().position(|&l| l == 0) {
            return Err(err(format!(
                "block {i}: `layers_per_block` must be at least 1"
            )));
        }
        if let Some(i) = self.transformer_depth.iter().position(|&l| l == 0) {
            return Err(err(format!(
                "block {i}: `transformer_layers_per_block` must be at least 1"
            )));
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&self.heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels do not split into {h} attention heads"
                )));
            }
            if c % self.norm_num_groups != 0 {
                return Err(err(format!(
                    "block {i}: {c} channels do not split into {} groups",
                    self.norm_num_groups
                )));
            }
        }
        Ok(())
    }

    /// Time-embedding width (4 × the first block's channels).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

/// The time input of every denoiser call of one generation
/// ([`UNet2DConditionModel::time_table`]), read per call with [`UNet2DConditionModel::time_at`].
#[derive(Clone, Debug)]
pub struct TimeTable {
    timesteps: Vec<f64>,
    timestep_cond: Option<Tensor<2>>,
    device: Device,
    /// Every call's rows, made at once and kept on the device (`None`: each call computes its
    /// own, because the table would exceed [`TIME_TABLE_BYTES`]).
    table: Option<TimeInput>,
}

impl TimeTable {
    /// Number of calls (timesteps) the table holds.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Whether every call's time input was computed at once (not per call).
    pub fn is_precomputed(&self) -> bool {
        self.table.is_some()
    }
}

/// The largest time table made up front (bytes of its rows); past it (hundreds of steps) each
/// call computes its own time input.
const TIME_TABLE_BYTES: u64 = 16 << 20;

/// The conditional UNet.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Every ResNet block's `time_emb_proj` (with its conv1's bias folded in) as one linear: one
    /// matmul for all of them instead of one each, run once per generation by its time table
    /// (see [`TimeInput::Joined`]). `None` where the joined weight would not fit the device's
    /// largest buffer.
    time_projections: Option<Linear>,
    /// The largest tensor the device takes (the weights' cap), which the time table respects too.
    max_tensor_bytes: Option<u64>,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
}

impl UNet2DConditionModel {
    /// The largest activation of a forward pass on `[batch, c, h, w]` latents (attention scores
    /// excepted): the feed-forward's GEGLU projection (`8 × channels` per token) or an up-block
    /// resnet's input (its channels plus the skip's), whichever is bigger. Group norms compute
    /// in f32, so feature maps count 4 bytes per element.
    pub fn largest_activation(&self, batch: usize, h: usize, w: usize) -> ActivationSize {
        let c = &self.config.block_out_channels;
        let n = c.len();
        let dtype = self.dtype.size();
        let mut largest = ActivationSize::new("nothing", &[0], 0);
        let (mut lh, mut lw) = (h, w);
        for l in 0..n {
            let skip = c[(l + 1).min(n - 1)].max(c[l.saturating_sub(1)]);
            let ch = c[l] + skip;
            largest = largest.max(ActivationSize::new(
                format!("a UNet up-block feature map ({batch}×{ch}×{lh}×{lw})"),
                &[batch, ch, lh, lw],
                4,
            ));
            let attention =
                self.config.down_cross[l] || self.config.up_cross[n - 1 - l] || l == n - 1;
            if attention {
                let tokens = lh * lw;
                largest = largest.max(ActivationSize::new(
                    format!(
                        "a UNet feed-forward projection ({batch}×{tokens}×{})",
                        8 * c[l]
                    ),
                    &[batch, tokens, 8 * c[l]],
                    dtype,
                ));
            }
            // A stride-2 convolution with padding 1 rounds up.
            (lh, lw) = (lh.div_ceil(2), lw.div_ceil(2));
        }
        largest
    }

    /// Loads from `unet/diffusion_pytorch_model.safetensors`.
    pub fn load(config: &UNetConfig, w: &Weights) -> Result<Self> {
        let c = config;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let common = BlockCommon {
            temb_channels: c.time_embed_dim(),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            cross_attention_dim: c.cross_attention_dim,
            use_linear_projection: c.use_linear_projection,
        };
        let cross = |i: usize, on: bool| {
            on.then_some(CrossAttn {
                heads: c.heads[i],
                depth: c.transformer_depth[i],
            })
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_in = boc[0];
        for i in 0..n {
            let w = w.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::load(
                &w,
                c_in,
                boc[i],
                c.layers_per_block[i],
                cross(i, c.down_cross[i]),
                i + 1 < n,
                &common,
            )?);
            c_in = boc[i];
        }
        let mid_block = c
            .mid_block
            .then(|| {
                MidBlock::load(
                    &w.pp("mid_block"),
                    boc[n - 1],
                    cross(n - 1, true).unwrap_or(CrossAttn { heads: 1, depth: 1 }),
                    &common,
                )
            })
            .transpose()?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = boc[n - 1];
        for i in 0..n {
            let level = n - 1 - i; // the down level this up block mirrors
            let c_out = boc[level];
            let skip_in = boc[level.saturating_sub(1)];
            let w = w.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::load(
                &w,
                skip_in,
                prev_out,
                c_out,
                c.layers_per_block[level] + 1,
                cross(level, c.up_cross[i]),
                i + 1 < n,
                &common,
            )?);
            prev_out = c_out;
        }
        let mut unet = UNet2DConditionModel {
            conv_in: Conv2d::load(&w.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::load(
                &w.pp("time_embedding"),
                boc[0],
                c.time_embed_dim(),
                c.time_cond_proj_dim,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &w.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&w.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            config: config.clone(),
            time_projections: None,
            max_tensor_bytes: w.max_tensor_bytes(),
            dtype: w.dtype(),
        };
        unet.join_time_projections(w.max_tensor_bytes());
        Ok(unet)
    }

    /// Bytes of the joined time projections' weight ([`Self::time_projections`]), `None` when
    /// each ResNet block keeps its own (for tests and reports).
    pub fn joined_time_projection_bytes(&self) -> Option<u64> {
        self.time_projections.as_ref().map(Linear::weight_bytes)
    }

    /// Joins the ResNet blocks' time projections into [`Self::time_projections`] when the
    /// joined weight fits `max_tensor_bytes`.
    fn join_time_projections(&mut self, max_tensor_bytes: Option<u64>) {
        let mut resnets: Vec<&mut ResnetBlock2D> = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.resnets_mut().iter_mut())
            .chain(
                self.mid_block
                    .iter_mut()
                    .flat_map(|m| m.resnets_mut().iter_mut()),
            )
            .chain(
                self.up_blocks
                    .iter_mut()
                    .flat_map(|b| b.resnets_mut().iter_mut()),
            )
            .collect();
        let bytes: u64 = resnets
            .iter()
            .filter_map(|r| r.time_projection().map(Linear::weight_bytes))
            .sum();
        if bytes == 0 || max_tensor_bytes.is_some_and(|limit| bytes > limit) {
            return;
        }
        let mut offset = 0;
        let mut parts = Vec::with_capacity(resnets.len());
        for resnet in resnets.iter_mut() {
            if let Some(part) = resnet.take_time_projection(offset) {
                offset += part.out_features();
                parts.push(part);
            }
        }
        self.time_projections = Linear::join(parts);
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the parameters and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One denoiser call: `sample [b, in, h, w]` at `timestep`, conditioned on `context
    /// [b, 77, cross_attention_dim]`; the attention caches follow the gate's current modes.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timestep: f64,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        self.forward_with_cond(sample, timestep, context, None, cache)
    }

    /// [`Self::forward`] with diffusers' `timestep_cond` (`[b, time_cond_proj_dim]`, the guidance
    /// embedding of latent-consistency models; ignored by a UNet without `time_cond_proj_dim`).
    pub fn forward_with_cond(
        &self,
        sample: Tensor<4>,
        timestep: f64,
        context: &Tensor<3>,
        timestep_cond: Option<&Tensor<2>>,
        cache: &mut AttentionCache,
    ) -> Tensor<4> {
        self.forward_deep(sample, timestep, context, timestep_cond, cache, None)
    }

    /// Whether a shallow step at `place` computes everything: every down layer runs and there is
    /// no mid block to skip (BK-SDM-Small and -Tiny with a branch at or below their deepest
    /// level).
    pub fn branch_skips_nothing(&self, place: BranchPlace) -> bool {
        let n = self.down_blocks.len();
        let all_down = place.full_down_blocks >= n
            || (place.full_down_blocks + 1 == n
                && place
                    .partial_down_layers
                    .is_some_and(|l| l >= self.config.layers_per_block[n - 1]));
        self.mid_block.is_none() && all_down
    }

    /// Where a DeepCache branch leaves and re-enters this UNet.
    pub fn branch_place(&self, config: &DeepCacheConfig) -> BranchPlace {
        BranchPlace::new(config, &self.config.layers_per_block)
    }

    /// [`Self::forward_with_cond`] under DeepCache: a full step keeps the feature entering the
    /// up path at the branch's place, a shallow step computes only the branch (see
    /// [`crate::deepcache`]). Callers pass no step for a place that skips nothing
    /// ([`Self::branch_skips_nothing`]).
    pub fn forward_deep(
        &self,
        sample: Tensor<4>,
        timestep: f64,
        context: &Tensor<3>,
        timestep_cond: Option<&Tensor<2>>,
        cache: &mut AttentionCache,
        deep: Option<DeepStep>,
    ) -> Tensor<4> {
        let time = self.time_input(&[timestep], timestep_cond, &sample.device());
        self.forward_time(sample, &time, context, cache, deep)
    }

    /// The time input of every call of one generation at once ([`TimeTable`]): the sinusoidal
    /// embedding of each timestep (with its `timestep_cond` row(s), the same for every call),
    /// the time MLP, silu and the joined ResNet projections run once for all of them, so a
    /// denoiser call ([`Self::forward_time`] with [`Self::time_at`]) launches none of it.
    pub fn time_table(
        &self,
        timesteps: &[f64],
        timestep_cond: Option<&Tensor<2>>,
        device: &Device,
    ) -> TimeTable {
        let cap = self
            .max_tensor_bytes
            .map_or(TIME_TABLE_BYTES, |limit| limit.min(TIME_TABLE_BYTES));
        self.time_table_within(timesteps, timestep_cond, device, cap)
    }

    /// The largest tensor the device takes, as the weights were loaded
    /// ([`Weights::with_max_tensor_bytes`]); `None`: no cap given.
    pub fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }

    /// [`Self::time_table`], made up front only when its rows take at most `max_bytes`
    /// (otherwise each call computes its own time input, as [`Self::forward_deep`] does).
    pub fn time_table_within(
        &self,
        timesteps: &[f64],
        timestep_cond: Option<&Tensor<2>>,
        device: &Device,
        max_bytes: u64,
    ) -> TimeTable {
        let rows = timestep_cond.map_or(1, |c| c.dims()[0]);
        let width = self
            .time_projections
            .as_ref()
            .map_or(self.config.time_embed_dim(), Linear::out_features);
        let bytes = (timesteps.len() * rows * width * self.dtype.size()) as u64;
        TimeTable {
            timesteps: timesteps.to_vec(),
            timestep_cond: timestep_cond.cloned(),
            device: device.clone(),
            table: (bytes <= max_bytes && !timesteps.is_empty())
                .then(|| self.time_input(timesteps, timestep_cond, device)),
        }
    }

    /// The time input of call `i` of `table`: a view of its rows (nothing launched), or computed
    /// now where the table was too large to make up front; `None` past its end. The table must
    /// come from this model's [`Self::time_table`] (another model's rows have other widths, and
    /// its ResNet blocks would panic reading them).
    pub fn time_at(&self, table: &TimeTable, i: usize) -> Option<TimeInput> {
        let &t = table.timesteps.get(i)?;
        let cond = table.timestep_cond.as_ref();
        Some(match &table.table {
            Some(all) => {
                let n = cond.map_or(1, |c| c.dims()[0]);
                match all {
                    TimeInput::Joined(x) => TimeInput::Joined(x.clone().narrow(0, i * n, n)),
                    TimeInput::Activated(x) => TimeInput::Activated(x.clone().narrow(0, i * n, n)),
                }
            }
            None => self.time_input(&[t], cond, &table.device),
        })
    }

    /// The time input of calls at `timesteps`: `rows` rows per timestep (every row of a batch
    /// is at the same timestep, so one row serves the whole batch; or one per row of
    /// `timestep_cond` when that has several), timestep-major.
    fn time_input(
        &self,
        timesteps: &[f64],
        timestep_cond: Option<&Tensor<2>>,
        device: &Device,
    ) -> TimeInput {
        let rows = timestep_cond.map_or(1, |c| c.dims()[0]);
        let every: Vec<f64> = timesteps
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, rows))
            .collect();
        let t = timestep_embedding(
            &every,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            device,
        )
        .cast(self.dtype);
        let cond = timestep_cond.map(|c| {
            let c = c.clone().cast(self.dtype);
            if timesteps.len() > 1 {
                c.repeat_dim(0, timesteps.len())
            } else {
                c
            }
        });
        // Every ResNet block projects silu(temb): activated once here.
        let temb = Activation::Silu.forward(self.time_embedding.forward(t, cond));
        match &self.time_projections {
            Some(joined) => TimeInput::Joined(joined.forward(temb)),
            None => TimeInput::Activated(temb),
        }
    }

    /// [`Self::forward_deep`] with its time input already computed: a row of this model's
    /// [`TimeTable`] ([`Self::time_at`]).
    ///
    /// # Panics
    /// If `time` was made by another model (its joined rows do not match this one's blocks).
    pub fn forward_time(
        &self,
        sample: Tensor<4>,
        time: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        deep: Option<DeepStep>,
    ) -> Tensor<4> {
        let sample = sample.cast(self.dtype);
        let context = &context.clone().cast(self.dtype);
        // 2. pre-process
        let sample = if self.config.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        let x = match deep {
            Some(DeepStep::Shallow { place, feature }) => {
                self.shallow_path(x, time, context, cache, &mut skips, place, feature)
            }
            Some(DeepStep::Full { place, keep }) => {
                let x = self.down_and_mid(x, time, context, cache, &mut skips);
                self.up_path(x, time, context, cache, &mut skips, Some((place, keep)))
            }
            None => {
                let x = self.down_and_mid(x, time, context, cache, &mut skips);
                self.up_path(x, time, context, cache, &mut skips, None)
            }
        };
        // 6. post-process
        self.conv_out
            .forward(self.conv_norm_out.forward_silu(x))
            .cast(DType::F32)
    }
}

impl UNet2DConditionModel {
    /// 3. down and 4. mid.
    fn down_and_mid(
        &self,
        mut x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for block in &self.down_blocks {
            x = block.forward(x, temb, context, cache, skips);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, temb, context, cache);
        }
        x
    }

    /// 5. up, from the first up block; `keep`: the DeepCache place whose entering feature is
    /// kept, and where.
    fn up_path(
        &self,
        mut x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
        mut keep: Option<(BranchPlace, &mut Option<Tensor<4>>)>,
    ) -> Tensor<4> {
        for (u, block) in self.up_blocks.iter().enumerate() {
            let upsample_to = upsample_size(skips, block.num_layers());
            let split = match &keep {
                Some((place, _)) if place.up_block == u => place.up_layer,
                _ => 0,
            };
            x = block.forward_layers(x, temb, context, cache, skips, 0..split);
            if let Some((place, slot)) = keep.as_mut() {
                if place.up_block == u {
                    **slot = Some(x.clone());
                }
            }
            x = block.forward_layers(x, temb, context, cache, skips, split..block.num_layers());
            x = block.upsample(x, upsample_to);
        }
        x
    }

    /// A DeepCache shallow step after `conv_in`: the down path to the branch's place, the
    /// skipped layers passed over in the attention caches, then the up path from the place on,
    /// entered with the kept `feature`.
    #[allow(clippy::too_many_arguments)]
    fn shallow_path(
        &self,
        mut x: Tensor<4>,
        temb: &TimeInput,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
        skips: &mut Vec<Tensor<4>>,
        place: BranchPlace,
        feature: Tensor<4>,
    ) -> Tensor<4> {
        let mut skipped = 0;
        for (d, block) in self.down_blocks.iter().enumerate() {
            if d < place.full_down_blocks {
                x = block.forward(x, temb, context, cache, skips);
            } else if d == place.full_down_blocks && place.partial_down_layers.is_some() {
                let layers = place.partial_down_layers.unwrap_or(0);
                x = block.forward_layers(x, temb, context, cache, skips, layers, false);
                skipped += block.attention_blocks_from(layers);
            } else {
                skipped += block.attention_blocks_from(0);
            }
        }
        skipped += self.mid_block.as_ref().map_or(0, |m| m.attention_blocks());
        for block in &self.up_blocks[..place.up_block] {
            skipped += block.attention_blocks_before(block.num_layers());
        }
        let entry = &self.up_blocks[place.up_block];
        skipped += entry.attention_blocks_before(place.up_layer);
        cache.skip_blocks(skipped);
        let mut x = feature;
        for (u, block) in self.up_blocks.iter().enumerate().skip(place.up_block) {
            let from = if u == place.up_block {
                place.up_layer
            } else {
                0
            };
            let upsample_to = upsample_size(skips, block.num_layers() - from);
            x = block.forward_layers(x, temb, context, cache, skips, from..block.num_layers());
            x = block.upsample(x, upsample_to);
        }
        x
    }
}

/// The size of the next skip an up block will meet after consuming `consumed` skips (its
/// upsampler's target: odd sizes round up on the way down).
fn upsample_size(skips: &[Tensor<4>], consumed: usize) -> Option<[usize; 2]> {
    let rest = skips.len().saturating_sub(consumed);
    rest.checked_sub(1).and_then(|k| skips.get(k)).map(|s| {
        let [_, _, h, w] = s.dims();
        [h, w]
    })
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn parse(extra: &str) -> Result<UNetConfig> {
        let json = format!(
            r#"{{"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                "norm_num_groups": 8{extra}}}"#
        );
        UNetConfig::from_json("unet/config.json", json.as_bytes())
    }

    fn message(r: Result<UNetConfig>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(c) => panic!("accepted: {c:?}"),
        }
    }

    #[test]
    fn defaults_and_per_block_values() {
        let c = parse(r#", "attention_head_dim": [4, 8], "layers_per_block": 1"#).unwrap();
        assert_eq!(c.heads, vec![4, 8]);
        assert_eq!(c.layers_per_block, vec![1, 1]);
        assert_eq!(c.transformer_depth, vec![1, 1]);
        assert_eq!((c.in_channels, c.sample_size, c.norm_eps), (4, 64, 1e-5));
        assert_eq!(
            (c.down_cross, c.up_cross),
            (vec![true, false], vec![false, true])
        );
        assert!(c.flip_sin_to_cos && !c.use_linear_projection);
        assert!(c.mid_block, "absent means diffusers' default mid block");
        let c = parse(r#", "mid_block_type": null"#).unwrap();
        assert!(!c.mid_block, "BK-SDM's null removes it");
        let c = parse(r#", "mid_block_type": "UNetMidBlock2DCrossAttn""#).unwrap();
        assert!(c.mid_block);
        assert_eq!(c.time_cond_proj_dim, None);
        let c = parse(r#", "time_cond_proj_dim": 256"#).unwrap();
        assert_eq!(c.time_cond_proj_dim, Some(256), "LCM's guidance embedding");
    }

    #[test]
    fn refusals_name_the_key() {
        for (extra, needle) in [
            (
                r#", "attention_head_dim": [4, 8, 8]"#,
                "`attention_head_dim` has 3 entries",
            ),
            (r#", "time_cond_proj_dim": 0"#, "time_cond_proj_dim"),
            (r#", "addition_embed_type": "text""#, "addition_embed_type"),
            (r#", "act_fn": "gelu""#, "act_fn"),
            (
                r#", "mid_block_type": "UNetMidBlock2DSimpleCrossAttn""#,
                "mid_block_type",
            ),
            (r#", "layers_per_block": 0"#, "layers_per_block"),
            (r#", "attention_head_dim": 5"#, "attention heads"),
            (r#", "sample_size": "64""#, "invalid type"),
        ] {
            let m = message(parse(extra));
            assert!(
                m.contains(needle) && m.contains("unet/config.json"),
                "{extra}: {m}"
            );
        }
        let m = message(UNetConfig::from_json(
            "unet/config.json",
            br#"{"block_out_channels": [32], "down_block_types": ["DownBlock2D"], "up_block_types": ["SimpleUp"]}"#,
        ));
        assert!(m.contains("unsupported block type `SimpleUp`"), "{m}");
    }
}
