//! Samplers (diffusers' "schedulers") for flow-matching Wan models: UniPC multistep and
//! flow-matching Euler. Settings come from scheduler/scheduler_config.json; the CLI may
//! override the sampler, the shift and the number of steps.
//!
//! The step arithmetic follows diffusers in float32: the sigma schedule is built in f64 (as
//! numpy does) and rounded to f32, and every coefficient (logs, expm1, ratios) is a float32
//! scalar as torch's 0-dim tensors are.

mod euler;
mod unipc;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use euler::FlowEuler;
pub use unipc::UniPc;

use crate::error::{Error, Result};
use crate::models::read_json;

/// One denoising trajectory.
pub trait Sampler: Send {
    /// What the DiT receives at each step (UniPC: whole numbers, Euler: fractional).
    fn timesteps(&self) -> &[f32];
    /// The noise levels, one more than the steps (the last is 0).
    fn sigmas(&self) -> &[f32];
    /// Advances `sample` in place from the model's flow prediction at the next step.
    fn step(&mut self, model_output: &[f32], sample: &mut [f32]) -> Result<()>;
}

/// The checks every sampler's `step` starts with: a step left in the schedule, and a model
/// output shaped like the sample. Returns the step index.
pub(crate) fn check_step(
    name: &str,
    step_index: usize,
    scheduled: usize,
    model_output: usize,
    sample: usize,
) -> Result<usize> {
    if step_index >= scheduled {
        return Err(Error::invalid(format!("{name}: more steps than scheduled")));
    }
    if model_output != sample {
        return Err(Error::invalid(format!(
            "{name}: model output and sample sizes differ"
        )));
    }
    Ok(step_index)
}

/// Which sampler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Unipc,
    Euler,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Unipc => "unipc",
            SamplerKind::Euler => "euler",
        }
    }
}

/// The fields of scheduler_config.json reel reads (UniPCMultistepScheduler's or
/// FlowMatchEulerDiscreteScheduler's); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    /// UniPC's shift.
    pub flow_shift: Option<f64>,
    /// Euler's shift.
    pub shift: Option<f64>,
    pub solver_order: usize,
    pub prediction_type: Option<String>,
    pub use_flow_sigmas: Option<bool>,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub final_sigmas_type: String,
    pub disable_corrector: Vec<usize>,
    pub use_dynamic_shifting: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub thresholding: bool,
    pub invert_sigmas: bool,
    pub stochastic_sampling: bool,
    pub shift_terminal: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        // Wan2.1's shipped scheduler: UniPC, flow prediction, flow sigmas, shift 3.
        SchedulerConfig {
            class_name: Some("UniPCMultistepScheduler".into()),
            num_train_timesteps: 1000,
            flow_shift: Some(3.0),
            shift: None,
            solver_order: 2,
            prediction_type: Some("flow_prediction".into()),
            use_flow_sigmas: Some(true),
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            final_sigmas_type: "zero".into(),
            disable_corrector: vec![],
            use_dynamic_shifting: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            thresholding: false,
            invert_sigmas: false,
            stochastic_sampling: false,
            shift_terminal: None,
        }
    }
}

impl SchedulerConfig {
    /// Reads `scheduler/scheduler_config.json` of a pipeline root (or the file itself).
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_file() {
            path.to_path_buf()
        } else {
            path.join("scheduler").join("scheduler_config.json")
        };
        read_json(&file)
    }

    /// The sampler the config names.
    pub fn kind(&self) -> SamplerKind {
        match self.class_name.as_deref() {
            Some("FlowMatchEulerDiscreteScheduler") => SamplerKind::Euler,
            _ => SamplerKind::Unipc,
        }
    }

    /// The shift the config sets for its own sampler.
    pub fn default_shift(&self) -> f64 {
        match self.kind() {
            SamplerKind::Unipc => self.flow_shift.or(self.shift).unwrap_or(1.0),
            SamplerKind::Euler => self.shift.or(self.flow_shift).unwrap_or(1.0),
        }
    }

    /// Checks that the settings are the ones reel implements (flow prediction on flow
    /// sigmas, order ≤ 2, bh2/bh1, no dynamic shifting or alternative sigma schedules).
    pub fn validate(&self, kind: SamplerKind) -> Result<()> {
        let bad = |what: String| {
            Err(Error::invalid(format!(
                "scheduler_config.json: {what} is not supported by reel's {} sampler",
                kind.name()
            )))
        };
        if self.num_train_timesteps == 0 || self.num_train_timesteps > 1_000_000 {
            return bad(format!(
                "num_train_timesteps = {}",
                self.num_train_timesteps
            ));
        }
        if self.use_dynamic_shifting
            || self.use_karras_sigmas
            || self.use_exponential_sigmas
            || self.use_beta_sigmas
        {
            return bad("dynamic shifting or karras/exponential/beta sigmas".into());
        }
        if self.shift_terminal.is_some() || self.thresholding {
            return bad("shift_terminal / thresholding".into());
        }
        if kind == SamplerKind::Unipc
            && self.class_name.as_deref() == Some("UniPCMultistepScheduler")
        {
            if self.prediction_type.as_deref() != Some("flow_prediction")
                || self.use_flow_sigmas != Some(true)
            {
                return bad(
                    "a UniPC config without prediction_type=flow_prediction and use_flow_sigmas"
                        .into(),
                );
            }
            if !(1..=2).contains(&self.solver_order) || !self.predict_x0 {
                return bad(format!(
                    "solver_order = {} / predict_x0 = false",
                    self.solver_order
                ));
            }
            if !matches!(self.solver_type.as_str(), "bh1" | "bh2")
                || self.final_sigmas_type != "zero"
            {
                return bad(format!(
                    "solver_type {} / final_sigmas_type {}",
                    self.solver_type, self.final_sigmas_type
                ));
            }
        }
        if kind == SamplerKind::Euler && (self.invert_sigmas || self.stochastic_sampling) {
            return bad("invert_sigmas / stochastic_sampling".into());
        }
        Ok(())
    }
}

/// numpy.linspace(start, stop, num) as numpy computes it: i·step + start with
/// step = (stop − start)/(num − 1), and the last element exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// Builds a sampler of `kind` for `steps` steps. `shift` overrides the config's.
pub fn build(
    config: &SchedulerConfig,
    kind: SamplerKind,
    steps: usize,
    shift: Option<f64>,
) -> Result<Box<dyn Sampler>> {
    config.validate(kind)?;
    if steps == 0 {
        return Err(Error::invalid("--steps must be at least 1"));
    }
    let shift = shift.unwrap_or_else(|| config.default_shift());
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::invalid(format!(
            "--shift must be a positive number, got {shift}"
        )));
    }
    Ok(match kind {
        SamplerKind::Unipc => {
            let order = if config.class_name.as_deref() == Some("UniPCMultistepScheduler") {
                config.solver_order
            } else {
                2
            };
            let bh1 = config.class_name.as_deref() == Some("UniPCMultistepScheduler")
                && config.solver_type == "bh1";
            Box::new(UniPc::new(
                config.num_train_timesteps,
                shift,
                steps,
                order,
                bh1,
                config.lower_order_final,
            ))
        }
        SamplerKind::Euler => Box::new(FlowEuler::new(config.num_train_timesteps, shift, steps)),
    })
}
