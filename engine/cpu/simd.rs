//! Run-time CPU feature dispatch and vectorisable transcendental functions.
//!
//! reel is never built with target-cpu=native: the same binary runs on the GPU machines'
//! CPUs. Hot loops are written once as plain Rust and stamped out twice by [`multiversion!`]:
//! a baseline (SSE2) copy, and a copy compiled with AVX2+FMA that is chosen at run time.
//! The helpers below are `#[inline(always)]` so they vectorise inside either copy.

use std::sync::OnceLock;

/// Whether this CPU has AVX-512F besides AVX2 and FMA (cached after the first call).
pub fn avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx2_fma() && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has AVX2 and FMA (cached after the first call).
pub fn avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines `fn name(args) -> ret { body }` three times (baseline, AVX2+FMA, AVX-512) and a
/// public entry point that picks one at run time. Arguments must be plain values or references.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::cpu::simd::avx512() {
                    // SAFETY: avx512() needs AVX-512F, AVX2 and FMA, which the CPU has.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::cpu::simd::avx2_fma() {
                    // SAFETY: avx2() only needs AVX2 and FMA, which the CPU has (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a part with few mantissa bits (exact products with n) and the rest
// (Cody-Waite reduction, as in Cephes' expf).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x for f32 within ~2 ulp, branch-free so that loops over it vectorise.
/// Inputs are clamped to [-87.3, 88.3]: below, the result is ~1e-38 instead of a
/// subnormal or 0 (harmless in softmax, SiLU and GELU); above, ~2e38 instead of inf.
/// NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = 1.987_569_2e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    #[allow(clippy::excessive_precision)] // Cephes expf coefficient, kept as published
    let p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(z, r) + 1.0;
    y * f32::from_bits(((k + 127) << 23) as u32)
}

/// Σ f(x_i) with eight independent accumulators, so the loop vectorises (a single f32
/// accumulator is a serial dependency chain the compiler may not reorder).
#[inline(always)]
pub fn sum_by(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut tail = 0.0f32;
    for &v in chunks.remainder() {
        tail += f(v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// max_i x_i (NaN-ignoring like f32::max), vectorised with eight lanes.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// 2^x for f32 within ~3 ulp, branch-free. Inputs clamped to [−126, 127] (so the result
/// is never subnormal or inf); NaN stays NaN. The softmax uses it with the scale and
/// log2(e) folded into one FMA per score.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-126.0, 127.0);
    let t = x + MAGIC;
    let n = t - MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let f = x - n; // exact, in [-0.5, 0.5]
                   // Taylor series of e^(f·ln2) to degree 6: truncation error < 1.3e-7 relative.
    let p = 1.540_353e-4_f32;
    let p = p.mul_add(f, 1.333_355_8e-3);
    let p = p.mul_add(f, 9.618_129e-3);
    let p = p.mul_add(f, 5.550_411e-2);
    let p = p.mul_add(f, 2.402_265e-1);
    let p = p.mul_add(f, 6.931_472e-1);
    let p = p.mul_add(f, 1.0);
    p * f32::from_bits(((k + 127) << 23) as u32)
}

/// GELU with the tanh approximation (PyTorch's approximate="tanh"), written as
/// x·σ(2u) = x / (1 + e^(−2u)) with u = √(2/π)(x + 0.044715x³), which equals
/// 0.5x(1 + tanh u) exactly in real arithmetic.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const S: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = S * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// SiLU: x·σ(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn exp2_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -125.0f32;
        while x < 126.0 {
            let want = (x as f64).exp2();
            worst = worst.max(((exp2(x) as f64 - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp2(f32::NAN).is_nan());
        assert!(exp2(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn reductions_match_serial() {
        let xs: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let s: f64 = xs.iter().map(|&v| v as f64).sum();
        assert!((sum_by(&xs, |v| v) as f64 - s).abs() < 1e-3);
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::MIN, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn gelu_and_silu_match_f64() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3));
            let g = 0.5 * xd * (1.0 + u.tanh());
            assert!(
                (gelu_tanh(x) as f64 - g).abs() <= 2e-7 * (1.0 + g.abs()),
                "gelu({x})"
            );
            let s = xd / (1.0 + (-xd).exp());
            assert!(
                (silu(x) as f64 - s).abs() <= 2e-7 * (1.0 + s.abs()),
                "silu({x})"
            );
            x += 0.0123;
        }
    }
}
