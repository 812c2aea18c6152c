//! UniPC multistep (diffusers' UniPCMultistepScheduler) with prediction_type
//! flow_prediction, use_flow_sigmas, predict_x0, final_sigmas_type zero, and the B(h)
//! variants bh2 (Wan's) and bh1. The quirks that decide parity with diffusers:
//! - the DiT receives the timesteps cast to int64 (999, not 999.99), while the step
//!   arithmetic uses the float32 sigmas;
//! - sigmas[0] is lowered by 1e-6 when the shifted schedule starts at exactly 1;
//! - the final sigma of 0 makes λ = +∞ and h = +∞; IEEE arithmetic then gives
//!   expm1(−∞) = −1 and the last step returns the x0 prediction, as in torch;
//! - timestep_spacing has no effect under use_flow_sigmas.

use super::Sampler;
use crate::error::{Error, Result};

struct Coeffs {
    h: f32,
    hh: f32,
    h_phi_1: f32,
    b_h: f32,
    ratio: f32,
    c0: f32,
    alpha_t: f32,
}

pub struct UniPc {
    timesteps: Vec<f32>,
    /// [steps + 1], float32 as diffusers stores them.
    sigmas: Vec<f32>,
    order: usize,
    bh1: bool,
    lower_order_final: bool,
    /// x0 predictions of the last `order` steps, oldest first.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Vec<f32>>,
    step_index: usize,
}

/// λ(σ) = log α − log σ with α = 1 − σ (flow sigmas), float32.
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

impl UniPc {
    pub fn new(
        num_train: usize,
        shift: f64,
        steps: usize,
        order: usize,
        bh1: bool,
        lower_order_final: bool,
    ) -> Self {
        let t = num_train as f64;
        // np.linspace(1, 1/T, steps + 1)[:-1], shifted, in float64.
        let mut s: Vec<f64> = super::linspace(1.0, 1.0 / t, steps + 1)[..steps]
            .iter()
            .map(|&x| shift * x / (1.0 + (shift - 1.0) * x))
            .collect();
        if (s[0] - 1.0).abs() < 1e-6 {
            s[0] -= 1e-6;
        }
        // (sigmas · T).astype(int64) truncates.
        let timesteps = s.iter().map(|&x| (x * t).trunc() as f32).collect();
        let mut sigmas: Vec<f32> = s.iter().map(|&x| x as f32).collect();
        sigmas.push(0.0);
        UniPc {
            timesteps,
            sigmas,
            order: order.max(1),
            bh1,
            lower_order_final,
            model_outputs: vec![None; order.max(1)],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            step_index: 0,
        }
    }

    /// The scalars one update from σ_s0 to σ_t needs, in float32 as torch's 0-dim tensors:
    /// h = λ_t − λ_s0, hh = −h (predict_x0), h·φ₁(h) = expm1(hh), B(h), σ_t/σ_s0 and
    /// α_t·h·φ₁(h).
    fn coeffs(&self, sigma_t: f32, sigma_s0: f32) -> Coeffs {
        let alpha_t = 1.0 - sigma_t;
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        Coeffs {
            h,
            hh,
            h_phi_1,
            b_h,
            ratio: sigma_t / sigma_s0,
            c0: alpha_t * h_phi_1,
            alpha_t,
        }
    }

    /// The UniPC predictor (multistep_uni_p_bh_update).
    fn predictor(&self, x: &[f32], order: usize) -> Result<Vec<f32>> {
        let s = self.step_index;
        let sigma_s0 = self.sigmas[s];
        let Coeffs {
            h,
            hh: _,
            h_phi_1: _,
            b_h,
            ratio,
            c0,
            alpha_t,
        } = self.coeffs(self.sigmas[s + 1], sigma_s0);
        let m0 = self.output(1)?;
        let mut out: Vec<f32> = x
            .iter()
            .zip(m0)
            .map(|(&xv, &m)| ratio * xv - c0 * m)
            .collect();
        if order == 2 {
            let m1 = self.output(2)?;
            let rk = (lambda(self.sigmas[s - 1]) - lambda(sigma_s0)) / h;
            let c = alpha_t * b_h;
            // rhos_p = [0.5] for order 2; pred_res = 0.5 · (m1 − m0) / rk
            for ((o, &a), &b) in out.iter_mut().zip(m1).zip(m0) {
                let d1 = (a - b) / rk;
                *o -= c * (0.5 * d1);
            }
        }
        Ok(out)
    }

    /// The UniPC corrector (multistep_uni_c_bh_update) applied to this step's sample.
    fn corrector(
        &self,
        model_t: &[f32],
        last: &[f32],
        this: &mut [f32],
        order: usize,
    ) -> Result<()> {
        let s = self.step_index;
        let sigma_s0 = self.sigmas[s - 1];
        let Coeffs {
            h,
            hh,
            h_phi_1,
            b_h,
            ratio,
            c0,
            alpha_t,
        } = self.coeffs(self.sigmas[s], sigma_s0);
        let m0 = self.output(1)?;
        // b_i = h·φ_k(h)·i! / B(h), k = 1..order
        let mut b = Vec::with_capacity(order);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let c = alpha_t * b_h;
        match order {
            1 => {
                let rho = 0.5f32;
                for ((x, &l), (&mt, &m)) in this.iter_mut().zip(last).zip(model_t.iter().zip(m0)) {
                    *x = (ratio * l - c0 * m) - c * (rho * (mt - m));
                }
            }
            2 => {
                let m1 = self.output(2)?;
                let rk = (lambda(self.sigmas[s - 2]) - lambda(sigma_s0)) / h;
                // Solve [[1, 1], [rk, 1]] ρ = b (torch.linalg.solve on R = [rks⁰; rks¹]).
                let det = 1.0 - rk;
                let rho0 = (b[0] - b[1]) / det;
                let rho1 = (b[1] - rk * b[0]) / det;
                for (i, x) in this.iter_mut().enumerate() {
                    let d1 = (m1[i] - m0[i]) / rk;
                    let corr = rho0 * d1;
                    let d1_t = model_t[i] - m0[i];
                    *x = (ratio * last[i] - c0 * m0[i]) - c * (corr + rho1 * d1_t);
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "UniPC order {order} is not supported"
                )))
            }
        }
        Ok(())
    }

    /// The x0 prediction `back` steps ago (1 = the latest).
    fn output(&self, back: usize) -> Result<&[f32]> {
        self.model_outputs
            .get(self.order.wrapping_sub(back))
            .and_then(|o| o.as_deref())
            .ok_or_else(|| Error::invalid("UniPC: missing model output (internal)"))
    }
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step(&mut self, model_output: &[f32], sample: &mut [f32]) -> Result<()> {
        let s = super::check_step(
            "UniPC",
            self.step_index,
            self.timesteps.len(),
            model_output.len(),
            sample.len(),
        )?;
        // Flow prediction → x0: sample − σ·v.
        let sigma = self.sigmas[s];
        let x0: Vec<f32> = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &v)| x - sigma * v)
            .collect();
        if s > 0 {
            if let Some(last) = self.last_sample.take() {
                self.corrector(&x0, &last, sample, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        let n = self.model_outputs.len();
        self.model_outputs[n - 1] = Some(x0);
        let mut this_order = if self.lower_order_final {
            self.order.min(self.timesteps.len() - s)
        } else {
            self.order
        };
        this_order = this_order.min(self.lower_order_nums + 1);
        self.this_order = this_order;
        self.last_sample = Some(sample.to_vec());
        let next = self.predictor(sample, this_order)?;
        sample.copy_from_slice(&next);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(())
    }
}
