//! Flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler with a static shift).
//! Quirks that decide parity: the timesteps stay fractional (the DiT receives e.g.
//! 923.343); sigma_min is shifted once in __init__ (over 1000 training steps, in float32)
//! and the linspace between the shifted ends is shifted again in set_timesteps.

use super::Sampler;
use crate::error::Result;

pub struct FlowEuler {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
}

impl FlowEuler {
    pub fn new(num_train: usize, shift: f64, steps: usize) -> Self {
        let t = num_train as f32;
        // __init__: sigmas = linspace(1, T, T)[::-1] / T in float32, shifted in float32.
        let shift32 = shift as f32;
        let shifted = |s: f32| shift32 * s / (1.0 + (shift32 - 1.0) * s);
        let sigma_max = shifted(1.0) as f64; // T/T
        let sigma_min = shifted(1.0 / t) as f64;
        // set_timesteps: np.linspace(sigma_max·T, sigma_min·T, steps) / T, shifted, in f64.
        let (a, b) = (sigma_max * num_train as f64, sigma_min * num_train as f64);
        let mut sigmas: Vec<f32> = super::linspace(a, b, steps)
            .into_iter()
            .map(|ts| {
                let s = ts / num_train as f64;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|&s| s * t).collect();
        sigmas.push(0.0);
        FlowEuler {
            timesteps,
            sigmas,
            step_index: 0,
        }
    }
}

impl Sampler for FlowEuler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step(&mut self, model_output: &[f32], sample: &mut [f32]) -> Result<()> {
        let s = super::check_step(
            "Euler",
            self.step_index,
            self.timesteps.len(),
            model_output.len(),
            sample.len(),
        )?;
        let dt = self.sigmas[s + 1] - self.sigmas[s];
        for (x, &v) in sample.iter_mut().zip(model_output) {
            *x += dt * v;
        }
        self.step_index += 1;
        Ok(())
    }
}
