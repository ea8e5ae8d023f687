//! Würstchen Stage B, diffusers' `WuerstchenDiffNeXt` (`decoder/` of a model folder): denoises
//! the 4-channel latent of Stage A, conditioned on Stage C's image embedding ("effnet", injected
//! at every level through an antialiased bicubic resize) and on text.

use burn::tensor::{activation, DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{
    norm_over, pixel_shuffle, pixel_unshuffle, resize_bicubic_antialias, ActivationSize, Conv2d,
    ConvTranspose2d, Linear,
};
use crate::tgate::{AttentionCache, CacheMode};
use crate::weights::Weights;
use crate::wuerstchen_common::{
    check_c_r, AttnBlock, ChannelNorm, Channelwise, RTable, TimestepBlock,
};

/// `WuerstchenDiffNeXt`'s `config.json` (defaults as diffusers' constructor).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffNeXtConfig {
    #[serde(default = "d4")]
    pub c_in: usize,
    #[serde(default = "d4")]
    pub c_out: usize,
    #[serde(default = "d64")]
    pub c_r: usize,
    #[serde(default = "d2")]
    pub patch_size: usize,
    #[serde(default = "d1024")]
    pub c_cond: usize,
    #[serde(default = "default_hidden")]
    pub c_hidden: Vec<usize>,
    #[serde(default = "default_nhead")]
    pub nhead: Vec<i64>,
    #[serde(default = "default_blocks")]
    pub blocks: Vec<usize>,
    #[serde(default = "default_levels")]
    pub level_config: Vec<String>,
    #[serde(default = "default_inject")]
    pub inject_effnet: Vec<bool>,
    #[serde(default = "d16")]
    pub effnet_embd: usize,
    #[serde(default = "d1024")]
    pub clip_embd: usize,
    #[serde(default = "d3")]
    pub kernel_size: usize,
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
fn d16() -> usize {
    16
}
fn d64() -> usize {
    64
}
fn d1024() -> usize {
    1024
}
fn default_hidden() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_nhead() -> Vec<i64> {
    vec![-1, 10, 20, 20]
}
fn default_blocks() -> Vec<usize> {
    vec![4, 4, 14, 4]
}
fn default_levels() -> Vec<String> {
    ["CT", "CTA", "CTA", "CTA"].map(String::from).to_vec()
}
fn default_inject() -> Vec<bool> {
    vec![false, true, true, true]
}

impl DiffNeXtConfig {
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let cfg: DiffNeXtConfig =
            serde_json::from_slice(bytes).map_err(|e| Error::config(file, e.to_string()))?;
        let levels = cfg.c_hidden.len();
        if !(1..=8).contains(&levels) {
            return Err(Error::config(
                file,
                format!("c_hidden must have 1..=8 levels, has {levels}"),
            ));
        }
        for (name, len) in [
            ("nhead", cfg.nhead.len()),
            ("blocks", cfg.blocks.len()),
            ("level_config", cfg.level_config.len()),
            ("inject_effnet", cfg.inject_effnet.len()),
        ] {
            if len != levels {
                return Err(Error::config(
                    file,
                    format!("{name} has {len} entries, c_hidden has {levels}"),
                ));
            }
        }
        check_c_r(file, cfg.c_r)?;
        if !(1..=16).contains(&cfg.patch_size) || cfg.kernel_size % 2 == 0 {
            return Err(Error::config(
                file,
                "patch_size must be in 1..=16 and kernel_size odd",
            ));
        }
        for (i, level) in cfg.level_config.iter().enumerate() {
            if let Some(bad) = level.chars().find(|ch| !matches!(ch, 'C' | 'T' | 'A')) {
                return Err(Error::config(
                    file,
                    format!("level_config[{i}]: block type `{bad}` is not supported (C, T, A)"),
                ));
            }
            if level.contains('A') {
                let heads = cfg.nhead[i];
                if heads <= 0 || cfg.c_hidden[i] % heads as usize != 0 {
                    return Err(Error::config(
                        file,
                        format!(
                            "level {i}: c_hidden {} is not divisible by nhead {heads}",
                            cfg.c_hidden[i]
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// The factor by which the latent shrinks to the deepest level (inputs must be multiples).
    pub fn downscale(&self) -> usize {
        self.patch_size << (self.c_hidden.len() - 1)
    }
}

/// Stage B's `ResBlockStageB`: the skip joins after the depthwise conv and norm.
#[derive(Clone, Debug)]
struct ResBlockStageB {
    depthwise: Conv2d,
    norm: ChannelNorm,
    channelwise: Channelwise,
}

impl ResBlockStageB {
    fn load(w: &Weights, c: usize, c_skip: usize, kernel: usize) -> Result<Self> {
        Ok(ResBlockStageB {
            depthwise: Conv2d::load_grouped(&w.pp("depthwise"), c, c, kernel, 1, kernel / 2, c)?,
            norm: ChannelNorm::load(w, c),
            channelwise: Channelwise::load(&w.pp("channelwise"), c + c_skip, 4 * c, c)?,
        })
    }

    fn forward(&self, x: Tensor<4>, skip: Option<Tensor<4>>) -> Tensor<4> {
        let residual = x.clone();
        let x = self.norm.forward(self.depthwise.forward(x));
        let x = match skip {
            Some(s) => Tensor::cat(vec![x, s], 1),
            None => x,
        };
        self.channelwise.forward(x) + residual
    }
}

#[derive(Clone, Debug)]
enum Block {
    Res(ResBlockStageB),
    Time(TimestepBlock),
    Attn(AttnBlock),
    /// Channel norm then a 2×2 stride-2 convolution (start of a deeper level).
    Down(ChannelNorm, Conv2d),
    /// Channel norm then a 2×2 stride-2 transposed convolution (end of an up level).
    Up(ChannelNorm, ConvTranspose2d),
}

/// Stage B's per-generation conditioning (see [`WuerstchenDiffNeXt::condition`]).
#[derive(Clone, Debug)]
pub struct DiffNeXtConditioning {
    clip: Tensor<3>,
    effnet: Tensor<4>,
    mapped: Vec<Option<Tensor<4>>>,
    /// The text keys and values of every attention block (Stage B is never gated).
    attention: AttentionCache,
}

/// Stage B.
#[derive(Clone, Debug)]
pub struct WuerstchenDiffNeXt {
    config: DiffNeXtConfig,
    clip_mapper: Linear,
    /// Down levels then up levels; `None` where that level takes no effnet.
    effnet_mappers: Vec<Option<Conv2d>>,
    embedding: Conv2d,
    embedding_norm: ChannelNorm,
    down: Vec<Vec<Block>>,
    up: Vec<Vec<Block>>,
    clf_norm: ChannelNorm,
    clf: Conv2d,
    /// Parameters and activations (inputs and outputs are f32).
    dtype: DType,
    /// The largest tensor the device takes (the weights' cap), if known.
    max_tensor_bytes: Option<u64>,
}

impl WuerstchenDiffNeXt {
    pub fn load(config: &DiffNeXtConfig, w: &Weights) -> Result<Self> {
        let cfg = config;
        let (c_cond, p) = (cfg.c_cond, cfg.patch_size);
        let (down, up) = (load_down(cfg, w)?, load_up(cfg, w)?);
        let injects = cfg
            .inject_effnet
            .iter()
            .chain(cfg.inject_effnet.iter().rev());
        let effnet_mappers = injects
            .enumerate()
            .map(|(n, &inject)| {
                inject
                    .then(|| {
                        Conv2d::load(
                            &w.pp("effnet_mappers").pp(n),
                            cfg.effnet_embd,
                            c_cond,
                            1,
                            1,
                            0,
                        )
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WuerstchenDiffNeXt {
            clip_mapper: Linear::load(&w.pp("clip_mapper"), cfg.clip_embd, c_cond, true)?,
            effnet_mappers,
            embedding: Conv2d::load(
                &w.pp("embedding").pp(1),
                cfg.c_in * p * p,
                cfg.c_hidden[0],
                1,
                1,
                0,
            )?,
            embedding_norm: ChannelNorm::load(w, cfg.c_hidden[0]),
            down,
            up,
            clf_norm: ChannelNorm::load(w, cfg.c_hidden[0]),
            clf: Conv2d::load(
                &w.pp("clf").pp(1),
                cfg.c_hidden[0],
                2 * cfg.c_out * p * p,
                1,
                1,
                0,
            )?,
            config: cfg.clone(),
            dtype: w.dtype(),
            max_tensor_bytes: w.max_tensor_bytes(),
        })
    }

    /// The largest activation of a forward pass on `[batch, c_in, h, w]` latents (attention
    /// scores excepted): a residual block's channel MLP hidden layer (`4 × channels`, in f32 for
    /// the response norm's statistics) at each level's resolution.
    pub fn largest_activation(&self, batch: usize, h: usize, w: usize) -> ActivationSize {
        let cfg = &self.config;
        let (mut lh, mut lw) = (h / cfg.patch_size, w / cfg.patch_size);
        let mut largest = ActivationSize::new("nothing", &[0], 0);
        for &c in &cfg.c_hidden {
            largest = largest.max(ActivationSize::new(
                format!(
                    "a Stage B channel MLP activation ({batch}×{lh}×{lw}×{})",
                    4 * c
                ),
                &[batch, lh, lw, 4 * c],
                4,
            ));
            (lh, lw) = (lh / 2, lw / 2);
        }
        largest
    }

    pub fn config(&self) -> &DiffNeXtConfig {
        &self.config
    }

    /// The conditioning of one generation: `effnet: [b, effnet_embd, h, w]` (any size) and
    /// `clip: [b, n, clip_embd]`. The text mapping is done here once; each level's resized and
    /// mapped effnet, and each attention block's text keys and values, are computed at their
    /// first use and kept for the following steps.
    pub fn condition(&self, effnet: Tensor<4>, clip: Tensor<3>) -> DiffNeXtConditioning {
        DiffNeXtConditioning {
            clip: norm_over(self.clip_mapper.forward(clip.cast(self.dtype)), 2, 1e-6),
            // Kept in f32 (diffusers resizes `effnet.float()`); cast after each resize.
            effnet: effnet.cast(DType::F32),
            mapped: vec![None; self.effnet_mappers.len()],
            attention: AttentionCache::new(),
        }
    }

    /// `x: [b, c_in, H, W]` (multiples of [`DiffNeXtConfig::downscale`]), one noise ratio per
    /// row → `[b, c_out, H, W]`. The conditioning's batch must match `x`'s.
    pub fn forward(&self, x: Tensor<4>, r: &[f32], cond: &mut DiffNeXtConditioning) -> Tensor<4> {
        self.forward_table(x, &self.r_table(r), cond)
    }

    /// The timestep blocks in the order the forward pass meets them.
    fn timestep_blocks(&self) -> impl Iterator<Item = &TimestepBlock> {
        self.down
            .iter()
            .chain(self.up.iter())
            .flatten()
            .filter_map(|b| match b {
                Block::Time(t) => Some(t),
                _ => None,
            })
    }

    /// Every timestep block's scale and shift for each ratio of `r` (see [`RTable`]): one row
    /// per ratio, on the device.
    pub fn r_table(&self, r: &[f32]) -> RTable {
        let device = self.embedding.device();
        RTable::new(
            self.timestep_blocks(),
            r,
            self.config.c_r,
            self.dtype,
            &device,
        )
    }

    /// The largest tensor the device takes, as given to the weights
    /// ([`Weights::with_max_tensor_bytes`]); `None`: no cap given.
    pub fn max_tensor_bytes(&self) -> Option<u64> {
        self.max_tensor_bytes
    }

    /// The bytes of an [`RTable`] of `rows` ratios.
    pub fn r_table_bytes(&self, rows: usize) -> u64 {
        RTable::bytes(
            self.timestep_blocks().map(|t| t.channels()),
            rows,
            self.dtype,
        )
    }

    /// [`Self::forward`] with the noise ratios' modulation made beforehand: `table` has one
    /// row per batch row of `x`, or one row for all of them (a row of a generation's table).
    pub fn forward_table(
        &self,
        x: Tensor<4>,
        table: &RTable,
        cond: &mut DiffNeXtConditioning,
    ) -> Tensor<4> {
        let cfg = &self.config;
        let mut time_block = 0;
        let mut modulate = |x: Tensor<4>| {
            time_block += 1;
            table.block(time_block - 1).apply(x)
        };
        let clip = cond.clip.clone();
        let mut cache = std::mem::take(&mut cond.attention);
        cache.begin(CacheMode::Compute, CacheMode::Compute);
        let mut effnet_at = |n: usize, x: &Tensor<4>| -> Option<Tensor<4>> {
            let mapper = self.effnet_mappers[n].as_ref()?;
            let [_, _, h, w] = x.dims();
            let kept = cond.mapped[n].as_ref().filter(|t| t.dims()[2..] == [h, w]);
            if kept.is_none() {
                let resized = resize_bicubic_antialias(cond.effnet.clone(), h, w).cast(self.dtype);
                cond.mapped[n] = Some(mapper.forward(resized));
            }
            cond.mapped[n].clone()
        };

        let x_in = x.clone().cast(DType::F32);
        let x = pixel_unshuffle(x.cast(self.dtype), cfg.patch_size);
        let mut x = self.embedding_norm.forward(self.embedding.forward(x));
        let mut levels: Vec<Tensor<4>> = Vec::with_capacity(self.down.len());
        for (i, blocks) in self.down.iter().enumerate() {
            let mut effnet_c: Option<Tensor<4>> = None;
            for block in blocks {
                x = match block {
                    Block::Res(res) => {
                        if effnet_c.is_none() {
                            effnet_c = effnet_at(i, &x);
                        }
                        res.forward(x, effnet_c.clone())
                    }
                    Block::Time(_) => modulate(x),
                    Block::Attn(a) => a.forward(x, &clip, &mut cache),
                    Block::Down(norm, conv) => conv.forward(norm.forward(x)),
                    Block::Up(norm, conv) => conv.forward(norm.forward(x)),
                };
            }
            levels.push(x.clone());
        }
        levels.reverse();

        let mut x = levels[0].clone();
        let n_down = self.down.len();
        for (i, blocks) in self.up.iter().enumerate() {
            let mut effnet_c: Option<Tensor<4>> = None;
            for (j, block) in blocks.iter().enumerate() {
                x = match block {
                    Block::Res(res) => {
                        if effnet_c.is_none() {
                            effnet_c = effnet_at(n_down + i, &x);
                        }
                        let level_skip = (j == 0 && i > 0).then(|| levels[i].clone());
                        let skip = match (level_skip, effnet_c.clone()) {
                            (Some(s), Some(e)) => Some(Tensor::cat(vec![s, e], 1)),
                            (s, e) => s.or(e),
                        };
                        res.forward(x, skip)
                    }
                    Block::Time(_) => modulate(x),
                    Block::Attn(a) => a.forward(x, &clip, &mut cache),
                    Block::Down(norm, conv) => conv.forward(norm.forward(x)),
                    Block::Up(norm, conv) => conv.forward(norm.forward(x)),
                };
            }
        }
        cond.attention = cache;
        let ab = pixel_shuffle(self.clf.forward(self.clf_norm.forward(x)), cfg.patch_size)
            .cast(DType::F32);
        let c_out = cfg.c_out;
        let a = ab.clone().narrow(1, 0, c_out);
        let b = activation::sigmoid(ab.narrow(1, c_out, c_out));
        let eps = 1e-3;
        (x_in - a) / b.mul_scalar(1.0 - 2.0 * eps).add_scalar(eps)
    }
}

/// One block of level `i` of kind `C` (ResBlockStageB), `T` (TimestepBlock) or `A` (AttnBlock).
fn load_block(
    cfg: &DiffNeXtConfig,
    w: &Weights,
    kind: char,
    i: usize,
    c_skip: usize,
) -> Result<Block> {
    let c = cfg.c_hidden[i];
    Ok(match kind {
        'C' => Block::Res(ResBlockStageB::load(w, c, c_skip, cfg.kernel_size)?),
        'T' => Block::Time(TimestepBlock::load(w, c, cfg.c_r)?),
        _ => Block::Attn(AttnBlock::load(w, c, cfg.c_cond, cfg.nhead[i] as usize)?),
    })
}

/// `down_blocks`: per level, a stride-2 convolution (after the first) then the level's blocks.
fn load_down(cfg: &DiffNeXtConfig, w: &Weights) -> Result<Vec<Vec<Block>>> {
    let levels = cfg.c_hidden.len();
    let mut down = Vec::with_capacity(levels);
    for i in 0..levels {
        let lw = w.pp("down_blocks").pp(i);
        let mut blocks = Vec::new();
        if i > 0 {
            let conv = Conv2d::load(
                &lw.pp(0).pp(1),
                cfg.c_hidden[i - 1],
                cfg.c_hidden[i],
                2,
                2,
                0,
            )?;
            blocks.push(Block::Down(ChannelNorm::load(w, cfg.c_hidden[i - 1]), conv));
        }
        for _ in 0..cfg.blocks[i] {
            for kind in cfg.level_config[i].chars() {
                let c_skip = if cfg.inject_effnet[i] { cfg.c_cond } else { 0 };
                blocks.push(load_block(cfg, &lw.pp(blocks.len()), kind, i, c_skip)?);
            }
        }
        down.push(blocks);
    }
    Ok(down)
}

/// `up_blocks`: per level from the deepest, the level's blocks (the first takes the skip) then
/// a stride-2 transposed convolution (before the last level).
fn load_up(cfg: &DiffNeXtConfig, w: &Weights) -> Result<Vec<Vec<Block>>> {
    let levels = cfg.c_hidden.len();
    let mut up = Vec::with_capacity(levels);
    for (k, i) in (0..levels).rev().enumerate() {
        let lw = w.pp("up_blocks").pp(k);
        let mut blocks = Vec::new();
        for j in 0..cfg.blocks[i] {
            for (kk, kind) in cfg.level_config[i].chars().enumerate() {
                let mut c_skip = if i < levels - 1 && j == 0 && kk == 0 {
                    cfg.c_hidden[i]
                } else {
                    0
                };
                if cfg.inject_effnet[i] {
                    c_skip += cfg.c_cond;
                }
                blocks.push(load_block(cfg, &lw.pp(blocks.len()), kind, i, c_skip)?);
            }
        }
        if i > 0 {
            let conv = ConvTranspose2d::load(
                &lw.pp(blocks.len()).pp(1),
                cfg.c_hidden[i],
                cfg.c_hidden[i - 1],
                2,
                2,
                0,
            )?;
            blocks.push(Block::Up(ChannelNorm::load(w, cfg.c_hidden[i]), conv));
        }
        up.push(blocks);
    }
    Ok(up)
}
