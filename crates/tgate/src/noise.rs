//! Seeded standard-normal noise that gives the same numbers on every platform.
//!
//! The algorithm (fixed; changing it changes every seeded image):
//! * element `k` of stream `s` under seed `seed` draws two 64-bit words
//!   `a = splitmix64(seed ^ splitmix64(s) + 2k)` and `b = splitmix64(seed ^ splitmix64(s) + 2k + 1)`,
//!   where `splitmix64` is Vigna's SplitMix64 finaliser applied to `x + 0x9E3779B97F4A7C15`;
//! * `u1 = (a >> 11 + 1) / 2^53` in (0, 1], `u2 = (b >> 11) / 2^53` in [0, 1);
//! * `z = sqrt(-2 ln u1) · cos(2π u2)` (Box–Muller), evaluated in f64 with the `libm` crate's
//!   pure-Rust `log` and `cos`, then rounded to f32.
//!
//! Every value depends only on (seed, stream, k), so noise is identical natively and on wasm32,
//! and independent of tensor layout. Stream 0 is the initial latent noise; stream `1 + j` is the
//! noise an ancestral scheduler draws at its `j`-th step.

use burn::tensor::{Device, Tensor, TensorData};

/// SplitMix64's output function on `x + golden gamma`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` standard-normal f32 values of `stream` under `seed`.
pub fn randn(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let base = seed ^ splitmix64(stream);
    let scale = 1.0 / (1u64 << 53) as f64;
    (0..len as u64)
        .map(|k| {
            let a = splitmix64(base.wrapping_add(2 * k));
            let b = splitmix64(base.wrapping_add(2 * k + 1));
            let u1 = ((a >> 11) + 1) as f64 * scale;
            let u2 = (b >> 11) as f64 * scale;
            let r = libm::sqrt(-2.0 * libm::log(u1));
            (r * libm::cos(2.0 * std::f64::consts::PI * u2)) as f32
        })
        .collect()
}

/// A function drawing (or copying) the noise of step `j` on the host.
pub(crate) type Draw = Box<dyn Fn(usize) -> Vec<f32>>;

/// The noise of each step of a stochastic sampler (SD's ancestral schedulers and LCM,
/// Würstchen's DDPM).
pub(crate) enum StepNoise {
    /// Every step's noise on the device, `[steps, c, h, w]`, uploaded at once when the
    /// generation starts; step `j` reads row `j` (a view: no upload, no host work per step).
    Device(Tensor<4>),
    /// Drawn (or copied) and uploaded per step: the whole set would exceed
    /// [`UP_FRONT_NOISE_BYTES`] (very many steps at a large size).
    Host(Draw),
}

/// The most step noise uploaded up front (f32 bytes); beyond it each step uploads its own.
pub(crate) const UP_FRONT_NOISE_BYTES: usize = 32 << 20;

impl StepNoise {
    /// `f(j)` for `j < steps`, on the device at once when it takes at most `max_bytes`
    /// ([`UP_FRONT_NOISE_BYTES`] in a generation).
    pub(crate) fn within(
        f: Draw,
        steps: usize,
        shape: [usize; 4],
        device: &Device,
        max_bytes: usize,
    ) -> Self {
        let numel: usize = shape.iter().product();
        if steps * numel * 4 > max_bytes || steps == 0 {
            return StepNoise::Host(f);
        }
        let mut all = Vec::with_capacity(steps * numel);
        for j in 0..steps {
            all.extend(f(j));
        }
        let [_, c, h, w] = shape;
        StepNoise::Device(Tensor::from_data(
            TensorData::new(all, [steps, c, h, w]),
            device,
        ))
    }

    /// [`UP_FRONT_NOISE_BYTES`], or the device's largest tensor (`max_tensor_bytes`) if smaller.
    pub(crate) fn up_front_cap(max_tensor_bytes: Option<u64>) -> usize {
        max_tensor_bytes.map_or(UP_FRONT_NOISE_BYTES, |limit| {
            UP_FRONT_NOISE_BYTES.min(usize::try_from(limit).unwrap_or(usize::MAX))
        })
    }

    /// The noise of step `j`, `shape`.
    pub(crate) fn get(&self, j: usize, shape: [usize; 4], device: &Device) -> Tensor<4> {
        match self {
            StepNoise::Device(all) => all.clone().narrow(0, j, 1),
            StepNoise::Host(f) => Tensor::from_data(TensorData::new(f(j), shape), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_and_determinism() {
        let x = randn(42, 0, 100_000);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert_eq!(randn(42, 0, 8), x[..8]);
        assert_ne!(randn(42, 1, 8), x[..8]);
        assert_ne!(randn(43, 0, 8), x[..8]);
        // Pinned values (computed independently from the algorithm in the module docs, in
        // Python): a change here changes every seeded image.
        assert_eq!(randn(0, 0, 3), [0.463_431_3, 1.147_028_8, 1.344_403_1]);
        assert_eq!(randn(42, 1, 2), [-1.115_176, 0.471_857_04]);
    }

    /// Step noise uploaded up front and step noise uploaded per step hand each step the same
    /// values.
    #[cfg(feature = "flex")]
    #[test]
    fn step_noise_up_front_equals_step_noise_per_step() {
        let device = Device::flex();
        let shape = [1, 2, 3, 2];
        let draw =
            || Box::new(|j: usize| randn(7, 1 + j as u64, 12)) as Box<dyn Fn(usize) -> Vec<f32>>;
        let up_front = StepNoise::within(draw(), 5, shape, &device, usize::MAX);
        let per_step = StepNoise::within(draw(), 5, shape, &device, 5 * 12 * 4 - 1);
        assert!(matches!(up_front, StepNoise::Device(_)));
        assert!(matches!(per_step, StepNoise::Host(_)));
        for j in 0..5 {
            let (a, b) = (
                up_front.get(j, shape, &device),
                per_step.get(j, shape, &device),
            );
            assert_eq!(a.dims(), shape);
            let (a, b) = (
                a.into_data().try_to_vec::<f32>().unwrap(),
                b.into_data().try_to_vec::<f32>().unwrap(),
            );
            assert_eq!(a, randn(7, 1 + j as u64, 12));
            assert_eq!(a, b, "step {j}");
        }
    }
}
