//! Attention in one pass per query row (the "flash" formulation): each unit owns one query row
//! of one head, keeps the row's running maximum, normaliser and weighted sum of values in f32
//! registers, and walks the keys in tiles, reading them straight from the key and value tensors
//! (no shared memory, no barrier: on the CPU rasterisers measured here, SwiftShader and
//! lavapipe, the earlier design that loaded each tile into shared memory behind two barriers was
//! 5–10 % and 1.8× slower). The `[n_q, n_k]` score matrix never exists. q, k, v and the output are read and written in the
//! projections' own layout, `[batch, tokens, heads × head_dim]`, so no head split, transpose or
//! copy runs around it, and f16 storage is read and written as f16 with f32 arithmetic.

use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// Largest head dim the kernel keeps in registers (SD 2.x / SDXL use 64, SD 1.x 40–160).
pub const MAX_HEAD_DIM: usize = 256;

/// Keys per tile for a head dim (as many as 2048 f32 values of keys hold, at most 64): the
/// tile's scores stay in registers.
fn key_tile(head_dim: usize) -> usize {
    (2048 / head_dim.max(1)).clamp(1, 64)
}

/// One unit per query row and head; each unit reads the keys and values itself, without shared
/// memory (the cube's units read the same key at the same time, which a GPU serves as one
/// broadcast read), so no barrier runs and units past the last row leave at once. The keys are
/// walked in tiles of `tile`: their scores stay in registers, and the running maximum and sum
/// are rescaled once a tile. With `two`, the keys and values are `k`, `v` followed by `k2`,
/// `v2` (Würstchen's image tokens, then the text's), walked one after the other with the same
/// running state: the same result as attending over their concatenation, which is never made.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn tgate_attention<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    k2: &Tensor<E>,
    v2: &Tensor<E>,
    out: &mut Tensor<E>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
    #[comptime] rows: usize,
    #[comptime] two: bool,
    #[define(E)] _dtype: ElemType,
) {
    let heads = out.shape(2) / head_dim;
    let n_q = q.shape(1);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let head = bh % heads;
    let row = CUBE_POS_X as usize * rows + UNIT_POS as usize;
    if row >= n_q {
        terminate!();
    }
    let q_base = b * q.stride(0) + row * q.stride(1) + head * head_dim;
    let mut qv = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    for c in 0..head_dim {
        qv[c] = f32::cast_from(q[q_base + c]) * scale;
        acc[c] = f32::new(0.0);
    }
    let mut scores = Array::<f32>::new(tile);
    // The running maximum and sum of exponentials.
    let mut state = Array::<f32>::new(2usize);
    state[0] = f32::new(-3.0e38);
    state[1] = f32::new(0.0);
    walk_keys::<E>(
        &qv,
        &mut acc,
        &mut scores,
        &mut state,
        k,
        v,
        b,
        head,
        head_dim,
        tile,
    );
    if two {
        walk_keys::<E>(
            &qv,
            &mut acc,
            &mut scores,
            &mut state,
            k2,
            v2,
            b,
            head,
            head_dim,
            tile,
        );
    }
    let o_base = b * out.stride(0) + row * out.stride(1) + head * head_dim;
    let inv = f32::new(1.0) / state[1];
    for c in 0..head_dim {
        out[o_base + c] = E::cast_from(acc[c] * inv);
    }
}

/// Folds the keys and values of `k`, `v` (batch `b`, head `head`) into one query row's running
/// state: `acc` (the weighted sum of values), `state` (maximum, sum of exponentials).
#[cube]
#[allow(clippy::too_many_arguments)]
fn walk_keys<E: Float>(
    qv: &Array<f32>,
    acc: &mut Array<f32>,
    scores: &mut Array<f32>,
    state: &mut Array<f32>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    b: usize,
    head: usize,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
) {
    let n_k = k.shape(1);
    let k_base = b * k.stride(0) + head * head_dim;
    let v_base = b * v.stride(0) + head * head_dim;
    let (k_step, v_step) = (k.stride(1), v.stride(1));
    let mut maximum = state[0];
    let mut total = state[1];
    let mut start = 0usize;
    while start < n_k {
        let count = min(tile, n_k - start);
        let mut tile_max = maximum;
        for j in 0..count {
            let key = k_base + (start + j) * k_step;
            let mut dot = f32::new(0.0);
            for c in 0..head_dim {
                dot += qv[c] * f32::cast_from(k[key + c]);
            }
            scores[j] = dot;
            tile_max = max(tile_max, dot);
        }
        let correction = (maximum - tile_max).exp();
        maximum = tile_max;
        total *= correction;
        for c in 0..head_dim {
            acc[c] *= correction;
        }
        for j in 0..count {
            let p = (scores[j] - maximum).exp();
            total += p;
            let value = v_base + (start + j) * v_step;
            for c in 0..head_dim {
                acc[c] += p * f32::cast_from(v[value + c]);
            }
        }
        start += tile;
    }
    state[0] = maximum;
    state[1] = total;
}

/// Launch on `[b, n_q, heads·d]` queries and `[b, n_k, heads·d]` keys and values, with a second
/// set of keys and values `extra` walked after the first (made contiguous in the last axis if
/// they are not).
pub(crate) fn launch(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    extra: Option<(CubeTensor, CubeTensor)>,
    heads: usize,
) -> CubeTensor {
    let (q, k, v) = (rows_contiguous(q), rows_contiguous(k), rows_contiguous(v));
    let two = extra.is_some();
    // Without a second set the kernel never reads it: the first one stands in. Binding one
    // buffer twice is allowed as both bindings only read (WGSL declares them read-only; q, k and
    // v viewed from one joined projection already share a buffer). 6 tensors and the metadata
    // buffer: 7 storage bindings, under WebGPU's default of 8 a shader stage.
    let (k2, v2) = match extra {
        Some((k2, v2)) => (rows_contiguous(k2), rows_contiguous(v2)),
        None => (k.clone(), v.clone()),
    };
    let [b, n_q, inner] = q.meta.shape().dims();
    let head_dim = inner / heads;
    let out = empty_device_dtype(
        q.client.clone(),
        q.device.clone(),
        Shape::new([b, n_q, inner]),
        q.dtype,
    );
    if b * n_q * inner == 0 {
        return out;
    }
    let rows = if n_q <= 32 { 32 } else { 64 };
    let tile = key_tile(head_dim);
    let cube_dim = CubeDim::new_1d(rows as u32);
    let cube_count = CubeCount::Static(n_q.div_ceil(rows) as u32, (b * heads) as u32, 1);
    let address_type = [&q, &k, &v, &k2, &v2, &out]
        .into_iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default();
    let dtype = burn::backend::cubecl::dtype_to_storage_type(q.dtype);
    tgate_attention::launch(
        &out.client,
        cube_count,
        cube_dim,
        address_type,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        k2.into_tensor_arg(),
        v2.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        1.0 / (head_dim as f32).sqrt(),
        head_dim,
        tile,
        rows,
        two,
        dtype,
    );
    out
}

fn rows_contiguous(t: CubeTensor) -> CubeTensor {
    if t.meta.strides().last() == Some(&1) {
        t
    } else {
        into_contiguous(t)
    }
}
