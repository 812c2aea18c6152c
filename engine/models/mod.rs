//! Models of the Wan2.1 family, each in its own file mirroring its checkpoint, plus the
//! helpers that find a component folder and read its config.json.

pub mod embedded;
pub mod random;
pub mod umt5;
pub mod wan_dit;
pub mod wan_vae;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Finds the folder of one pipeline component. `path` may be the component folder itself
/// (its config.json's `_class_name` is one of `classes`) or a pipeline root holding
/// `subfolder/config.json`.
pub fn resolve_component(path: &Path, subfolder: &str, classes: &[&str]) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: "no such file or directory".into(),
        });
    }
    if !path.is_dir() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: "expected a model folder (a pipeline root or a component folder)".into(),
        });
    }
    let own = path.join("config.json");
    if own.is_file() {
        let class = class_name(&own)?;
        if class
            .as_deref()
            .map(|c| classes.contains(&c))
            .unwrap_or(true)
        {
            return Ok(path.to_path_buf());
        }
        if !path.join(subfolder).is_dir() {
            return Err(Error::Config {
                path: own,
                reason: format!(
                    "_class_name is {:?}, expected {}",
                    class.unwrap_or_default(),
                    classes.join(" or ")
                ),
            });
        }
    }
    let sub = path.join(subfolder);
    if sub.join("config.json").is_file() {
        return Ok(sub);
    }
    Err(Error::Config {
        path: path.to_path_buf(),
        reason: format!(
            "neither a {} folder (config.json) nor a pipeline root with {subfolder}/config.json",
            classes.join("/")
        ),
    })
}

/// The class a config.json names: diffusers' `_class_name`, or the first of
/// transformers' `architectures`.
pub fn class_name(config: &Path) -> Result<Option<String>> {
    let v: serde_json::Value = read_json(config)?;
    Ok(v.get("_class_name")
        .or_else(|| v.get("architectures").and_then(|a| a.get(0)))
        .and_then(|c| c.as_str())
        .map(str::to_string))
}

/// Reads and parses a JSON file, naming the file and the problem on failure.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
