//! diffusers' `Attention` (to_q / to_k / to_v / to_out.0), `FeedForward` with GEGLU, and
//! `BasicTransformerBlock`, whose two attention calls go through the T-GATE caches.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::nn::{multi_head_attention, multi_head_attention_joined, Activation, LayerNorm, Linear};
use crate::tgate::AttentionCache;
use crate::weights::Weights;

/// Key names of the four projections; old VAE checkpoints use `query`/`key`/`value`/`proj_attn`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionKeys {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub out: &'static str,
}

impl AttentionKeys {
    pub const CURRENT: AttentionKeys = AttentionKeys {
        q: "to_q",
        k: "to_k",
        v: "to_v",
        out: "to_out.0",
    };
    pub const LEGACY: AttentionKeys = AttentionKeys {
        q: "query",
        k: "key",
        v: "value",
        out: "proj_attn",
    };
}

/// The query, key and value projections.
#[derive(Clone, Debug)]
enum Projections {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// `[to_q | to_k | to_v]` as one linear, for layers that only ever attend to themselves
    /// (`Attention::load_self`): one matmul per call instead of three, read as three views.
    Joined {
        qkv: Linear,
        inner: usize,
    },
}

/// Multi-head attention with input projections and an output projection.
#[derive(Clone, Debug)]
pub struct Attention {
    projections: Projections,
    to_out: Linear,
    heads: usize,
    /// Score matrices bigger than this are split by query rows (the device's binding limit).
    max_score_bytes: Option<u64>,
}

impl Attention {
    /// `query_dim` → `heads × head_dim`; keys/values come from `context_dim` features.
    pub fn load(
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        keys: AttentionKeys,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let projections = Projections::Separate {
            q: Linear::load(&w.pp(keys.q), query_dim, inner, qkv_bias)?,
            k: Linear::load(&w.pp(keys.k), context_dim, inner, qkv_bias)?,
            v: Linear::load(&w.pp(keys.v), context_dim, inner, qkv_bias)?,
        };
        Self::with_projections(w, projections, query_dim, heads, inner, keys)
    }

    /// The layer around loaded projections: the output projection and the limits.
    fn with_projections(
        w: &Weights,
        projections: Projections,
        query_dim: usize,
        heads: usize,
        inner: usize,
        keys: AttentionKeys,
    ) -> Result<Self> {
        Ok(Attention {
            projections,
            to_out: Linear::load(&w.pp(keys.out), inner, query_dim, true)?,
            heads,
            max_score_bytes: w.max_tensor_bytes(),
        })
    }

    /// A layer whose queries, keys and values project the same tokens (self-attention,
    /// `forward(x, None)`, or [`Self::query_key_value`]): its three projections run as one
    /// matmul whose output the attention reads as three strided views (separate when the
    /// joined weight would not fit the device's largest buffer). Keys and values of other
    /// tokens ([`Self::key_value`]) then come from the same matmul, the query part unused.
    pub fn load_self(
        w: &Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        keys: AttentionKeys,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let parts = [w.pp(keys.q), w.pp(keys.k), w.pp(keys.v)];
        match Linear::load_joined(&parts, dim, inner, qkv_bias)? {
            Some(qkv) => {
                let projections = Projections::Joined { qkv, inner };
                Self::with_projections(w, projections, dim, heads, inner, keys)
            }
            None => Self::load(w, dim, dim, heads, head_dim, qkv_bias, keys),
        }
    }

    /// `x: [b, n, query_dim]`, `context: [b, m, context_dim]` (self-attention when `None`).
    pub fn forward(&self, x: Tensor<3>, context: Option<&Tensor<3>>) -> Tensor<3> {
        if let (Projections::Joined { qkv, inner }, None) = (&self.projections, context) {
            let h = qkv.forward(x);
            let part = |i: usize| h.clone().narrow(2, i * inner, *inner);
            return self.attend(part(0), part(1), part(2));
        }
        let context = context.cloned().unwrap_or_else(|| x.clone());
        let (k, v) = self.key_value(context);
        self.attend(self.query(x), k, v)
    }

    /// The query, key and value projections of the same tokens (one matmul read as three
    /// views where the projections are joined).
    pub fn query_key_value(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        match &self.projections {
            Projections::Separate { q, .. } => {
                let (k, v) = self.key_value(x.clone());
                (q.forward(x), k, v)
            }
            Projections::Joined { qkv, inner } => {
                let h = qkv.forward(x);
                let part = |i: usize| h.clone().narrow(2, i * inner, *inner);
                (part(0), part(1), part(2))
            }
        }
    }

    /// The query projection alone (for callers that share projections between attention calls).
    pub fn query(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.projections {
            Projections::Separate { q, .. } => q.forward(x),
            Projections::Joined { qkv, inner } => qkv.forward(x).narrow(2, 0, *inner),
        }
    }

    /// The key and value projections of `context`.
    pub fn key_value(&self, context: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        match &self.projections {
            Projections::Separate { k, v, .. } => (k.forward(context.clone()), v.forward(context)),
            Projections::Joined { qkv, inner } => {
                let h = qkv.forward(context);
                (
                    h.clone().narrow(2, *inner, *inner),
                    h.narrow(2, 2 * inner, *inner),
                )
            }
        }
    }

    /// Attention over already projected `q`, `k`, `v`, then the output projection.
    pub fn attend(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        self.to_out.forward(multi_head_attention(
            q,
            k,
            v,
            self.heads,
            None,
            false,
            self.max_score_bytes,
        ))
    }

    /// [`Attention::attend`] over the keys and values `kv` followed by `kv2`, as over their
    /// concatenation ([`multi_head_attention_joined`]: on a GPU, never made).
    pub fn attend_joined(
        &self,
        q: Tensor<3>,
        kv: (Tensor<3>, Tensor<3>),
        kv2: (Tensor<3>, Tensor<3>),
    ) -> Tensor<3> {
        self.to_out.forward(multi_head_attention_joined(
            q,
            kv,
            kv2,
            self.heads,
            self.max_score_bytes,
        ))
    }
}

/// `FeedForward` with the GEGLU activation (`net.0.proj`, `net.2`).
#[derive(Clone, Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Linear::load(&w.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&w.pp("net.2"), inner, dim, true)?,
        })
    }

    /// `value · gelu(gate)` with the projection's bias added to each half separately, so on a
    /// GPU the bias, GELU and product run as one fused kernel after the matmul.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (value, gate) = self.proj.forward_halves(x);
        self.out.forward(value * Activation::Gelu.forward(gate))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(
        w: &Weights,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
    ) -> Result<Self> {
        let keys = AttentionKeys::CURRENT;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load_self(&w.pp("attn1"), dim, heads, head_dim, false, keys)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, cross_dim, heads, head_dim, false, keys)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
        })
    }

    /// `x: [b, n, dim]`, `context: [b, 77, cross_dim]`. The gate decides whether each attention
    /// is computed or taken from its cache.
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        cache: &mut AttentionCache,
    ) -> Tensor<3> {
        // The norms sit inside the closures, so a layer served from the cache costs nothing.
        let a = cache.self_attention(|| self.attn1.forward(self.norm1.forward(x.clone()), None));
        let x = x + a;
        // The text's keys and values are projected once per generation (see AttentionCache).
        let a = cache.cross_attention_text(
            context.dims()[0],
            || self.attn2.key_value(context.clone()),
            |k, v| {
                self.attn2
                    .attend(self.attn2.query(self.norm2.forward(x.clone())), k, v)
            },
        );
        let x = x + a;
        let h = self.norm3.forward(x.clone());
        x + self.ff.forward(h)
    }
}
