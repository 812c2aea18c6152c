//! The `reel` command line (DESIGN.md, "Command-line contract").

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::io::{write_f32, TensorFile};
use crate::models::wan_dit::WanDit;

#[derive(Debug, Parser)]
#[command(name = "reel", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("REEL_GIT_COMMIT"), ")"), about = "Text-to-video diffusion transformer inference (Wan2.1)")]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
    Emu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComponentKind {
    /// The diffusion transformer (WanTransformer3DModel).
    Dit,
    /// VAE encoder (posterior mean).
    VaeEncode,
    /// VAE decoder.
    VaeDecode,
    /// umT5 text encoder.
    TextEncoder,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one model component on tensors from a safetensors file.
    Component {
        kind: ComponentKind,
        /// The component folder or the pipeline root.
        #[arg(long)]
        model: PathBuf,
        /// Input safetensors (tensor names per component; extra tensors are ignored).
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        device: Device,
        /// Run the forward N times in-process (the model loaded once) and print the wall
        /// time of each run as JSON on stdout: {"forward_seconds": [...]}. For benchmarks
        /// and profilers; the output file holds the last run.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Describe a model folder: components, config, parameters, dtypes, tensors.
    Inspect {
        dir: PathBuf,
        /// Write the report as JSON to FILE (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
    },
    /// Static memory plan for a generation (arrives with the GPU runtime).
    Plan {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        size: Option<String>,
        #[arg(long)]
        frames: Option<usize>,
    },
}

fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda | Device::Emu => Err(Error::invalid(format!(
            "--device {}: not available yet (this build has the cpu device only)",
            if device == Device::Cuda {
                "cuda"
            } else {
                "emu"
            }
        ))),
    }
}

/// `reel component dit`: reads `hidden_states`, `timestep`, `encoder_hidden_states` from
/// `input`, writes `sample` to `output`.
/// With `repeat` > 1 the forward runs that many times and the per-run seconds are
/// returned (the output file holds the last run).
pub fn component_dit(model: &Path, input: &Path, output: &Path) -> Result<()> {
    component_dit_repeat(model, input, output, 1).map(|_| ())
}

/// [`component_dit`] running the forward `repeat` times; returns each run's seconds.
pub fn component_dit_repeat(
    model: &Path,
    input: &Path,
    output: &Path,
    repeat: usize,
) -> Result<Vec<f64>> {
    if repeat == 0 {
        return Err(Error::invalid("--repeat must be at least 1"));
    }
    let dit = WanDit::load(model)?;
    let file = TensorFile::open(input)?;
    let x = file.tensor("hidden_states")?;
    let t = file.tensor("timestep")?;
    let ctx = file.tensor("encoder_hidden_states")?;
    let mut seconds = Vec::with_capacity(repeat);
    let mut out = None;
    for _ in 0..repeat {
        let started = std::time::Instant::now();
        out = Some(dit.forward(&x, &t, &ctx)?);
        seconds.push(started.elapsed().as_secs_f64());
        tracing::info!(
            "dit forward in {:.4} s",
            seconds.last().copied().unwrap_or(0.0)
        );
    }
    let out = out.ok_or_else(|| Error::invalid("no forward ran"))?;
    write_f32(output, &[("sample", &out)])?;
    Ok(seconds)
}

/// `reel component text-encoder`: reads `input_ids` and `attention_mask` [B, L] (int64)
/// from `input`, writes `last_hidden_state` [B, L, d_model] to `output`. Needs no
/// tokenizer.
pub fn component_text_encoder(model: &Path, input: &Path, output: &Path) -> Result<()> {
    let encoder = crate::models::umt5::Umt5Encoder::load(model)?;
    let file = TensorFile::open(input)?;
    let (shape, ids) = file.tensor_i64("input_ids")?;
    let (mshape, mask) = file.tensor_i64("attention_mask")?;
    if shape.len() != 2 || mshape != shape {
        return Err(Error::invalid(format!(
            "{}: input_ids {shape:?} and attention_mask {mshape:?} must both be [B, L]",
            input.display()
        )));
    }
    let started = std::time::Instant::now();
    let out = encoder.forward(&ids, &mask, shape[0], shape[1])?;
    tracing::info!(
        "text encoder forward in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    write_f32(output, &[("last_hidden_state", &out)])
}

/// `reel component vae-encode`: `sample` [B, 3, F, H, W] in [-1, 1] → `latent_mean` (the
/// posterior mean, not normalized).
pub fn component_vae_encode(model: &Path, input: &Path, output: &Path) -> Result<()> {
    let vae = crate::models::wan_vae::WanVae::load(model)?;
    let x = TensorFile::open(input)?.tensor("sample")?;
    let started = std::time::Instant::now();
    let out = vae.encode(&x)?;
    tracing::info!("vae encode in {:.3} s", started.elapsed().as_secs_f64());
    write_f32(output, &[("latent_mean", &out)])
}

/// `reel component vae-decode`: `latents` [B, 16, T, h, w] (not normalized) → `decoded`
/// [B, 3, F, H, W] in [-1, 1].
pub fn component_vae_decode(model: &Path, input: &Path, output: &Path) -> Result<()> {
    let vae = crate::models::wan_vae::WanVae::load(model)?;
    let z = TensorFile::open(input)?.tensor("latents")?;
    let started = std::time::Instant::now();
    let out = vae.decode(&z)?;
    tracing::info!("vae decode in {:.3} s", started.elapsed().as_secs_f64());
    write_f32(output, &[("decoded", &out)])
}

/// Runs a parsed command line. Returns what the command prints on stdout (the binary
/// prints it; the library never writes to stdout itself).
pub fn run(cli: Cli) -> Result<String> {
    if let Some(n) = cli.threads {
        if n == 0 {
            return Err(Error::invalid("--threads must be at least 1"));
        }
        // Fails only if the pool already exists, which it cannot at this point.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    match cli.command {
        Command::Component {
            kind,
            model,
            input,
            output,
            device,
            repeat,
        } => {
            check_device(device)?;
            match kind {
                ComponentKind::Dit => {
                    let seconds = component_dit_repeat(&model, &input, &output, repeat)?;
                    Ok(if repeat > 1 {
                        format!("{}\n", serde_json::json!({ "forward_seconds": seconds }))
                    } else {
                        String::new()
                    })
                }
                ComponentKind::TextEncoder => {
                    component_text_encoder(&model, &input, &output).map(|_| String::new())
                }
                ComponentKind::VaeEncode => {
                    component_vae_encode(&model, &input, &output).map(|_| String::new())
                }
                ComponentKind::VaeDecode => {
                    component_vae_decode(&model, &input, &output).map(|_| String::new())
                }
            }
        }
        Command::Inspect { dir, json } => {
            let reports = crate::inspect::inspect(&dir)?;
            match json.as_deref() {
                Some(dest) => {
                    let text = serde_json::to_string_pretty(&reports)
                        .map_err(|e| Error::invalid(e.to_string()))?;
                    write_text(dest, &text)
                }
                None => Ok(crate::inspect::render(&reports)),
            }
        }
        Command::Plan { .. } => Err(Error::invalid(
            "reel plan arrives with the GPU runtime; this build has the cpu device only",
        )),
    }
}

/// Writes `text` to a file and returns nothing to print, or returns it for stdout (`-`).
pub fn write_text(dest: &str, text: &str) -> Result<String> {
    if dest == "-" {
        return Ok(format!("{text}\n"));
    }
    std::fs::write(dest, text).map_err(|source| Error::Io {
        path: PathBuf::from(dest),
        source,
    })?;
    Ok(String::new())
}
