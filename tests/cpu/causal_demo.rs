//! A block-causal pipeline for the streaming tests: the embedded demo model copied, with a
//! causal_config.json beside its transformer (chunks of 2 latent frames, a sink of 1, 5
//! frames attended, 4 steps). The demo was not trained block-causally, so its videos here
//! test the streaming machinery (lengths, caches, memory, output), not what they show.

use std::path::{Path, PathBuf};

/// Writes the pipeline under `dir` and returns its root.
pub fn causal_demo(dir: &Path) -> PathBuf {
    let src = reel::models::embedded::ensure().unwrap();
    let root = dir.join("causal-demo");
    copy_dir(&src, &root);
    std::fs::write(
        root.join("transformer").join("causal_config.json"),
        r#"{"chunk_frames": 2, "sink_frames": 1, "local_attn_frames": 5,
            "denoising_steps": [1000, 750, 500, 250], "timestep_shift": 5.0,
            "context_timestep": 0}"#,
    )
    .unwrap();
    root
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}
