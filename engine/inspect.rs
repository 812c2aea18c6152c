//! `reel inspect`: what a model folder holds (component kind, config, parameter count,
//! dtypes, and a summary of its tensors with repeated blocks folded together).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::models::read_json;

use crate::weights::WeightStore;

/// One component folder's summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentReport {
    pub folder: String,
    pub class_name: Option<String>,
    pub config: serde_json::Value,
    pub files: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    /// dtype → number of parameters.
    pub dtypes: BTreeMap<String, u64>,
    /// Tensor names with block indices folded into `{a..b}`: (pattern, shape, dtype, count).
    pub summary: Vec<(String, Vec<usize>, String, usize)>,
}

/// Inspects a pipeline root (every component listed in model_index.json that has weights)
/// or a single component folder.
pub fn inspect(path: &Path) -> Result<Vec<ComponentReport>> {
    let index = path.join("model_index.json");
    if index.is_file() {
        let v: serde_json::Value = read_json(&index)?;
        let mut out = Vec::new();
        if let Some(map) = v.as_object() {
            for (name, spec) in map {
                if name.starts_with('_') || !spec.is_array() {
                    continue;
                }
                let dir = path.join(name);
                if dir.join("config.json").is_file() {
                    out.push(component(&dir)?);
                }
            }
        }
        return Ok(out);
    }
    if path.join("config.json").is_file() {
        return Ok(vec![component(path)?]);
    }
    Err(Error::Config {
        path: path.to_path_buf(),
        reason: "neither a pipeline root (model_index.json) nor a component folder (config.json)"
            .into(),
    })
}

/// `blocks.17.attn1.to_out.0.weight` → `blocks.{i}.attn1.to_out.0.weight`: the first
/// numeric segment is the layer index and is folded; later ones are module positions.
fn fold_indices(name: &str) -> String {
    let mut folded = false;
    name.split('.')
        .map(|p| {
            if !folded && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                folded = true;
                "{i}"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn component(dir: &Path) -> Result<ComponentReport> {
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    let class_name = crate::models::class_name(&dir.join("config.json"))?;
    let store = WeightStore::open_component(dir)?;
    let mut dtypes = BTreeMap::new();
    let mut groups: BTreeMap<(String, Vec<usize>, String), usize> = BTreeMap::new();
    let (mut parameters, mut bytes) = (0u64, 0u64);
    for e in store.entries() {
        let n = e.numel() as u64;
        parameters += n;
        bytes += e.nbytes() as u64;
        *dtypes.entry(e.dtype.to_string()).or_insert(0) += n;
        *groups
            .entry((fold_indices(&e.name), e.shape.clone(), e.dtype.to_string()))
            .or_insert(0) += 1;
    }
    Ok(ComponentReport {
        folder: dir.display().to_string(),
        class_name,
        config,
        files: store.files().map(|p| p.display().to_string()).collect(),
        tensors: store.len(),
        parameters,
        bytes,
        dtypes,
        summary: groups
            .into_iter()
            .map(|((n, s, d), c)| (n, s, d, c))
            .collect(),
    })
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n as f64 / 1024.0),
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The human-readable report.
pub fn render(reports: &[ComponentReport]) -> String {
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(
            s,
            "== {} ({})",
            r.folder,
            r.class_name.as_deref().unwrap_or("unknown class")
        );
        let _ = writeln!(
            s,
            "   {} tensors, {} parameters, {} in {} file(s)",
            r.tensors,
            human(r.parameters),
            human_bytes(r.bytes),
            r.files.len()
        );
        let dts: Vec<String> = r
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d}: {}", human(*n)))
            .collect();
        let _ = writeln!(s, "   dtypes: {}", dts.join(", "));
        if let Some(obj) = r.config.as_object() {
            let _ = writeln!(s, "   config:");
            for (k, v) in obj {
                if !k.starts_with('_') {
                    let _ = writeln!(s, "     {k} = {v}");
                }
            }
        }
        let _ = writeln!(s, "   tensors:");
        for (name, shape, dtype, count) in &r.summary {
            let times = if *count > 1 {
                format!(" ×{count}")
            } else {
                String::new()
            };
            let _ = writeln!(s, "     {name:<56} {shape:?} {dtype}{times}");
        }
    }
    s
}
