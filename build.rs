//! Build script. Today it records the git commit (reports and `reel --version` name it);
//! the kernel issue adds the CUDA side here: nvcc compiles kernels/*.cu into fatbins
//! embedded in the binary, and the host C++ compiler builds the SIMT emulation library.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=REEL_GIT_COMMIT");
    // Rebuild when HEAD moves: HEAD itself names a branch whose ref file changes on commit.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{r}");
        }
    }
    let commit = std::env::var("REEL_GIT_COMMIT").ok().or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=REEL_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
