//! Integration tests on the CPU device, in one binary (linking is slow on 2 cores).
//! Golden data under tests/data comes from tools/golden.py (diffusers, float64).

mod bench;
mod dit;
mod embeddings;
mod generate;
mod pipeline;
mod text;
mod vae;
mod weights;

use std::path::PathBuf;

pub fn data(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(case)
}

/// A fresh scratch directory under the target dir, removed at the start of each use.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
