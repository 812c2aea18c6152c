//! The embedded default model: reel's demo model, a tiny text-to-video pipeline of the Wan2.1
//! architecture (DiT, causal VAE, umT5 text encoder, tokenizer, UniPC) that the project
//! trained itself (tools/train_demo.py) on procedural clips (tools/demo_data.py): a coloured
//! shape (red, green, blue, yellow; circle, square, triangle) moving left, right, up or down
//! on a plain background, 17 frames of 64x64. `reel generate` uses it when no --model is
//! given, so a fresh checkout makes a video of what it was asked for, within that world.
//!
//! The files (about 3 MB, bf16 weights) are embedded in the binary and written once per
//! content under the system's temporary directory, then memory-mapped like any model.
//!
//! This module also writes the random-weight pipelines of the architecture presets
//! (`--model wan2.1-t2v-1.3b --random-weights`), with the small tokenizer golden.py trains.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::random::{random_weights, write_component};
use crate::models::umt5::{Umt5Config, Umt5Encoder};
use crate::models::wan_dit::{WanDit, WanDitConfig};
use crate::models::wan_vae::{WanVae, WanVaeConfig};
use crate::sampler::SchedulerConfig;

pub const NAME: &str = "reel-demo";

/// The tokenizer of the preset pipelines (tools/golden.py's tiny unigram model).
const TOKENIZER: &[u8] = include_bytes!("../assets/tokenizer.json");

macro_rules! demo_files {
    ($($path:literal),* $(,)?) => {
        /// Every file of the demo pipeline, by path relative to its root.
        pub const FILES: &[(&str, &[u8])] = &[$(($path, include_bytes!(concat!("../assets/demo/", $path)))),*];
    };
}
demo_files!(
    "model_index.json",
    "reel_demo.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "reel_demo_causal.json",
    "transformer_causal/config.json",
    "transformer_causal/diffusion_pytorch_model.safetensors",
    "transformer_causal/causal_config.json",
    "vae_causal/config.json",
    "vae_causal/diffusion_pytorch_model.safetensors",
);

/// The block-causal variant of the demo (`reel generate --stream` without --model): the same
/// text encoder and tokenizer; the DiT fine-tuned block-causally on bouncing shapes; a VAE
/// of its own (vae_causal/), trained so that every latent frame carries the shape's colour,
/// which a minute decoded in one stream needs (the demo's VAE keeps it in the first
/// frame's latent, which the causal caches reach for only about ten latent frames).
pub const CAUSAL_NAME: &str = "reel-demo-causal";

/// What the demo model was trained on (reel_demo.json).
pub const DEMO_JSON: &str = "reel_demo.json";

/// The clip size the demo model was trained on; the defaults when it runs.
pub const DEFAULT_SIZE: (usize, usize) = (64, 64);
pub const DEFAULT_FRAMES: usize = 17;
pub const DEFAULT_STEPS: usize = 20;

/// reel_demo.json of the embedded model: its vocabulary, held-out combination, defaults.
pub fn demo_meta() -> serde_json::Value {
    FILES
        .iter()
        .find(|f| f.0 == DEMO_JSON)
        .and_then(|f| serde_json::from_slice(f.1).ok())
        .unwrap_or_default()
}

/// The demo model's guidance scale (chosen by tools/train_demo.py's check over 2, 3 and 5).
pub fn default_guidance() -> f32 {
    demo_meta()["default_guidance"].as_f64().unwrap_or(5.0) as f32
}

/// Words of the demo captions besides colours, shapes and motions.
const FILLER: &[&str] = &[
    "a", "the", "moving", "moves", "going", "drifting", "sliding", "to", "around", "off", "walls",
    "edges",
];

#[derive(serde::Deserialize)]
struct DemoVocabulary {
    colours: Vec<String>,
    shapes: Vec<String>,
    motions: Vec<String>,
    /// A prompt it draws well (default: the moving demo's).
    #[serde(default)]
    example: Option<String>,
}

/// For a pipeline folder holding the demo model: a note when `prompt` leaves the demo's
/// world (no colour, shape or motion it knows, or words it never saw). None otherwise, and
/// for every other model.
pub fn vocabulary_note(model_dir: &Path, prompt: &str) -> Option<String> {
    let text = std::fs::read_to_string(model_dir.join(DEMO_JSON)).ok()?;
    let v: DemoVocabulary = serde_json::from_str(&text).ok()?;
    let lower = prompt.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let has = |set: &[String]| words.iter().any(|w| set.iter().any(|s| s == w));
    let unknown: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| {
            !FILLER.contains(w)
                && !v
                    .colours
                    .iter()
                    .chain(&v.shapes)
                    .chain(&v.motions)
                    .any(|s| s == w)
        })
        .collect();
    if has(&v.colours) && has(&v.shapes) && has(&v.motions) && unknown.is_empty() {
        return None;
    }
    let mut note = format!(
        "the demo model only knows shapes ({}), colours ({}) and motions ({}), e.g. \"{}\"",
        v.shapes.join(", "),
        v.colours.join(", "),
        v.motions
            .iter()
            .map(|m| if m.starts_with("bounc") {
                m.clone()
            } else {
                format!("moving {m}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        v.example.as_deref().unwrap_or("a red circle moving right")
    );
    if !unknown.is_empty() {
        note += &format!("; it never saw: {}", unknown.join(", "));
    }
    note += ". Expect an arbitrary clip; pass --model DIR for Wan2.1 weights.";
    Some(note)
}

/// For the demo model (`meta`: its reel_demo.json): a note when (w, h, frames) is not a size
/// and length it was trained at, where it draws noise (and, on the cpu, takes long). None
/// at a trained size and for every other model (no `trained_sizes` field).
pub fn size_note_meta(
    meta: &serde_json::Value,
    w: usize,
    h: usize,
    frames: usize,
) -> Option<String> {
    let sizes: Vec<&str> = meta["trained_sizes"]
        .as_array()?
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    // "any": a block-causal model, which makes any length chunk by chunk.
    let any_length = meta["trained_frames"] == "any";
    let lengths: Vec<u64> = if any_length {
        Vec::new()
    } else {
        meta["trained_frames"]
            .as_array()?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect()
    };
    let size = format!("{w}x{h}");
    if sizes.contains(&size.as_str()) && (any_length || lengths.contains(&(frames as u64))) {
        return None;
    }
    if any_length {
        return Some(format!(
            "the demo model was trained on {} clips only and draws well at that size only: at {size} expect noise",
            sizes.join(", ")
        ));
    }
    let list = |v: Vec<String>| v.join(", ");
    Some(format!(
        "the demo model was trained on {} clips of {} frames only and draws well at those sizes only: \
         at {size} x {frames} frames expect noise (pass --model DIR for Wan2.1 weights)",
        list(sizes.iter().map(|s| s.to_string()).collect()),
        list(lengths.iter().map(|f| f.to_string()).collect()),
    ))
}

/// [`size_note_meta`] for the pipeline folder `model_dir` (None unless it holds the demo).
pub fn size_note(model_dir: &Path, w: usize, h: usize, frames: usize) -> Option<String> {
    let text = std::fs::read_to_string(model_dir.join(DEMO_JSON)).ok()?;
    size_note_meta(&serde_json::from_str(&text).ok()?, w, h, frames)
}

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The folder of the embedded model, written on first use.
pub fn ensure() -> Result<PathBuf> {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    write_variant(NAME, &HASH, &|path| {
        (!path.starts_with("transformer_causal/")
            && !path.starts_with("vae_causal/")
            && path != "reel_demo_causal.json")
            .then(|| path.to_string())
    })
}

/// The folder of the embedded model's block-causal variant (see [`CAUSAL_NAME`]), written
/// on first use: its transformer/ is transformer_causal/, its vae/ vae_causal/, its
/// reel_demo.json reel_demo_causal.json.
pub fn ensure_causal() -> Result<PathBuf> {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    write_variant(CAUSAL_NAME, &HASH, &|path| {
        if path.starts_with("transformer/") || path.starts_with("vae/") || path == DEMO_JSON {
            None
        } else if let Some(rest) = path.strip_prefix("transformer_causal/") {
            Some(format!("transformer/{rest}"))
        } else if let Some(rest) = path.strip_prefix("vae_causal/") {
            Some(format!("vae/{rest}"))
        } else if path == "reel_demo_causal.json" {
            Some(DEMO_JSON.to_string())
        } else {
            Some(path.to_string())
        }
    })
}

/// Writes the embedded files that `map` keeps (under the path it gives) into a folder named
/// after `name` and their content, once.
fn write_variant(
    name: &str,
    hash: &std::sync::OnceLock<u64>,
    map: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf> {
    // One writer per process at a time; across processes the rename decides.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let files: Vec<(String, &[u8])> = FILES
        .iter()
        .filter_map(|(p, b)| map(p).map(|to| (to, *b)))
        .collect();
    // The content hash names the folder, so a new model never meets an old folder.
    let hash = *hash.get_or_init(|| {
        files.iter().fold(0xcbf2_9ce4_8422_2325, |h, (p, b)| {
            fnv1a(fnv1a(h, p.as_bytes()), b)
        })
    });
    let dir =
        std::env::temp_dir().join(format!("{name}-{}-{hash:016x}", env!("CARGO_PKG_VERSION")));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    // Write beside, then rename: concurrent first runs never see a half-written folder.
    let tmp = std::env::temp_dir().join(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (path, bytes) in &files {
        let p = tmp.join(path);
        let io = |source| Error::Io {
            path: p.clone(),
            source,
        };
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&p, bytes).map_err(io)?;
    }
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

fn json<T: serde::Serialize>(v: &T, class: &str) -> Result<serde_json::Value> {
    let mut j = serde_json::to_value(v).map_err(|e| Error::invalid(e.to_string()))?;
    if let Some(o) = j.as_object_mut() {
        o.insert("_class_name".into(), class.into());
    }
    Ok(j)
}

/// Writes a pipeline of the given architecture with deterministic random weights (the Wan2.1
/// VAE, the embedded tokenizer) under the temporary directory; for the presets.
pub fn write_random_pipeline(
    name: &str,
    dit: &WanDitConfig,
    text: Option<&Umt5Config>,
) -> Result<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Without a text encoder (a bench of the DiT) the folder is another one: a pipeline with
    // prompt embeddings needs no text_encoder/ or tokenizer/.
    let variant = if text.is_some() { "" } else { "-no-text" };
    let dir = std::env::temp_dir().join(format!(
        "reel-{name}-random{variant}-{}",
        env!("CARGO_PKG_VERSION")
    ));
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

fn write_pipeline(
    dir: &Path,
    dit: &WanDitConfig,
    vae: &WanVaeConfig,
    text: Option<&Umt5Config>,
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
    if let Some(text) = text {
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
    }
    let sched = dir.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(io(&sched))?;
    let sc = serde_json::to_string_pretty(&SchedulerConfig::default())
        .map_err(|e| Error::invalid(e.to_string()))?;
    std::fs::write(sched.join("scheduler_config.json"), sc).map_err(io(&sched))?;
    let mut index = serde_json::json!({
        "_class_name": "WanPipeline",
        "_reel_note": "an architecture preset with random weights: a smoke test, its videos are noise",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    });
    if text.is_some() {
        index["text_encoder"] = serde_json::json!(["transformers", "UMT5EncoderModel"]);
        index["tokenizer"] = serde_json::json!(["transformers", "T5TokenizerFast"]);
    }
    std::fs::write(dir.join("model_index.json"), index.to_string()).map_err(io(dir))?;
    Ok(())
}
