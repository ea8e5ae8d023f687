//! The few layers every model part is built from, bound to PyTorch key names
//! (`weight`, `bias`) and PyTorch semantics (Linear weights are `[out, in]` in the file).

use burn::tensor::module::{attention as sdpa, conv2d, conv_transpose2d, layer_norm};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions, ConvTransposeOptions};
use burn::tensor::{activation, Bool, DType, Device, Int, Tensor};

use crate::error::Result;
use crate::weights::Weights;

std::thread_local! {
    static MACS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static SPLIT_BLOCKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static CUSTOM_KERNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Attention blocks this thread computed because a score matrix was split to fit the buffer
/// limit (see [`multi_head_attention`]); for tests and benchmarks.
pub fn split_attention_blocks() -> u64 {
    SPLIT_BLOCKS.with(|m| m.get())
}

/// Whether GPU devices run tgate's own kernels (`shaders/`: attention, GroupNorm(+SiLU),
/// LayerNorm) and keep convolution weights channels last (decided when a model loads), where
/// they apply (the default), or burn's generic ops everywhere. For benchmarks (before → after in
/// one run) and tests of the generic path; the CPU always runs burn's ops. Per thread.
pub fn set_custom_kernels(on: bool) {
    CUSTOM_KERNELS.with(|c| c.set(on));
}

/// See [`set_custom_kernels`].
pub fn custom_kernels() -> bool {
    CUSTOM_KERNELS.with(|c| c.get())
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

/// One large activation of a model at a given size: what it is and its bytes on the device.
/// Models report their largest one (attention scores excepted: they are split to fit, see
/// [`multi_head_attention`]) so a generation too big for the device's buffers is refused
/// before it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationSize {
    pub what: String,
    pub bytes: u64,
}

impl ActivationSize {
    /// `dims` elements of `bytes_per` bytes each.
    pub fn new(what: impl Into<String>, dims: &[usize], bytes_per: usize) -> Self {
        ActivationSize {
            what: what.into(),
            bytes: dims
                .iter()
                .fold(bytes_per as u64, |n, &d| n.saturating_mul(d as u64)),
        }
    }

    /// The larger of the two (the first on ties).
    pub fn max(self, other: ActivationSize) -> ActivationSize {
        if other.bytes > self.bytes {
            other
        } else {
            self
        }
    }

    /// [`Error::ActivationTooLarge`](crate::Error::ActivationTooLarge) when over `limit`.
    /// Refuses a generation whose largest feature map, held three times at once (a layer's
    /// input and output and the residual beside them), exceeds `budget` bytes of memory.
    pub fn check_memory(&self, budget: Option<u64>, width: usize, height: usize) -> Result<()> {
        let need = self.bytes.saturating_mul(3);
        match budget {
            Some(limit) if need > limit => Err(crate::Error::MemoryTooLarge {
                width,
                height,
                what: self.what.clone(),
                bytes: need,
                limit,
            }),
            _ => Ok(()),
        }
    }

    /// Makes the device's memory pools carve pages that hold this activation, before the work
    /// that needs it: one allocation of its size, dropped at once. A no-op where the device has
    /// no pools (the CPU).
    ///
    /// The pools size their pages to the largest allocation served so far. Left alone, a
    /// generation grows them step by step as its maps grow (SD 1.5 at 512² in f16: 2 → 6 → 16 →
    /// 41 MiB in the text encoder and UNet, then 65 → 128 MiB inside the decoder), and each
    /// growth holds the old pages that still carry live maps beside the new ones. Sized at the
    /// start, while nothing of the generation is live yet, the first generation at a size holds
    /// what the next ones hold. Nothing waits: the allocation is handed to the device's queue
    /// (burn's fusion would otherwise hold it back), where it runs before the generation's work.
    pub fn size_device_pages(&self, device: &Device) -> Result<()> {
        if self.bytes < 4 || device.memory_pool_report().is_none() {
            return Ok(());
        }
        let placeholder =
            Tensor::<1>::empty([self.bytes.div_ceil(4) as usize], (device, DType::F32));
        let flushed = device.flush();
        drop(placeholder);
        flushed.map_err(|e| {
            crate::error::Error::Device(format!(
                "the device refused {} MiB of working memory: {e:?}",
                self.bytes >> 20
            ))
        })
    }

    pub fn check(self, limit: Option<u64>, width: usize, height: usize) -> Result<()> {
        match limit {
            Some(limit) if self.bytes > limit => Err(crate::Error::ActivationTooLarge {
                width,
                height,
                what: self.what,
                bytes: self.bytes,
                limit,
            }),
            _ => Ok(()),
        }
    }
}

/// `torch.nn.Linear`; the weight is kept transposed (`[in, out]`) for a plain matmul.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(w: &Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = w.get_arranged("weight", &[d_out, d_in], [d_in, d_out], |host| {
            let mut t = vec![0f32; host.len()];
            for o in 0..d_out {
                for i in 0..d_in {
                    t[i * d_out + o] = host[o * d_in + i];
                }
            }
            t
        })?;
        let bias = if bias {
            Some(w.get("bias", [d_out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Several linears of the same input as one (`[in, Σ out]`, the parts' outputs side by
    /// side, in order): one matmul instead of one per part. `None` when the joined weight would
    /// exceed the device's largest buffer (the caller keeps the parts).
    pub fn load_joined(
        parts: &[Weights],
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Option<Self>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let n = parts.len();
        let joined_bytes = (d_in * d_out * n * first.dtype().size()) as u64;
        if first
            .max_tensor_bytes()
            .is_some_and(|limit| joined_bytes > limit)
        {
            return Ok(None);
        }
        let width = n * d_out;
        if first.is_placeholder() {
            return Ok(Some(Linear {
                weight: first.zeros([d_in, width]),
                bias: bias.then(|| first.zeros([width])),
            }));
        }
        let mut t = vec![0f32; d_in * width];
        let mut b = Vec::with_capacity(width);
        for (p, w) in parts.iter().enumerate() {
            let host = w.get_host("weight", &[d_out, d_in])?;
            for o in 0..d_out {
                for i in 0..d_in {
                    t[i * width + p * d_out + o] = host[o * d_in + i];
                }
            }
            if bias {
                b.extend(w.get_host("bias", &[d_out])?);
            }
        }
        Ok(Some(Linear {
            weight: first.upload(t, [d_in, width]),
            bias: bias.then(|| first.upload(b, [width])),
        }))
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let [d_in, d_out] = self.weight.dims();
        add_macs(x.shape().num_elements() / d_in.max(1) * d_in * d_out);
        burn::tensor::module::linear(x, self.weight.clone(), self.bias.clone())
    }

    /// Several linears of the same input as one whose outputs lie side by side, in order (their
    /// widths may differ), built on the device from the parts' parameters; the parts can then be
    /// dropped. A part without a bias contributes zeros to the joined bias.
    pub fn join(parts: Vec<Linear>) -> Option<Linear> {
        let first = parts.first()?;
        let device = first.weight.device();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let bias = any_bias.then(|| {
            let dtype = first.weight.dtype();
            Tensor::cat(
                parts
                    .iter()
                    .map(|p| match &p.bias {
                        Some(b) => b.clone(),
                        None => Tensor::<1>::zeros([p.weight.dims()[1]], &device).cast(dtype),
                    })
                    .collect(),
                0,
            )
        });
        let weight = Tensor::cat(parts.into_iter().map(|p| p.weight).collect(), 1);
        Some(Linear { weight, bias })
    }

    /// The same linear with `extra` added to its bias.
    pub fn with_added_bias(self, extra: Option<Tensor<1>>) -> Linear {
        let bias = match (self.bias, extra) {
            (Some(b), Some(e)) => Some(b + e),
            (b, e) => b.or(e),
        };
        Linear {
            weight: self.weight,
            bias,
        }
    }

    /// Width of the output.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Bytes of the weight.
    pub fn weight_bytes(&self) -> u64 {
        (self.weight.shape().num_elements() * self.weight.dtype().size()) as u64
    }

    /// [`Self::forward`] with the output split into its two halves along the last axis, each
    /// given its half of the bias *after* the split. The same values, but on a GPU the bias
    /// additions then fuse with the elementwise work that follows on each half (GEGLU's
    /// `value · gelu(gate)` becomes one kernel) instead of running as a kernel of their own over
    /// the whole output.
    pub fn forward_halves<const D: usize>(&self, x: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
        let [d_in, d_out] = self.weight.dims();
        add_macs(x.shape().num_elements() / d_in.max(1) * d_in * d_out);
        let y = burn::tensor::module::linear(x, self.weight.clone(), None);
        let width = d_out / 2;
        let half = |i: usize| {
            let part = y.clone().narrow(D - 1, i * width, width);
            match &self.bias {
                Some(b) => part + b.clone().narrow(0, i * width, width).unsqueeze::<D>(),
                None => part,
            }
        };
        (half(0), half(1))
    }
}

/// Whether convolution weights are kept channels last: on GPU devices running tgate's kernels
/// (where the convolutions' outputs, and tgate's norms over them, are channels-last maps).
pub(crate) fn channels_last_weights(w: &Weights) -> bool {
    #[cfg(feature = "wgpu")]
    {
        custom_kernels() && tgate_shaders::is_cube_device(w.device())
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = w;
        false
    }
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding, optional groups and no dilation.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv2d {
    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.weight.device()
    }

    pub fn load(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::load_grouped(w, c_in, c_out, kernel, stride, padding, 1)
    }

    /// A grouped convolution (`groups = c_out` for depthwise); the weight is `[c_out, c_in / groups, k, k]`.
    pub fn load_grouped(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Self> {
        if groups == 0 || c_in % groups != 0 || c_out % groups != 0 {
            return Err(crate::Error::param(
                "groups",
                format!("{c_in} → {c_out} channels cannot be split into {groups} groups"),
            ));
        }
        let shape = [c_out, c_in / groups, kernel, kernel];
        let weight = if groups == 1 && channels_last_weights(w) {
            // cubecl's convolutions read channels last (`[out, kh, kw, in]`) and copy any other
            // weight layout at every call: keep it that way, seen as `[out, in, kh, kw]`.
            let (o_n, i_n, kk) = (c_out, c_in, kernel * kernel);
            let last = [c_out, kernel, kernel, c_in];
            w.get_arranged("weight", &shape, last, |host| {
                let mut t = vec![0f32; host.len()];
                for o in 0..o_n {
                    for i in 0..i_n {
                        for p in 0..kk {
                            t[(o * kk + p) * i_n + i] = host[(o * i_n + i) * kk + p];
                        }
                    }
                }
                t
            })?
            .permute([0, 3, 1, 2])
        } else {
            w.get("weight", shape)?
        };
        let bias = Some(w.get("bias", [c_out])?);
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
            groups,
        })
    }

    /// `[b, c_in, h, w] -> [b, c_out, h', w']`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_with_bias(x, self.bias.clone())
    }

    /// Takes the bias out of the layer (its owner then passes one to [`Self::forward_with_bias`]).
    pub fn take_bias(&mut self) -> Option<Tensor<1>> {
        self.bias.take()
    }

    /// The convolution with `bias` (`[c_out]`) in place of the layer's own.
    pub fn forward_with_bias(&self, x: Tensor<4>, bias: Option<Tensor<1>>) -> Tensor<4> {
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], self.groups);
        let out = conv2d(x, self.weight.clone(), bias, options);
        let [_, c_in, k, _] = self.weight.dims();
        add_macs(out.shape().num_elements() * c_in * k * k);
        out
    }
}

/// `torch.nn.ConvTranspose2d` with square kernels, symmetric padding, no groups or dilation.
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    padding: usize,
}

impl ConvTranspose2d {
    /// The weight is `[c_in, c_out, k, k]`, as PyTorch stores it.
    pub fn load(
        w: &Weights,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(ConvTranspose2d {
            weight: w.get("weight", [c_in, c_out, kernel, kernel])?,
            bias: w.get("bias", [c_out])?,
            stride,
            padding,
        })
    }

    /// `[b, c_in, h, w] -> [b, c_out, (h - 1) s - 2p + k, …]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, c_out, k, _] = self.weight.dims();
        add_macs(x.shape().num_elements() * c_out * k * k);
        let options =
            ConvTransposeOptions::new([self.stride; 2], [self.padding; 2], [0, 0], [1, 1], 1);
        conv_transpose2d(x, self.weight.clone(), Some(self.bias.clone()), options)
    }
}

/// LayerNorm without affine parameters over dimension `dim` (PyTorch's biased variance).
///
/// On `[b, c, h, w]` with `dim = 1` this is Würstchen's `WuerstchenLayerNorm` (a LayerNorm over
/// channels applied to the channels-last view), without the two permutes. Computed in f32
/// whatever the activation dtype.
pub fn norm_over<const D: usize>(x: Tensor<D>, dim: usize, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let mean = x.clone().mean_dim(dim);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(dim);
    (centered / var.add_scalar(eps).sqrt()).cast(dtype)
}

/// `torch.nn.PixelUnshuffle(r)`: `[b, c, h·r, w·r] -> [b, c·r², h, w]`.
pub fn pixel_unshuffle(x: Tensor<4>, r: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let (ho, wo) = (h / r, w / r);
    x.reshape([b, c, ho, r, wo, r])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * r * r, ho, wo])
}

/// `torch.nn.PixelShuffle(r)`: `[b, c·r², h, w] -> [b, c, h·r, w·r]`.
pub fn pixel_shuffle(x: Tensor<4>, r: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let co = c / (r * r);
    x.reshape([b, co, r, r, h, w])
        .permute([0, 1, 4, 2, 5, 3])
        .reshape([b, co, h * r, w * r])
}

/// `torch.nn.ReplicationPad2d(1)`: repeats the edge rows and columns once.
pub fn replication_pad1(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let x = Tensor::cat(
        vec![x.clone().narrow(3, 0, 1), x.clone(), x.narrow(3, w - 1, 1)],
        3,
    );
    Tensor::cat(
        vec![x.clone().narrow(2, 0, 1), x.clone(), x.narrow(2, h - 1, 1)],
        2,
    )
}

/// `torch.nn.GroupNorm` (affine), statistics over each group of channels × pixels.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    /// The same scale and shift in f32 (tgate's norm kernel computes in f32); shared with the
    /// above when the parameters are f32.
    gamma32: Tensor<1>,
    beta32: Tensor<1>,
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
        let gamma: Tensor<1> = w.get("weight", [channels])?;
        let beta: Tensor<1> = w.get("bias", [channels])?;
        Ok(GroupNorm {
            gamma32: gamma.clone().cast(DType::F32),
            beta32: beta.clone().cast(DType::F32),
            gamma,
            beta,
            groups,
            eps,
        })
    }

    /// Normalises `[b, c, ...]` (any rank ≥ 3); the statistics are computed in f32, the affine
    /// part in the activation dtype (on GPUs: tgate's norm kernel, all in f32, one launch).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_act(x, false)
    }

    /// Bytes per element of the largest map this norm holds for an input of `dtype`: tgate's
    /// norm kernel (cubecl devices) keeps the input's storage and computes its statistics in
    /// f32 registers; burn's composition copies the map to f32 first.
    pub fn map_bytes(&self, dtype: DType) -> usize {
        #[cfg(feature = "wgpu")]
        if custom_kernels() && tgate_shaders::is_cube_device(&self.gamma32.device()) {
            return dtype.size();
        }
        dtype.size().max(4)
    }

    /// `silu(norm(x))`, the pair every ResNet block and every `conv_norm_out` runs: one launch
    /// on GPUs.
    pub fn forward_silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_act(x, true)
    }

    fn forward_act<const D: usize>(&self, x: Tensor<D>, silu: bool) -> Tensor<D> {
        #[cfg(feature = "wgpu")]
        if custom_kernels() {
            let (g, b) = (&self.gamma32, &self.beta32);
            if D == 4 {
                let x4 = Tensor::<4>::from_bridge(x.clone().into_bridge());
                if let Some(out) = tgate_shaders::group_norm(x4, g, b, self.groups, self.eps, silu)
                {
                    return Tensor::from_bridge(out.into_bridge());
                }
            }
        }
        let out = self.burn_forward(x);
        if silu {
            Activation::Silu.forward(out)
        } else {
            out
        }
    }

    fn burn_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let grouped: Tensor<3> = x
            .cast(DType::F32)
            .reshape([b as i64, self.groups as i64, -1]);
        let mean = grouped.clone().mean_dim(2);
        let centered = grouped - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = (centered / var.add_scalar(self.eps).sqrt()).cast(dtype);
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
    /// The scale and shift are kept in f32 whatever the parameter dtype (the norm computes in
    /// f32), so nothing is cast per call.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let w = w.clone().with_dtype(DType::F32);
        Ok(LayerNorm {
            gamma: w.get("weight", [dim])?,
            beta: w.get("bias", [dim])?,
            eps,
        })
    }

    /// Computed in f32 whatever the activation dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        #[cfg(feature = "wgpu")]
        if custom_kernels() {
            if D == 3 {
                let x3 = Tensor::<3>::from_bridge(x.clone().into_bridge());
                if let Some(out) = tgate_shaders::layer_norm(x3, &self.gamma, &self.beta, self.eps)
                {
                    return Tensor::from_bridge(out.into_bridge());
                }
            }
        }
        let dtype = x.dtype();
        layer_norm(
            x.cast(DType::F32),
            self.gamma.clone(),
            Some(self.beta.clone()),
            self.eps,
        )
        .cast(dtype)
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
/// On a GPU device without mask or causality it is one launch of tgate's attention kernel
/// (`shaders/src/attention.rs`: f32 accumulation in the projections' dtype and layout, no score
/// matrix); otherwise burn's attention as below.
///
/// `mask` (`[b, 1, n_q, n_k]`-broadcastable, true = masked) and `causal` follow PyTorch's SDPA.
/// Scores and softmax are computed in f32 whatever the activation dtype (burn's attention
/// fallback would keep them in the input dtype).
///
/// `max_score_bytes`: when the f32 score matrix `[b, heads, n_q, n_k]` would be bigger than this
/// (on WebGPU, the adapter's largest storage binding), the queries are split into row blocks whose
/// scores fit, attended one block at a time and concatenated. Softmax runs along keys, so each
/// row's result is the same as unsplit (diffusers' attention slicing, by bytes). Causal attention
/// (CLIP's 77 tokens) is never split.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    max_score_bytes: Option<u64>,
) -> Tensor<3> {
    let [b, n_q, inner] = q.dims();
    let n_k = k.dims()[1];
    let d = inner / heads;
    add_macs(2 * b * n_q * n_k * inner);
    #[cfg(feature = "wgpu")]
    if mask.is_none() && !causal && custom_kernels() {
        if let Some(out) = tgate_shaders::attention(q.clone(), k.clone(), v.clone(), heads) {
            return out;
        }
    }
    let dtype = q.dtype();
    let split =
        |t: Tensor<3>, n: usize| t.cast(DType::F32).reshape([b, n, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n_q), split(k, n_k), split(v, n_k));
    let mask = mask.map(|m| m.expand([b, heads, n_q, n_k]));
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    let out = match attention_row_block(b * heads, n_q, n_k, max_score_bytes) {
        Some(rows) if !causal => {
            let blocks = (0..n_q)
                .step_by(rows)
                .map(|start| {
                    let len = rows.min(n_q - start);
                    SPLIT_BLOCKS.with(|n| n.set(n.get() + 1));
                    let m = mask.clone().map(|m| m.narrow(2, start, len));
                    sdpa(
                        q.clone().narrow(2, start, len),
                        k.clone(),
                        v.clone(),
                        m,
                        None,
                        options,
                    )
                })
                .collect();
            Tensor::cat(blocks, 2)
        }
        _ => sdpa(q, k, v, mask, None, options),
    };
    out.swap_dims(1, 2).reshape([b, n_q, inner]).cast(dtype)
}

/// [`multi_head_attention`] (no mask, not causal) over the keys and values `k`, `v` followed by
/// `k2`, `v2`, as over their concatenation along the tokens. On a GPU device it is one launch of
/// tgate's attention kernel, which walks both sets without making the concatenation (Würstchen's
/// `AttnBlock`: the image tokens, then the text's keys and values, which are kept for the whole
/// generation); elsewhere the sets are concatenated and attended as above.
pub fn multi_head_attention_joined(
    q: Tensor<3>,
    (k, v): (Tensor<3>, Tensor<3>),
    (k2, v2): (Tensor<3>, Tensor<3>),
    heads: usize,
    max_score_bytes: Option<u64>,
) -> Tensor<3> {
    #[cfg(feature = "wgpu")]
    if custom_kernels() {
        let [b, n_q, inner] = q.dims();
        let n_k = k.dims()[1] + k2.dims()[1];
        let (first, second) = ((k.clone(), v.clone()), (k2.clone(), v2.clone()));
        if let Some(out) = tgate_shaders::attention_joined(q.clone(), first, second, heads) {
            add_macs(2 * b * n_q * n_k * inner);
            return out;
        }
    }
    let k = Tensor::cat(vec![k, k2], 1);
    let v = Tensor::cat(vec![v, v2], 1);
    multi_head_attention(q, k, v, heads, None, false, max_score_bytes)
}

/// Query rows per block so that `[batch_heads, rows, n_k]` f32 scores fit in `max_score_bytes`;
/// `None` when all `n_q` rows fit (or there is no limit). At least one row: a single row
/// (`2 × heads × n_k × 4` bytes; 262144 for SD at 512²) is always far smaller than the feature
/// maps of the same generation (SD 1.5's VAE holds about a thousand times as many values), so
/// a size where one row does not fit is refused by `validate` before attention runs.
pub fn attention_row_block(
    batch_heads: usize,
    n_q: usize,
    n_k: usize,
    max_score_bytes: Option<u64>,
) -> Option<usize> {
    let limit = max_score_bytes?;
    let per_row = (batch_heads * n_k * 4) as u64;
    if per_row * n_q as u64 <= limit {
        return None;
    }
    Some(((limit / per_row.max(1)) as usize).clamp(1, n_q))
}

/// PyTorch's `interpolate(x, size, mode="bicubic", antialias=True, align_corners=True)`.
///
/// The resize is separable: a `[out, in]` weight matrix per axis (built on the host with
/// PyTorch's antialiasing filter: Keys' cubic with `a = -0.5`, widened by the scale when
/// shrinking, weights normalised per output pixel), applied as two matmuls, width first as
/// PyTorch does.
pub fn resize_bicubic_antialias(x: Tensor<4>, out_h: usize, out_w: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    if (h, w) == (out_h, out_w) {
        return x;
    }
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let device = x.device();
    let matrix = |rows: Vec<f32>, shape: [usize; 2]| {
        Tensor::<2>::from_data(burn::tensor::TensorData::new(rows, shape), &device)
    };
    // width: [b, c, h, w] @ [w, out_w]
    let ww = antialias_weights(w, out_w);
    let mut wt = vec![0f32; w * out_w];
    for o in 0..out_w {
        for i in 0..w {
            wt[i * out_w + o] = ww[o * w + i];
        }
    }
    let wt = matrix(wt, [w, out_w])
        .reshape([1, 1, w, out_w])
        .expand([b, c, w, out_w]);
    let x = x.matmul(wt);
    // height: [out_h, h] @ [b, c, h, out_w]
    let wh = matrix(antialias_weights(h, out_h), [out_h, h])
        .reshape([1, 1, out_h, h])
        .expand([b, c, out_h, h]);
    wh.matmul(x).cast(dtype)
}

/// Row-major `[output, input]` interpolation weights of one axis (see [`resize_bicubic_antialias`]).
pub fn antialias_weights(input: usize, output: usize) -> Vec<f32> {
    fn cubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    // align_corners=True: the scale maps the first and last pixel centres onto each other.
    // Positions are computed in f32 as PyTorch's float kernel does; the filter in f64.
    let scale = if output > 1 {
        (input - 1) as f32 / (output - 1) as f32
    } else {
        0.0
    };
    let (support, inv_scale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0f32, 1.0f32)
    };
    let mut weights = vec![0f32; output * input];
    for o in 0..output {
        let center = scale * (o as f32 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(input as i64).max(0) as usize;
        let taps: Vec<f64> = (lo..hi)
            .map(|j| cubic(((j as f32 - center + 0.5) * inv_scale) as f64))
            .collect();
        let total: f64 = taps.iter().sum();
        if total != 0.0 {
            for (j, t) in (lo..hi).zip(taps) {
                weights[o * input + j] = (t / total) as f32;
            }
        }
    }
    weights
}
