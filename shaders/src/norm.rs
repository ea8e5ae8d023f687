//! GroupNorm and LayerNorm (optionally followed by SiLU) in one launch each, one normalised
//! row (a GroupNorm group of one batch item, a LayerNorm token, a Würstchen pixel) to a unit
//! where rows are short and to a cube where they are long, statistics in f32 whatever the
//! storage dtype (mean first, then the mean squared deviation, as PyTorch),
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
    let mean = cube_sum(&mut partial, sum, unit, units) / count;

    let mut squares = f32::new(0.0);
    let mut j = unit;
    while j < row_len {
        let d = f32::cast_from(x[row_offset(x, x_base, j, plane, width)]) - mean;
        squares += d * d;
        j += units;
    }
    let inv = f32::new(1.0) / (cube_sum(&mut partial, squares, unit, units) / count + eps).sqrt();

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

/// [`tgate_norm`] with one unit per row: each unit walks its row three times (the sum, the
/// squared deviations, the output) through nested channel / row / column loops, with no shared
/// memory, no barrier and no per-value index division. For short rows (LayerNorm tokens,
/// Würstchen's pixels), where a cube per row spends its time in barriers on CPU rasterisers.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn tgate_norm_per_unit<E: Float>(
    x: &Tensor<E>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    out: &mut Tensor<E>,
    groups: usize,
    eps: f32,
    #[comptime] silu: bool,
    #[comptime] affine_per_position: bool,
    #[define(E)] _dtype: ElemType,
) {
    let rows = x.shape(0) * groups;
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let row = cube * CUBE_DIM as usize + UNIT_POS as usize;
    if row >= rows {
        terminate!();
    }
    let channels = x.shape(1) / groups;
    let (height, width) = (x.shape(2), x.shape(3));
    let b = row / groups;
    let first_channel = (row % groups) * channels;
    let x_base = b * x.stride(0) + first_channel * x.stride(1);
    let o_base = b * out.stride(0) + first_channel * out.stride(1);
    let count = f32::cast_from(channels * height * width);

    let mut sum = f32::new(0.0);
    for ch in 0..channels {
        for yy in 0..height {
            let line = x_base + ch * x.stride(1) + yy * x.stride(2);
            for xx in 0..width {
                sum += f32::cast_from(x[line + xx * x.stride(3)]);
            }
        }
    }
    let mean = sum / count;
    let mut squares = f32::new(0.0);
    for ch in 0..channels {
        for yy in 0..height {
            let line = x_base + ch * x.stride(1) + yy * x.stride(2);
            for xx in 0..width {
                let d = f32::cast_from(x[line + xx * x.stride(3)]) - mean;
                squares += d * d;
            }
        }
    }
    let inv = f32::new(1.0) / (squares / count + eps).sqrt();
    for ch in 0..channels {
        for yy in 0..height {
            let line = x_base + ch * x.stride(1) + yy * x.stride(2);
            let o_line = o_base + ch * out.stride(1) + yy * out.stride(2);
            let o_step = out.stride(3);
            for xx in 0..width {
                let a = if affine_per_position {
                    yy * width + xx
                } else {
                    first_channel + ch
                };
                let value = f32::cast_from(x[line + xx * x.stride(3)]);
                let mut y = (value - mean) * inv * gamma[a] + beta[a];
                if silu {
                    y = y / (f32::new(1.0) + (-y).exp());
                }
                out[o_line + xx * o_step] = E::cast_from(y);
            }
        }
    }
}

/// Where the `k`-th value of a row lies in `t` (the row's channels one after the other, each an
/// `H × W` plane in row order), from the row's first channel at `base`.
#[cube]
fn row_offset<E: Float>(t: &Tensor<E>, base: usize, k: usize, plane: usize, width: usize) -> usize {
    let s = k % plane;
    base + (k / plane) * t.stride(1) + (s / width) * t.stride(2) + (s % width) * t.stride(3)
}

/// The sum of every unit's `value` over the cube (`units`, a power of two from 32), returned to
/// every unit; `partial` is free again when it returns. Two levels of 16-way sums (groups of 16
/// partials, then the groups' sums) rather than a binary tree: four barriers whatever the cube
/// size, where a tree takes one per level. Barriers are what CPU rasterisers (SwiftShader,
/// lavapipe) pay most for, as they switch between the cube's invocations at each one.
#[cube]
fn cube_sum(partial: &mut Shared<[f32]>, value: f32, unit: usize, #[comptime] units: usize) -> f32 {
    let groups = comptime!(units / 16);
    partial[unit] = value;
    sync_cube();
    let mut group_sum = f32::new(0.0);
    if unit < groups {
        #[unroll]
        for i in 0..16 {
            group_sum += partial[unit * 16 + i];
        }
    }
    sync_cube();
    if unit < groups {
        partial[unit] = group_sum;
    }
    sync_cube();
    let mut total = f32::new(0.0);
    #[unroll]
    for i in 0..groups {
        total += partial[i];
    }
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

/// Rows up to this many values get a unit each ([`tgate_norm_per_unit`]), longer ones a cube
/// each ([`tgate_norm`]): LayerNorm tokens (SD: 320 to 1280) and Würstchen's pixels (up to
/// 1536 channels) go per unit, GroupNorm's groups (channels × a whole map) per cube.
const PER_UNIT_MAX_ROW: usize = 4096;

/// Units per cube of the per-unit kernel.
const PER_UNIT_CUBE: usize = 64;

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
    let address_type = [
        x.required_address_type(),
        gamma.required_address_type(),
        out.required_address_type(),
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let dtype = burn::backend::cubecl::dtype_to_storage_type(x.dtype);
    if row_len <= PER_UNIT_MAX_ROW {
        let cubes = rows.div_ceil(PER_UNIT_CUBE);
        let (cx, cy) = (cubes.min(65535), cubes.div_ceil(65535));
        tgate_norm_per_unit::launch(
            &out.client,
            CubeCount::Static(cx as u32, cy as u32, 1),
            CubeDim::new_1d(PER_UNIT_CUBE as u32),
            address_type,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            layout.groups,
            eps,
            silu,
            layout.affine_per_position,
            dtype,
        );
        return out;
    }
    // About four values a unit (fewer invocations to switch between on CPU rasterisers), 32
    // to 256 units.
    let units = row_len.div_ceil(4).next_power_of_two().clamp(32, 256);
    // Rows over x (up to 65535 cubes) and y.
    let (cx, cy) = (rows.min(65535), rows.div_ceil(65535));
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
