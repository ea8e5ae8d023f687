//! GPU kernels for the tgate model crate, written in CubeCL (`#[cube]`), so the same source
//! compiles to SPIR-V/WGSL natively and to WGSL in the browser (no subgroup or cooperative-matrix
//! instructions: the browser build has neither).
//!
//! They reach burn through a backend extension ([`Kernels`]): implemented for the cubecl backend
//! (and its fusion wrapper, so they queue with burn's other ops). On any other backend (the CPU's
//! Flex) [`attention`] answers `None` and the caller keeps burn's own op.
//!
//! - [`group_norm`], [`layer_norm`]: the norm (statistics in f32), its scale and shift and
//!   optionally SiLU in one launch.
//! - [`attention`]: softmax(QKᵀ/√d)·V over multi-head projections laid out as diffusers keeps
//!   them (`[batch, tokens, heads × head_dim]`), in one launch, never building the score matrix;
//!   [`attention_joined`] over two sets of keys and values as if concatenated.

mod attention;
mod norm;

use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, DispatchDevice};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;

pub use attention::MAX_HEAD_DIM;
use norm::RowLayout;

/// tgate's custom kernels as a burn backend extension.
#[backend_extension(Cube, Fusion)]
pub trait Kernels: Backend {
    /// Multi-head attention over `[b, n_q, heads·d]` queries and `[b, n_k, heads·d]` keys and
    /// values; the output has the queries' shape and dtype.
    #[fusion(dtype = q, shape = q)]
    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;

    /// [`Kernels::multi_head_attention`] over the keys and values `k`, `v` followed by `k2`,
    /// `v2` (`[b, n_k2, heads·d]`), without concatenating them.
    #[fusion(dtype = q, shape = q)]
    fn multi_head_attention_joined(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k2: FloatTensor<Self>,
        v2: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;

    /// Normalises the rows of a `[B, C, H, W]` tensor (any strides; see `norm::RowLayout`) with
    /// f32 statistics, then `· gamma + beta` (f32) and SiLU when asked; the output has `x`'s
    /// shape, dtype and memory order.
    #[allow(clippy::too_many_arguments)]
    #[fusion(dtype = x, shape = x)]
    fn norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        affine_per_position: bool,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self>;
}

impl Kernels for CubeBackend {
    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        attention::launch(q, k, v, None, heads)
    }

    fn multi_head_attention_joined(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        k2: FloatTensor<Self>,
        v2: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        attention::launch(q, k, v, Some((k2, v2)), heads)
    }

    fn norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        affine_per_position: bool,
        eps: f32,
        silu: bool,
    ) -> FloatTensor<Self> {
        let layout = RowLayout {
            groups,
            affine_per_position,
        };
        norm::launch(x, gamma, beta, layout, eps, silu)
    }
}

fn on_cube<const D: usize>(x: &Tensor<D>) -> bool {
    is_cube_device(&x.device())
}

/// Whether `device` runs on the cubecl backend (where these kernels apply).
pub fn is_cube_device(device: &burn::tensor::Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Cube(_))
}

fn norm(
    x: Tensor<4>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
    affine_per_position: bool,
    eps: f64,
    silu: bool,
) -> Option<Tensor<4>> {
    let affine_f32 = gamma.dtype() == DType::F32 && beta.dtype() == DType::F32;
    if !on_cube(&x) || !affine_f32 || groups == 0 {
        return None;
    }
    let out = <burn::backend::Dispatch as Kernels>::norm_rows(
        x.into_dispatch(),
        gamma.clone().into_dispatch(),
        beta.clone().into_dispatch(),
        groups,
        affine_per_position,
        eps as f32,
        silu,
    );
    Some(Tensor::from_dispatch(out))
}

/// `torch.nn.GroupNorm` over `x: [b, c, h, w]` (then SiLU when `silu`), one launch, in `x`'s
/// memory order; `gamma`, `beta`: `[c]` in f32. `None` off cubecl devices, or for an affine not
/// in f32, or channels not divisible by `groups`: the caller runs burn's ops.
pub fn group_norm(
    x: Tensor<4>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<Tensor<4>> {
    let c = x.dims()[1];
    if groups == 0 || !c.is_multiple_of(groups) || gamma.dims()[0] != c || beta.dims()[0] != c {
        return None;
    }
    norm(x, gamma, beta, groups, false, eps, silu)
}

/// `torch.nn.LayerNorm` over the last axis of `x: [b, n, dim]`, one launch, in `x`'s memory
/// order; `gamma`, `beta` in f32. `None` where [`group_norm`] would be.
pub fn layer_norm(
    x: Tensor<3>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
) -> Option<Tensor<3>> {
    let [_, n, dim] = x.dims();
    if gamma.dims()[0] != dim || beta.dims()[0] != dim || n == 0 {
        return None;
    }
    // [b, n, dim, 1]: a row per token (n groups of one channel), the affine along the plane.
    norm(x.unsqueeze_dim(3), gamma, beta, n, true, eps, false).map(|y| y.squeeze_dim(3))
}

/// softmax(q·kᵀ/√d)·v per head, `q: [b, n_q, heads·d]`, `k`, `v: [b, n_k, heads·d]` (rows may
/// be strided views, the last axis contiguous), in one kernel launch with f32 accumulation.
/// `None` (the caller computes it with burn's op) off cubecl devices, for a head dim over
/// [`MAX_HEAD_DIM`], for q, k, v of different dtypes, or keys and values that do not match the
/// queries' batch and width (the kernel indexes them with the queries' heads) or are empty.
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    if !(attention_fits(&q, heads) && keys_fit(&q, &k, &v) && k.dims()[1] > 0) {
        return None;
    }
    let out = <burn::backend::Dispatch as Kernels>::multi_head_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        heads,
    );
    Some(Tensor::from_dispatch(out))
}

/// [`attention`] over the keys and values `k`, `v` followed by `k2`, `v2`, as over their
/// concatenation along the tokens, in one launch that never makes it. `None` where
/// [`attention`] would be for either set (an empty set is allowed, not both).
pub fn attention_joined(
    q: Tensor<3>,
    (k, v): (Tensor<3>, Tensor<3>),
    (k2, v2): (Tensor<3>, Tensor<3>),
    heads: usize,
) -> Option<Tensor<3>> {
    let any_keys = k.dims()[1] + k2.dims()[1] > 0;
    if !(attention_fits(&q, heads) && keys_fit(&q, &k, &v) && keys_fit(&q, &k2, &v2) && any_keys) {
        return None;
    }
    let out = <burn::backend::Dispatch as Kernels>::multi_head_attention_joined(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        k2.into_dispatch(),
        v2.into_dispatch(),
        heads,
    );
    Some(Tensor::from_dispatch(out))
}

/// Whether the kernel takes queries `q` split into `heads`, on this device.
fn attention_fits(q: &Tensor<3>, heads: usize) -> bool {
    let inner = q.dims()[2];
    heads > 0 && inner.is_multiple_of(heads) && inner / heads <= MAX_HEAD_DIM && on_cube(q)
}

/// Whether keys `k` and values `v` match the queries' batch, width and dtype.
fn keys_fit(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>) -> bool {
    let ([b, _, inner], [kb, _, k_inner]) = (q.dims(), k.dims());
    kb == b
        && k_inner == inner
        && v.dims() == k.dims()
        && q.dtype() == k.dtype()
        && k.dtype() == v.dtype()
}
