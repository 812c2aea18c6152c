//! Deterministic random weights for a model's weight list: benchmarks at real shapes
//! without downloads, and smoke tests. Not a trained model.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::write_f32;
use crate::tensor::Tensor;

/// SplitMix64 stream → standard normals by Box-Muller. Deterministic for a seed.
pub struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        // u1 in (0, 1]: never ln(0).
        let u1 = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * th.sin()) as f32);
        (r * th.cos()) as f32
    }
}

/// Weights for `specs` (name, shape): matrices N(0, 1/fan_in), norm weights 1 + 0.1·N,
/// biases 0.02·N, modulation tables N/√dim (as diffusers initialises them).
pub fn random_weights(specs: &[(String, Vec<usize>)], seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Normal::new(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let (base, scale) = if name.ends_with("gamma") {
                (1.0, 0.1) // the VAE's norm scales, [C, 1, 1(, 1)]
            } else if name.ends_with("scale_shift_table") {
                (0.0, 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt())
            } else if name.ends_with(".bias") {
                (0.0, 0.02)
            } else if shape.len() == 1 {
                (1.0, 0.1)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
            };
            let data = (0..n).map(|_| base + scale * rng.sample()).collect();
            (
                name.clone(),
                Tensor::new(shape.clone(), data).expect("shape product"),
            )
        })
        .collect()
}

/// Writes a component folder: config.json and one F32 diffusion_pytorch_model.safetensors.
pub fn write_component(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::invalid(e.to_string()))?;
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_f32(&dir.join("diffusion_pytorch_model.safetensors"), &refs)
}
