//! The embedded default model: a tiny pipeline of the Wan architecture (DiT, causal VAE,
//! umT5 text encoder, tokenizer, UniPC) with deterministic random weights made in-process.
//! It is a smoke test of the whole pipeline, not a trained model: its videos are noise.
//! `reel generate` uses it when no --model is given, so a fresh checkout runs end to end in
//! seconds.
//!
//! The tokenizer is the tiny unigram model tools/golden.py trains with sentencepiece
//! (engine/assets/tokenizer.json). The folder is written once per version and config under
//! the system's temporary directory and memory-mapped like any model.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::random::{random_weights, write_component};
use crate::models::umt5::{Umt5Config, Umt5Encoder};
use crate::models::wan_dit::{WanDit, WanDitConfig};
use crate::models::wan_vae::{WanVae, WanVaeConfig};
use crate::sampler::SchedulerConfig;

pub const NAME: &str = "reel-embedded-tiny-random";

const TOKENIZER: &[u8] = include_bytes!("../assets/tokenizer.json");
/// Pieces in the embedded tokenizer (checked by a test).
pub const VOCAB: usize = 145;

/// Small defaults that finish in seconds on two cores.
pub const DEFAULT_SIZE: (usize, usize) = (64, 64);
pub const DEFAULT_FRAMES: usize = 17;
pub const DEFAULT_STEPS: usize = 8;

pub fn dit_config() -> WanDitConfig {
    WanDitConfig {
        num_attention_heads: 2,
        attention_head_dim: 32,
        text_dim: 32,
        freq_dim: 64,
        ffn_dim: 128,
        num_layers: 2,
        ..Default::default()
    }
}

pub fn vae_config() -> WanVaeConfig {
    WanVaeConfig {
        base_dim: 8,
        dim_mult: vec![1, 2, 2, 2],
        num_res_blocks: 1,
        ..Default::default()
    }
}

pub fn text_config() -> Umt5Config {
    Umt5Config {
        vocab_size: VOCAB,
        d_model: 32,
        d_kv: 8,
        d_ff: 64,
        num_layers: 2,
        num_heads: 4,
        ..Default::default()
    }
}

fn json<T: serde::Serialize>(v: &T, class: &str) -> Result<serde_json::Value> {
    let mut j = serde_json::to_value(v).map_err(|e| Error::invalid(e.to_string()))?;
    if let Some(o) = j.as_object_mut() {
        o.insert("_class_name".into(), class.into());
    }
    Ok(j)
}

/// Writes a pipeline of the given architecture with deterministic random weights (the Wan2.1
/// VAE, the embedded tokenizer) under the temporary directory; for the presets.
pub fn write_random_pipeline(name: &str, dit: &WanDitConfig, text: &Umt5Config) -> Result<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir =
        std::env::temp_dir().join(format!("reel-{name}-random-{}", env!("CARGO_PKG_VERSION")));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let tmp =
        std::env::temp_dir().join(format!("reel-{name}-random.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_pipeline(&tmp, dit, &WanVaeConfig::default(), text)?;
    std::fs::rename(&tmp, &dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn write_all(dir: &Path) -> Result<()> {
    write_pipeline(dir, &dit_config(), &vae_config(), &text_config())
}

fn write_pipeline(
    dir: &Path,
    dit: &WanDitConfig,
    vae: &WanVaeConfig,
    text: &Umt5Config,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    write_component(
        &dir.join("transformer"),
        &json(dit, "WanTransformer3DModel")?,
        &random_weights(&WanDit::weight_specs(dit), 1),
    )?;
    write_component(
        &dir.join("vae"),
        &json(vae, "AutoencoderKLWan")?,
        &random_weights(&WanVae::weight_specs(vae), 2),
    )?;
    let mut te = json(text, "UMT5EncoderModel")?;
    if let Some(o) = te.as_object_mut() {
        o.remove("_class_name");
        o.insert(
            "architectures".into(),
            serde_json::json!(["UMT5EncoderModel"]),
        );
    }
    write_component(
        &dir.join("text_encoder"),
        &te,
        &random_weights(&Umt5Encoder::weight_specs(text), 3),
    )?;
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).map_err(io(&tok))?;
    std::fs::write(tok.join("tokenizer.json"), TOKENIZER).map_err(io(&tok))?;
    let sched = dir.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(io(&sched))?;
    let sc = serde_json::to_string_pretty(&SchedulerConfig::default())
        .map_err(|e| Error::invalid(e.to_string()))?;
    std::fs::write(sched.join("scheduler_config.json"), sc).map_err(io(&sched))?;
    let index = serde_json::json!({
        "_class_name": "WanPipeline",
        "_reel_note": "reel's embedded default: random weights, a smoke test of the pipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    });
    std::fs::write(dir.join("model_index.json"), index.to_string()).map_err(io(dir))?;
    Ok(())
}

/// The folder of the embedded model, written on first use.
pub fn ensure() -> Result<PathBuf> {
    // One writer per process at a time; across processes the rename decides.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("{NAME}-{}", env!("CARGO_PKG_VERSION")));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    // Write beside, then rename: concurrent first runs never see a half-written folder.
    let tmp = std::env::temp_dir().join(format!("{NAME}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_all(&tmp)?;
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model_index.json").is_file() {
            return Err(Error::invalid(format!(
                "could not create the embedded model in {}",
                dir.display()
            )));
        }
    }
    Ok(dir)
}
