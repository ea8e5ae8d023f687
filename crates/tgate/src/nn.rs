//! The few layers every model part is built from, bound to PyTorch key names
//! (`weight`, `bias`) and PyTorch semantics (Linear weights are `[out, in]` in the file).

use burn::tensor::module::{attention as sdpa, conv2d, layer_norm};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{activation, Bool, Int, Tensor};

use crate::error::Result;
use crate::weights::Weights;

std::thread_local! {
    static MACS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Multiply-accumulates issued by this thread's linear, convolution and attention layers since
/// the last [`reset_macs`] (an analytic count of the work, for benchmarks; not a timing).
pub fn macs() -> u64 {
    MACS.with(|m| m.get())
}

/// Resets the counter read by [`macs`].
pub fn reset_macs() {
    MACS.with(|m| m.set(0));
}

fn add_macs(n: usize) {
    MACS.with(|m| m.set(m.get().wrapping_add(n as u64)));
}

/// `torch.nn.Linear`; the weight is kept transposed (`[in, out]`) for a plain matmul.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(w: &Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let host = w.get_host("weight", &[d_out, d_in])?;
        let mut t = vec![0f32; host.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                t[i * d_out + o] = host[o * d_in + i];
            }
        }
        let weight = w.upload(t, [d_in, d_out]);
        let bias = if bias {
            Some(w.get("bias", [d_out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let [d_in, d_out] = self.weight.dims();
        add_macs(x.shape().num_elements() / d_in.max(1) * d_in * d_out);
        burn::tensor::module::linear(x, self.weight.clone(), self.bias.clone())
    }
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding and no dilation.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn load(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = w.get("weight", [c_out, c_in, kernel, kernel])?;
        let bias = Some(w.get("bias", [c_out])?);
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// `[b, c_in, h, w] -> [b, c_out, h', w']`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        let out = conv2d(x, self.weight.clone(), self.bias.clone(), options);
        let [_, c_in, k, _] = self.weight.dims();
        add_macs(out.shape().num_elements() * c_in * k * k);
        out
    }
}

/// `torch.nn.GroupNorm` (affine), statistics over each group of channels × pixels.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(crate::Error::param(
                "norm_num_groups",
                format!("{channels} channels cannot be split into {groups} groups"),
            ));
        }
        Ok(GroupNorm {
            gamma: w.get("weight", [channels])?,
            beta: w.get("bias", [channels])?,
            groups,
            eps,
        })
    }

    /// Normalises `[b, c, ...]` (any rank ≥ 3).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let grouped: Tensor<3> = x.reshape([b as i64, self.groups as i64, -1]);
        let mean = grouped.clone().mean_dim(2);
        let centered = grouped - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = centered / var.add_scalar(self.eps).sqrt();
        let mut affine = [1usize; D];
        affine[1] = c;
        normed.reshape(dims) * self.gamma.clone().reshape(affine)
            + self.beta.clone().reshape(affine)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            gamma: w.get("weight", [dim])?,
            beta: w.get("bias", [dim])?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.gamma.clone(), Some(self.beta.clone()), self.eps)
    }
}

/// `torch.nn.Embedding`.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor<2>,
}

impl Embedding {
    pub fn load(w: &Weights, count: usize, dim: usize) -> Result<Self> {
        Ok(Embedding {
            weight: w.get("weight", [count, dim])?,
        })
    }

    /// `[b, n]` ids -> `[b, n, dim]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        burn::tensor::module::embedding(self.weight.clone(), ids)
    }

    pub fn weight(&self) -> Tensor<2> {
        self.weight.clone()
    }
}

/// Activation functions named as in transformers / diffusers configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Gelu,
    QuickGelu,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "quick_gelu" => Some(Activation::QuickGelu),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }

    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Gelu => activation::gelu(x),
            Activation::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
            Activation::Silu => activation::silu(x),
        }
    }
}

/// Multi-head scaled dot-product attention on `[b, n, heads * d]` projections.
///
/// `mask` (`[b, 1, n_q, n_k]`-broadcastable, true = masked) and `causal` follow PyTorch's SDPA.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
) -> Tensor<3> {
    let [b, n_q, inner] = q.dims();
    let n_k = k.dims()[1];
    let d = inner / heads;
    add_macs(2 * b * n_q * n_k * inner);
    let split = |t: Tensor<3>, n: usize| t.reshape([b, n, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n_q), split(k, n_k), split(v, n_k));
    let mask = mask.map(|m| m.expand([b, heads, n_q, n_k]));
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    let out = sdpa(q, k, v, mask, None, options);
    out.swap_dims(1, 2).reshape([b, n_q, inner])
}
