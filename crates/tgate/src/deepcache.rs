//! DeepCache, in one place: which steps run the whole UNet, and the deep feature kept between
//! them.
//!
//! Semantics are those of `DeepCache` 0.1.1's `DeepCacheSDHelper` (uniform mode), alone on
//! diffusers' `StableDiffusionPipeline`, and combined with the gate as tgate 1.0.0's
//! `TgateSDDeepCacheLoader(pipe, cache_interval, cache_branch_id)`:
//!
//! * A step is **full** when `(index − start) % interval == 0`, where `index` is the position of
//!   the step's timestep in the schedule (its *first* position: PNDM repeats one) and `start` the
//!   index of the first step since DeepCache was (re)started; every other step is **shallow**.
//! * The branch `cache_branch_id` names a place in the UNet: down block `branch / 3`, layer
//!   `branch % 3`. A shallow step computes `conv_in`, the down blocks above that place (and that
//!   block's layers before it), then jumps to the matching place on the way up — up block
//!   `branch / 3` (counted from the top), from its layer `branch % 3` (counted from its end) on —
//!   and computes the rest of the up path, `conv_norm_out` and `conv_out`. The mid block and
//!   everything deeper return what the last full step computed; of those outputs the only one a
//!   shallow step reads is the feature map entering the up path at that place, so that is the one
//!   tensor kept here (a device tensor, never read back). A branch deeper than the UNet keeps
//!   only the mid block's output; in a UNet without a mid block (BK-SDM-Small and -Tiny, where
//!   DeepCache 0.1.1 itself fails: it wraps the mid block unconditionally) such a branch skips
//!   nothing, and its shallow steps are full ones.
//! * With the gate, DeepCache restarts at steps `gate_step − 1` and `gate_step` (see
//!   [`crate::tgate::Gate::at_gate`]): both are full steps, and the interval counts from the
//!   second. Skipped transformer layers keep their T-GATE caches ([`AttentionCache::skip_blocks`]).
//!
//! [`AttentionCache::skip_blocks`]: crate::tgate::AttentionCache::skip_blocks

use burn::tensor::Tensor;

use crate::error::{Error, Result};

/// The knobs of `DeepCacheSDHelper.set_params` / `TgateSDDeepCacheLoader`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeepCacheConfig {
    /// Every `interval`-th step runs the whole UNet (1: every step, DeepCache off in effect).
    pub interval: usize,
    /// Where the shallow branch ends: down block `branch / 3`, layer `branch % 3` (0: only
    /// `conv_in` and the last up layer run on shallow steps).
    pub branch: usize,
}

impl DeepCacheConfig {
    /// tgate's defaults: `cache_interval = 3`, `cache_branch_id = 0`.
    pub fn tgate_default() -> Self {
        DeepCacheConfig {
            interval: 3,
            branch: 0,
        }
    }

    /// Refuses an interval of 0; a branch id is any number (deeper than the UNet keeps the mid
    /// block's output only, as DeepCache does).
    pub fn validate(&self) -> Result<()> {
        if self.interval == 0 {
            return Err(Error::param("deepcache_interval", "must be at least 1"));
        }
        if self.branch > 3 * 64 {
            return Err(Error::param(
                "deepcache_branch",
                format!("must be at most {}, got {}", 3 * 64, self.branch),
            ));
        }
        Ok(())
    }

    /// The down block and the layer the branch names.
    pub fn place(&self) -> (usize, usize) {
        (self.branch / 3, self.branch % 3)
    }
}

/// Where, in a UNet of given shape, a branch's shallow path leaves the down path and enters the
/// up path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchPlace {
    /// Down blocks computed whole.
    pub full_down_blocks: usize,
    /// Layers computed in the next down block (no downsampler); `None` when every down block is
    /// computed whole.
    pub partial_down_layers: Option<usize>,
    /// The up block (index in the up path) the shallow path resumes in.
    pub up_block: usize,
    /// Its first layer computed on shallow steps.
    pub up_layer: usize,
}

impl BranchPlace {
    /// `layers_per_block[level]` of the UNet's down blocks (its up blocks have one more).
    pub fn new(config: &DeepCacheConfig, layers_per_block: &[usize]) -> Self {
        let n = layers_per_block.len();
        let (block, layer) = config.place();
        if block >= n {
            return BranchPlace {
                full_down_blocks: n,
                partial_down_layers: None,
                up_block: 0,
                up_layer: 0,
            };
        }
        let lp = layers_per_block[block];
        BranchPlace {
            full_down_blocks: block,
            partial_down_layers: Some(layer.min(lp)),
            up_block: n - 1 - block,
            // Up block layers count from its end: layer `l` from the end is index `lp − l`.
            up_layer: lp.saturating_sub(layer),
        }
    }
}

/// What the UNet does in one call under DeepCache.
#[derive(Debug)]
pub enum DeepStep<'a> {
    /// Compute everything and keep the feature entering the up path at `place`.
    Full {
        place: BranchPlace,
        keep: &'a mut Option<Tensor<4>>,
    },
    /// Compute the shallow branch only, entering the up path at `place` with `feature`.
    Shallow {
        place: BranchPlace,
        feature: Tensor<4>,
    },
}

/// DeepCache's state over one generation.
#[derive(Debug)]
pub struct DeepCache {
    config: DeepCacheConfig,
    /// The schedule's timestep index where the interval counts from (`None`: the next step).
    start: Option<usize>,
    /// The feature entering the up path at the branch's place, from the last full step.
    feature: Option<Tensor<4>>,
}

impl DeepCache {
    pub fn new(config: DeepCacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(DeepCache {
            config,
            start: None,
            feature: None,
        })
    }

    pub fn config(&self) -> &DeepCacheConfig {
        &self.config
    }

    /// Drops the kept feature; the next step is full and the interval counts from it (tgate's
    /// `deepcache.disable(); deepcache.enable()`).
    pub fn restart(&mut self) {
        self.start = None;
        self.feature = None;
    }

    /// Whether the step at timestep index `index` is shallow (a full step otherwise).
    pub fn is_shallow(&mut self, index: usize) -> bool {
        let start = *self.start.get_or_insert(index);
        let full = index.saturating_sub(start) % self.config.interval == 0;
        !full && self.feature.is_some()
    }

    /// The UNet's instructions for the step at timestep index `index` (see [`Self::is_shallow`]);
    /// `batch` is the step's batch: a kept feature of another batch is not used.
    pub fn step(&mut self, index: usize, place: BranchPlace, batch: usize) -> DeepStep<'_> {
        let shallow = self.is_shallow(index);
        match &self.feature {
            Some(feature) if shallow && feature.dims()[0] == batch => DeepStep::Shallow {
                place,
                feature: feature.clone(),
            },
            _ => DeepStep::Full {
                place,
                keep: &mut self.feature,
            },
        }
    }

    /// Number of device tensors held (0 or 1).
    pub fn entries(&self) -> usize {
        usize::from(self.feature.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_follow_deepcache_numbering() {
        let place = |branch, lpb: &[usize]| {
            BranchPlace::new(
                &DeepCacheConfig {
                    interval: 3,
                    branch,
                },
                lpb,
            )
        };
        // Branch 0: nothing of the down path, the last layer of the last up block.
        assert_eq!(
            place(0, &[2, 2, 2]),
            BranchPlace {
                full_down_blocks: 0,
                partial_down_layers: Some(0),
                up_block: 2,
                up_layer: 2
            }
        );
        // Branch 4: block 0 whole, one layer of block 1; up block 1 from its layer 1.
        assert_eq!(
            place(4, &[2, 2, 2]),
            BranchPlace {
                full_down_blocks: 1,
                partial_down_layers: Some(1),
                up_block: 1,
                up_layer: 1
            }
        );
        // Branch 8 on three levels: every layer of the deepest block; only the mid block is kept.
        assert_eq!(
            place(8, &[2, 2, 2]),
            BranchPlace {
                full_down_blocks: 2,
                partial_down_layers: Some(2),
                up_block: 0,
                up_layer: 0
            }
        );
        assert_eq!(place(30, &[2, 2, 2]).up_block, 0);
        // One layer per block (BK-SDM): layer 2 is past the block's layers.
        assert_eq!(
            place(2, &[1, 1]),
            BranchPlace {
                full_down_blocks: 0,
                partial_down_layers: Some(1),
                up_block: 1,
                up_layer: 0
            }
        );
    }

    #[test]
    fn full_steps_every_interval_from_each_restart() {
        let mut dc = DeepCache::new(DeepCacheConfig {
            interval: 3,
            branch: 0,
        })
        .unwrap();
        let mut full = Vec::new();
        for i in 0..8 {
            if i == 2 || i == 3 {
                dc.restart();
            }
            let shallow = dc.is_shallow(i);
            if !shallow {
                dc.feature = Some(Tensor::zeros([1, 1, 1, 1], &burn::tensor::Device::flex()));
            }
            full.push(!shallow);
        }
        assert_eq!(full, [true, false, true, true, false, false, true, false]);
        assert!(DeepCache::new(DeepCacheConfig {
            interval: 0,
            branch: 0
        })
        .is_err());
    }
}
