//! T-GATE, in one place: the gate schedule, the per-layer caches and the guidance decision.
//!
//! Semantics are those of the `tgate` 1.0.0 package (`TgateSDLoader` / `pipe.tgate(...)`):
//!
//! * Steps are counted as `cur = i - num_warmup_steps`, where `num_warmup_steps =
//!   len(timesteps) - steps * order` (1 for PNDM, whose PLMS schedule repeats a timestep; 0 for
//!   the others). The schedule is re-registered only at iterations where diffusers' progress bar
//!   advances (`i == last` or `i + 1 > num_warmup_steps && (i + 1) % order == 0`); otherwise the
//!   previous registration stays (before the first one, everything is computed).
//! * Classifier-free guidance runs two batches while `cur < gate_step`, one batch afterwards.
//! * Cross-attention: computed before `gate_step - 1`; at `cur == gate_step - 1` each layer
//!   stores the mean of its unconditional and conditional outputs; afterwards it returns the cache.
//! * Self-attention (the cache schedule `sp_interval`, `fi_interval`, `warm_up`): before the gate
//!   it is computed while `cur < warm_up`, stored at `cur == warm_up` and whenever
//!   `cur % sp_interval == 0`, reused otherwise; at the gate step it stores the batch mean; after
//!   it, it is stored when `cur % fi_interval == 0` and reused otherwise.
//!   `sp_interval = fi_interval = 1, warm_up = 0` is the original T-GATE.
//!
//! The caches are device tensors and are never read back to the host.

use burn::tensor::Tensor;

use crate::error::{Error, Result};

/// What one attention layer does in the current step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Compute, leave the cache as it is.
    Compute,
    /// Compute and store the output.
    Store,
    /// Compute and store the mean of the two guidance halves (the gate step).
    StoreMean,
    /// Return the stored output (compute if nothing is stored yet).
    Reuse,
}

/// The two phases of a gated generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Cross-attention is computed; guidance runs two batches.
    SemanticsPlanning,
    /// Cross-attention comes from the cache; one batch.
    FidelityImproving,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::SemanticsPlanning => "semantics-planning",
            Phase::FidelityImproving => "fidelity-improving",
        }
    }
}

/// The knobs of `pipe.tgate(...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Steps of the semantics-planning phase (cross-attention is cached at step `gate_step - 1`).
    pub gate_step: usize,
    /// Self-attention refresh interval before the gate.
    pub sp_interval: usize,
    /// Self-attention refresh interval after the gate.
    pub fi_interval: usize,
    /// Steps at the start that never use the self-attention cache.
    pub warm_up: usize,
}

impl GateConfig {
    /// The original T-GATE: only cross-attention is gated.
    pub fn original(gate_step: usize) -> Self {
        GateConfig {
            gate_step,
            sp_interval: 1,
            fi_interval: 1,
            warm_up: 0,
        }
    }

    /// The paper's default gate step for `steps` steps: round(0.4 × steps) (10 of 25).
    pub fn default_gate_step(steps: usize) -> usize {
        ((steps as f64) * 0.4).round().max(1.0) as usize
    }

    /// Refuses impossible settings for a run of `steps` steps.
    pub fn validate(&self, steps: usize) -> Result<()> {
        if self.gate_step == 0 || self.gate_step > steps {
            return Err(Error::param(
                "gate_step",
                format!(
                    "must be in 1..={steps} (the number of steps), got {}",
                    self.gate_step
                ),
            ));
        }
        if self.sp_interval == 0 {
            return Err(Error::param("sp_interval", "must be at least 1"));
        }
        if self.fi_interval == 0 {
            return Err(Error::param("fi_interval", "must be at least 1"));
        }
        Ok(())
    }

    /// tgate's `tgate_scheduler(cur_step)` (cross-attention mode, self-attention mode), except
    /// that a self-attention output is kept only when a later step can reuse it (with an
    /// interval of 1 nothing is reused): the same results with less memory held.
    pub fn modes(&self, cur: usize) -> (CacheMode, CacheMode) {
        let (cross, sa) = self.tgate_modes(cur);
        // Before the gate a stored output can only be reused before the gate (the gate step
        // overwrites it); from the gate step on, only after it.
        let reusable = if cur + 1 < self.gate_step {
            self.sp_interval > 1
        } else {
            self.fi_interval > 1
        };
        let sa = match sa {
            CacheMode::Store | CacheMode::StoreMean if !reusable => CacheMode::Compute,
            other => other,
        };
        (cross, sa)
    }

    /// tgate 1.0.0's `tgate_scheduler(cur_step)` as written.
    fn tgate_modes(&self, cur: usize) -> (CacheMode, CacheMode) {
        if cur + 1 < self.gate_step {
            let sa = if cur < self.warm_up {
                CacheMode::Compute
            } else if cur == self.warm_up || cur % self.sp_interval == 0 {
                CacheMode::Store
            } else {
                CacheMode::Reuse
            };
            (CacheMode::Compute, sa)
        } else if cur + 1 == self.gate_step {
            (CacheMode::StoreMean, CacheMode::StoreMean)
        } else {
            let sa = if cur % self.fi_interval == 0 {
                CacheMode::Store
            } else {
                CacheMode::Reuse
            };
            (CacheMode::Reuse, sa)
        }
    }
}

/// Per-layer caches of one generation, addressed by the order in which the model visits its
/// attention layers (the same every step).
///
/// Besides the gate's outputs it keeps, per cross-attention layer, the keys and values of the
/// text (`to_k` / `to_v` of the prompt embeddings): they are the same at every step of a
/// generation, so each layer projects them once per batch size (2 with guidance, 1 without) and
/// then reuses them; once a layer serves its gated output, its keys and values are dropped.
#[derive(Clone, Debug, Default)]
pub struct AttentionCache {
    cross: Vec<Option<Tensor<3>>>,
    self_attn: Vec<Option<Tensor<3>>>,
    /// Per cross-attention layer (SD) or Stage C / Stage B attention block: (batch, keys,
    /// values) of the text.
    text_kv: Vec<Option<(usize, Tensor<3>, Tensor<3>)>>,
    cross_mode: Option<CacheMode>,
    self_mode: Option<CacheMode>,
    cross_cursor: usize,
    self_cursor: usize,
}

impl AttentionCache {
    /// No gating: every layer computes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every cached tensor.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Sets the modes for the next model call and rewinds the layer cursors.
    pub fn begin(&mut self, cross: CacheMode, self_attn: CacheMode) {
        self.cross_mode = Some(cross);
        self.self_mode = Some(self_attn);
        self.cross_cursor = 0;
        self.self_cursor = 0;
    }

    /// Passes over `blocks` transformer blocks that do not run in this call (the deep layers
    /// DeepCache skips): each has one self- and one cross-attention slot, whose caches stay.
    pub fn skip_blocks(&mut self, blocks: usize) {
        self.self_cursor += blocks;
        self.cross_cursor += blocks;
    }

    /// Number of cross-attention tensors held (for tests and reports).
    pub fn cross_entries(&self) -> usize {
        self.cross.iter().flatten().count()
    }

    /// Runs (or skips) the next self-attention layer.
    pub fn self_attention(&mut self, compute: impl FnOnce() -> Tensor<3>) -> Tensor<3> {
        let slot = self.self_cursor;
        self.self_cursor += 1;
        apply(
            &mut self.self_attn,
            slot,
            self.self_mode.unwrap_or(CacheMode::Compute),
            compute,
        )
    }

    /// Runs (or skips) the next cross-attention layer whose keys and values come from the text
    /// alone: `kv` projects them (called once per generation and batch size `batch`), `attend`
    /// computes the layer from them.
    pub fn cross_attention_text(
        &mut self,
        batch: usize,
        kv: impl FnOnce() -> (Tensor<3>, Tensor<3>),
        attend: impl FnOnce(Tensor<3>, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let slot = self.cross_cursor;
        if self.cross_mode == Some(CacheMode::Reuse) {
            if let Some(Some(gated)) = self.cross.get(slot) {
                // From here on the gated output is returned: the text is no longer needed.
                let out = gated.clone();
                self.drop_text_kv(slot);
                self.cross_cursor += 1;
                return out;
            }
        }
        let (k, v) = self.text_keys_values(slot, batch, kv);
        self.cross_attention(|| attend(k, v))
    }

    /// The text's keys and values of layer `slot` at batch size `batch`: projected by `kv` the
    /// first time, kept on the device for the next steps.
    fn text_keys_values(
        &mut self,
        slot: usize,
        batch: usize,
        kv: impl FnOnce() -> (Tensor<3>, Tensor<3>),
    ) -> (Tensor<3>, Tensor<3>) {
        if self.text_kv.len() <= slot {
            self.text_kv.resize(slot + 1, None);
        }
        match &self.text_kv[slot] {
            Some((b, k, v)) if *b == batch => (k.clone(), v.clone()),
            _ => {
                let (k, v) = kv();
                self.text_kv[slot] = Some((batch, k.clone(), v.clone()));
                (k, v)
            }
        }
    }

    fn drop_text_kv(&mut self, slot: usize) {
        if let Some(entry) = self.text_kv.get_mut(slot) {
            *entry = None;
        }
    }

    /// Number of text key/value pairs held (for tests and reports).
    pub fn text_kv_entries(&self) -> usize {
        self.text_kv.iter().flatten().count()
    }

    /// Runs (or skips) the next cross-attention layer.
    pub fn cross_attention(&mut self, compute: impl FnOnce() -> Tensor<3>) -> Tensor<3> {
        let slot = self.cross_cursor;
        self.cross_cursor += 1;
        apply(
            &mut self.cross,
            slot,
            self.cross_mode.unwrap_or(CacheMode::Compute),
            compute,
        )
    }
}

impl AttentionCache {
    /// Runs (or gates) the next Würstchen Stage C attention block, whose keys and values are the
    /// image tokens followed by the text tokens (there is no separate cross-attention there).
    ///
    /// `with_text(k_text, v_text)` is the block's attention over `[image, text]` given the
    /// text's keys and values, `image_only` the same attention over the image tokens alone.
    /// The text is the same at every step, so `text_kv` (its mapping and key/value
    /// projections, at batch size `batch`) runs once per generation and batch size; its result
    /// stays on the device until the block serves its gated output. Under the cross-attention
    /// schedule: before the gate step `with_text` is computed; at the gate step (`StoreMean`)
    /// both are, and the difference δ = with_text − image_only, averaged over the two guidance
    /// halves, is kept on the device; after it (`Reuse`) the block returns `image_only + δ`.
    pub fn text_kv_attention(
        &mut self,
        batch: usize,
        text_kv: impl FnOnce() -> (Tensor<3>, Tensor<3>),
        with_text: impl FnOnce(Tensor<3>, Tensor<3>) -> Tensor<3>,
        image_only: impl FnOnce() -> Tensor<3>,
    ) -> Tensor<3> {
        let slot = self.cross_cursor;
        self.cross_cursor += 1;
        if self.cross.len() <= slot {
            self.cross.resize(slot + 1, None);
        }
        let mode = self.cross_mode.unwrap_or(CacheMode::Compute);
        if mode == CacheMode::Reuse {
            if let Some(delta) = self.cross[slot].clone() {
                self.drop_text_kv(slot);
                return image_only() + delta;
            }
        }
        let (k, v) = self.text_keys_values(slot, batch, text_kv);
        let out = with_text(k, v);
        if mode == CacheMode::StoreMean {
            let delta = out.clone() - image_only();
            self.cross[slot] = Some(batch_half_mean(delta));
        }
        out
    }
}

fn apply(
    slots: &mut Vec<Option<Tensor<3>>>,
    slot: usize,
    mode: CacheMode,
    compute: impl FnOnce() -> Tensor<3>,
) -> Tensor<3> {
    if slots.len() <= slot {
        slots.resize(slot + 1, None);
    }
    if mode == CacheMode::Reuse {
        if let Some(cached) = &slots[slot] {
            return cached.clone();
        }
    }
    let out = compute();
    match mode {
        CacheMode::Store => slots[slot] = Some(out.clone()),
        CacheMode::StoreMean => slots[slot] = Some(batch_half_mean(out.clone())),
        CacheMode::Compute | CacheMode::Reuse => {}
    }
    out
}

/// `(uncond + cond) / 2` over the two halves of the batch; a single batch is kept as is.
fn batch_half_mean(x: Tensor<3>) -> Tensor<3> {
    let b = x.dims()[0];
    if b < 2 || b % 2 != 0 {
        return x;
    }
    let half = b / 2;
    (x.clone().narrow(0, 0, half) + x.narrow(0, half, half)).div_scalar(2.0)
}

/// What the pipeline does at one iteration of the denoising loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Run the unconditional and conditional batches and combine them.
    pub guidance: bool,
    pub phase: Phase,
}

/// The gate of one generation: its schedule state and its caches.
#[derive(Debug)]
pub struct Gate {
    config: Option<GateConfig>,
    num_warmup: usize,
    order: usize,
    iterations: usize,
    modes: (CacheMode, CacheMode),
    cache: AttentionCache,
}

impl Gate {
    /// A gate for `iterations` loop iterations of a scheduler with `steps` inference steps and
    /// diffusers order `order`. `config = None` disables gating (plain diffusers behaviour).
    pub fn new(
        config: Option<GateConfig>,
        steps: usize,
        iterations: usize,
        order: usize,
    ) -> Result<Self> {
        if let Some(c) = &config {
            c.validate(steps)?;
        }
        let order = order.max(1);
        Ok(Gate {
            config,
            num_warmup: iterations.saturating_sub(steps * order),
            order,
            iterations,
            modes: (CacheMode::Compute, CacheMode::Compute),
            cache: AttentionCache::new(),
        })
    }

    /// Prepares iteration `i`: updates the layer modes and says whether guidance runs two batches.
    pub fn begin_iteration(&mut self, i: usize, wants_guidance: bool) -> StepPlan {
        let Some(config) = self.config else {
            self.cache.begin(CacheMode::Compute, CacheMode::Compute);
            return StepPlan {
                guidance: wants_guidance,
                phase: Phase::SemanticsPlanning,
            };
        };
        let cur = i as i64 - self.num_warmup as i64;
        let registers =
            i + 1 == self.iterations || ((i + 1) > self.num_warmup && (i + 1) % self.order == 0);
        if registers && cur >= 0 {
            self.modes = config.modes(cur as usize);
        }
        self.cache.begin(self.modes.0, self.modes.1);
        let planning = cur < config.gate_step as i64;
        StepPlan {
            guidance: wants_guidance && planning,
            phase: if planning {
                Phase::SemanticsPlanning
            } else {
                Phase::FidelityImproving
            },
        }
    }

    /// Whether iteration `i` is the gate step or the one before it (`cur == gate_step - 1` or
    /// `cur == gate_step`), where tgate's DeepCache pipeline restarts DeepCache: the
    /// cross-attention cache is taken over the whole model at the first, and the batch halves at
    /// the second. Never without a gate.
    pub fn at_gate(&self, i: usize) -> bool {
        let Some(config) = self.config else {
            return false;
        };
        let cur = i as i64 - self.num_warmup as i64;
        cur == config.gate_step as i64 - 1 || cur == config.gate_step as i64
    }

    /// The caches the model reads and writes during the current iteration.
    pub fn cache(&mut self) -> &mut AttentionCache {
        &mut self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CacheMode::*;

    #[test]
    fn original_schedule() {
        let g = GateConfig::original(3);
        assert_eq!(g.tgate_modes(0), (Compute, Store));
        assert_eq!(g.tgate_modes(1), (Compute, Store));
        assert_eq!(g.tgate_modes(2), (StoreMean, StoreMean));
        assert_eq!(g.tgate_modes(3), (Reuse, Store));
        // With intervals of 1 self-attention is never reused, so nothing is kept.
        assert_eq!(g.modes(1), (Compute, Compute));
        assert_eq!(g.modes(2), (StoreMean, Compute));
        assert_eq!(g.modes(3), (Reuse, Compute));
    }

    #[test]
    fn self_attention_schedule() {
        let g = GateConfig {
            gate_step: 6,
            sp_interval: 2,
            fi_interval: 2,
            warm_up: 1,
        };
        let sa: Vec<_> = (0..9).map(|c| g.tgate_modes(c).1).collect();
        assert_eq!(
            sa,
            [Compute, Store, Store, Reuse, Store, StoreMean, Store, Reuse, Store]
        );
    }

    /// The text keys and values are projected once per layer and batch size, and dropped once
    /// the gated output is served.
    #[test]
    fn text_keys_and_values_are_projected_once() {
        let device = burn::tensor::Device::flex();
        let t = |b: usize| Tensor::<3>::zeros([b, 2, 3], &device);
        let mut cache = AttentionCache::new();
        let mut projections = 0;
        let layer = |cache: &mut AttentionCache, b: usize, projections: &mut usize| {
            cache.cross_attention_text(
                b,
                || {
                    *projections += 1;
                    (t(b), t(b))
                },
                |k, _| k,
            )
        };
        for (mode, batch) in [(Compute, 2), (Compute, 2), (StoreMean, 2)] {
            cache.begin(mode, Compute);
            layer(&mut cache, batch, &mut projections);
            layer(&mut cache, batch, &mut projections);
        }
        assert_eq!(projections, 2, "two layers, once each");
        assert_eq!(cache.text_kv_entries(), 2);
        // A batch-1 call without a gated output (e.g. the gate off) projects again.
        cache.begin(Compute, Compute);
        layer(&mut cache, 1, &mut projections);
        assert_eq!(projections, 3);
        // Served from the gate: nothing projected, the text dropped.
        cache.begin(Reuse, Compute);
        let out = layer(&mut cache, 1, &mut projections);
        layer(&mut cache, 1, &mut projections);
        assert_eq!(projections, 3);
        assert_eq!(
            out.dims(),
            [1, 2, 3],
            "the batch mean kept at the gate step"
        );
        assert_eq!(cache.text_kv_entries(), 0);
    }

    /// Stage C's blocks: the text's keys and values are projected once per block and batch
    /// size, the gated output is `image_only + δ` (δ the batch mean of with_text − image_only at
    /// the gate step), and the text is dropped once δ is served.
    #[test]
    fn text_kv_attention_projects_the_text_once() {
        let device = burn::tensor::Device::flex();
        let filled = |b: usize, v: f32| Tensor::<3>::full([b, 2, 3], v, &device);
        let mut cache = AttentionCache::new();
        let mut projections = 0;
        // with_text = image_only + k_text, so δ is the text's keys; the halves differ.
        let block = |cache: &mut AttentionCache, b: usize, projections: &mut usize| {
            cache.text_kv_attention(
                b,
                || {
                    *projections += 1;
                    let k = Tensor::cat(vec![filled(1, 1.0), filled(b - 1, 3.0)], 0);
                    (k, filled(b, 0.0))
                },
                |k, _| filled(b, 10.0) + k,
                || filled(b, 10.0),
            )
        };
        for mode in [Compute, Compute, StoreMean] {
            cache.begin(mode, Compute);
            block(&mut cache, 2, &mut projections);
            block(&mut cache, 2, &mut projections);
        }
        assert_eq!(projections, 2, "two blocks, once each");
        assert_eq!(cache.text_kv_entries(), 2);
        cache.begin(Reuse, Compute);
        let gated = block(&mut cache, 1, &mut projections);
        assert_eq!(projections, 2, "served from δ: nothing projected");
        let values = gated.into_data().try_to_vec::<f32>().unwrap();
        assert!(
            values.iter().all(|v| *v == 12.0),
            "10 + mean(1, 3): {values:?}"
        );
        assert_eq!(
            cache.text_kv_entries(),
            1,
            "the served block's text dropped"
        );
    }

    #[test]
    fn pndm_offset_and_validation() {
        // PNDM: 9 iterations for 8 steps, so iteration 0 keeps the initial registration.
        let mut gate = Gate::new(Some(GateConfig::original(3)), 8, 9, 1).unwrap();
        let plans: Vec<_> = (0..9)
            .map(|i| gate.begin_iteration(i, true).guidance)
            .collect();
        assert_eq!(
            plans,
            [true, true, true, true, false, false, false, false, false]
        );
        assert!(Gate::new(Some(GateConfig::original(9)), 8, 8, 1).is_err());
        assert!(Gate::new(Some(GateConfig::original(0)), 8, 8, 1).is_err());
        assert_eq!(GateConfig::default_gate_step(25), 10);
    }
}
