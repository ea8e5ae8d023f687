//! GroupNorm and LayerNorm (optionally followed by SiLU) in one launch each: one cube per
//! normalised row (a GroupNorm group of one batch item, or a LayerNorm token), statistics in
//! f32 whatever the storage dtype (mean first, then the mean squared deviation, as PyTorch),
//! then the scale and shift (kept in f32) and the activation, written in the input's dtype.
//! Burn's composition of the same norm is a cast, a layout copy, two reductions and two or
//! three element-wise passes, plus an f32 copy of the whole map in f16 mode.
//!
//! The kernel reads its input through a 4-d strided view `[B, C, H, W]` and writes the output
//! in the input's memory order: a channels-last feature map (what cubecl's convolutions produce
//! and read) stays channels last, so no layout copy runs before the norm or after it.

use burn::tensor::Shape;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// How the rows of a `[B, C, H, W]` view map to the normalised groups and the scale and shift.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLayout {
    /// Rows per batch item: GroupNorm's groups of `C / groups` channels (each row covers its
    /// channels × H × W values).
    pub groups: usize,
    /// The scale and shift are indexed by the position inside the `H × W` plane (LayerNorm over
    /// a `[b, n, dim, 1]` view, one channel per row) rather than by channel (GroupNorm).
    pub affine_per_position: bool,
}

#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn tgate_norm<E: Float>(
    x: &Tensor<E>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    out: &mut Tensor<E>,
    groups: usize,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] silu: bool,
    #[comptime] affine_per_position: bool,
    #[define(E)] _dtype: ElemType,
) {
    let rows = x.shape(0) * groups;
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    // The whole cube shares its row: it leaves together, before any barrier.
    if row >= rows {
        terminate!();
    }
    let channels_per_row = x.shape(1) / groups;
    let width = x.shape(3);
    let plane = x.shape(2) * width;
    let row_len = channels_per_row * plane;
    let b = row / groups;
    let first_channel = (row % groups) * channels_per_row;
    let x_base = b * x.stride(0) + first_channel * x.stride(1);
    let o_base = b * out.stride(0) + first_channel * out.stride(1);
    let unit = UNIT_POS as usize;
    let count = f32::cast_from(row_len);
    let mut partial = Shared::<[f32]>::new_slice(units);

    let mut sum = f32::new(0.0);
    let mut i = unit;
    while i < row_len {
        sum += f32::cast_from(x[row_offset(x, x_base, i, plane, width)]);
        i += units;
    }
    let mean = cube_sum(&mut partial, sum, unit) / count;

    let mut squares = f32::new(0.0);
    let mut j = unit;
    while j < row_len {
        let d = f32::cast_from(x[row_offset(x, x_base, j, plane, width)]) - mean;
        squares += d * d;
        j += units;
    }
    let inv = f32::new(1.0) / (cube_sum(&mut partial, squares, unit) / count + eps).sqrt();

    let mut k = unit;
    while k < row_len {
        let a = if affine_per_position {
            k % plane
        } else {
            first_channel + k / plane
        };
        let value = f32::cast_from(x[row_offset(x, x_base, k, plane, width)]);
        let mut y = (value - mean) * inv * gamma[a] + beta[a];
        if silu {
            y = y / (f32::new(1.0) + (-y).exp());
        }
        let to = row_offset(&*out, o_base, k, plane, width);
        out[to] = E::cast_from(y);
        k += units;
    }
}

/// Where the `k`-th value of a row lies in `t` (the row's channels one after the other, each an
/// `H × W` plane in row order), from the row's first channel at `base`.
#[cube]
fn row_offset<E: Float>(t: &Tensor<E>, base: usize, k: usize, plane: usize, width: usize) -> usize {
    let s = k % plane;
    base + (k / plane) * t.stride(1) + (s / width) * t.stride(2) + (s % width) * t.stride(3)
}

/// The sum of every unit's `value` over the cube (a tree in shared memory; the cube size is a
/// power of two), returned to every unit; `partial` is free again when it returns.
#[cube]
fn cube_sum(partial: &mut Shared<[f32]>, value: f32, unit: usize) -> f32 {
    partial[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if unit < stride {
            partial[unit] += partial[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = partial[0];
    sync_cube();
    total
}

/// An uninitialised tensor of `x`'s shape laid out in `x`'s memory order (axes by decreasing
/// stride), so element-wise consumers and producers keep the same layout.
fn empty_like_layout(x: &CubeTensor) -> CubeTensor {
    let shape = x.meta.shape();
    let strides = x.meta.strides();
    let rank = shape.num_dims();
    let mut order: Vec<usize> = (0..rank).collect();
    order.sort_by(|&a, &b| strides[b].cmp(&strides[a]).then(a.cmp(&b)));
    let dims: Vec<usize> = order.iter().map(|&a| shape[a]).collect();
    let dense = empty_device_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::from(dims),
        x.dtype,
    );
    let mut inverse = vec![0; rank];
    for (i, &a) in order.iter().enumerate() {
        inverse[a] = i;
    }
    permute(dense, &inverse)
}

/// Launch over a 4-d `x` (`[B, C, H, W]`, any strides).
pub(crate) fn launch(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    layout: RowLayout,
    eps: f32,
    silu: bool,
) -> CubeTensor {
    let out = empty_like_layout(&x);
    let shape = x.meta.shape().clone();
    if shape.num_elements() == 0 {
        return out;
    }
    let rows = shape[0] * layout.groups;
    let row_len = shape.num_elements() / rows.max(1);
    let units = row_len.next_power_of_two().clamp(32, 256);
    // Rows over x (up to 65535 cubes) and y.
    let (cx, cy) = (rows.min(65535), rows.div_ceil(65535));
    let address_type = [
        x.required_address_type(),
        gamma.required_address_type(),
        out.required_address_type(),
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let dtype = burn::backend::cubecl::dtype_to_storage_type(x.dtype);
    tgate_norm::launch(
        &out.client,
        CubeCount::Static(cx as u32, cy as u32, 1),
        CubeDim::new_1d(units as u32),
        address_type,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        layout.groups,
        eps,
        units,
        silu,
        layout.affine_per_position,
        dtype,
    );
    out
}
