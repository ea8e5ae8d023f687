//! GroupNorm and LayerNorm (optionally followed by SiLU) in one launch each: one cube per
//! normalised row (a GroupNorm group of one batch item, or a LayerNorm token), statistics in
//! f32 whatever the storage dtype (mean first, then the mean squared deviation, as PyTorch),
//! then the scale and shift (kept in f32) and the activation, written in the input's dtype.
//! Burn's composition of the same norm is a cast, a layout copy, two reductions and two or
//! three element-wise passes, plus an f32 copy of the whole map in f16 mode.

use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::CubeDim;

/// How the rows of a contiguous tensor map to the per-channel scale and shift.
#[derive(Clone, Copy, Debug)]
pub struct RowLayout {
    /// Elements per normalised row.
    pub row_len: usize,
    /// Consecutive elements sharing one scale/shift channel (H·W for GroupNorm, 1 for LayerNorm).
    pub per_channel: usize,
    /// Rows per batch item (GroupNorm's groups; 1 for LayerNorm's rows of one token).
    pub groups: usize,
}

#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn tgate_norm<E: Float>(
    x: &Tensor<E>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    out: &mut Tensor<E>,
    rows: usize,
    row_len: usize,
    per_channel: usize,
    groups: usize,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] silu: bool,
    #[define(E)] _dtype: ElemType,
) {
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    // The whole cube shares its row: it leaves together, before any barrier.
    if row >= rows {
        terminate!();
    }
    let unit = UNIT_POS as usize;
    let base = row * row_len;
    let count = f32::cast_from(row_len);
    let mut partial = Shared::<[f32]>::new_slice(units);

    let mut sum = f32::new(0.0);
    let mut i = unit;
    while i < row_len {
        sum += f32::cast_from(x[base + i]);
        i += units;
    }
    partial[unit] = sum;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if unit < stride {
            partial[unit] += partial[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let mean = partial[0] / count;
    sync_cube();

    let mut squares = f32::new(0.0);
    let mut j = unit;
    while j < row_len {
        let d = f32::cast_from(x[base + j]) - mean;
        squares += d * d;
        j += units;
    }
    partial[unit] = squares;
    sync_cube();
    let mut stride2 = CUBE_DIM as usize / 2;
    while stride2 > 0 {
        if unit < stride2 {
            partial[unit] += partial[unit + stride2];
        }
        sync_cube();
        stride2 /= 2;
    }
    let inv = f32::new(1.0) / (partial[0] / count + eps).sqrt();

    let first_channel = (row % groups) * (row_len / per_channel);
    let mut k = unit;
    while k < row_len {
        let ch = first_channel + k / per_channel;
        let mut y = (f32::cast_from(x[base + k]) - mean) * inv * gamma[ch] + beta[ch];
        if silu {
            y = y / (f32::new(1.0) + (-y).exp());
        }
        out[base + k] = E::cast_from(y);
        k += units;
    }
}

/// Launch over `x` (made contiguous if it is not) viewed as rows of `layout.row_len`.
pub(crate) fn launch(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    layout: RowLayout,
    eps: f32,
    silu: bool,
) -> CubeTensor {
    let x = if x.is_contiguous() {
        x
    } else {
        into_contiguous(x)
    };
    let shape: Shape = x.meta.shape().clone();
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), shape.clone(), x.dtype);
    let total = shape.num_elements();
    if total == 0 || layout.row_len == 0 {
        return out;
    }
    let rows = total / layout.row_len;
    let units = layout.row_len.next_power_of_two().clamp(32, 256);
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
        rows,
        layout.row_len,
        layout.per_channel,
        layout.groups,
        eps,
        units,
        silu,
        dtype,
    );
    out
}
