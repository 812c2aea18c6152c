//! Build script:
//! - records the git commit (reports and `reel --version` name it);
//! - compiles every kernels/*.cu with nvcc into a fatbin (sm_90a and sm_80 machine code plus
//!   compute_80 PTX) embedded in the binary, keeping ptxas's -v report beside it. nvcc is
//!   looked up in $NVCC, $CUDA_HOME/bin, PATH, then .toolchain/ (tools/install-cuda-toolchain.sh).
//!   Without it the build warns and goes on with the emulator only; REEL_REQUIRE_NVCC=1 makes
//!   a missing nvcc an error (CI sets it);
//! - always compiles the same .cu files for the host with -DREEL_EMU, with the SIMT emulator
//!   (kernels/emu), into the static library the emu device calls.

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("NVCC").map(PathBuf::from).and_then(exe) {
        return Some(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        if let Some(p) = exe(PathBuf::from(home).join("bin/nvcc")) {
            return Some(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    exe(PathBuf::from(".toolchain/nvidia/cu13/bin/nvcc"))
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

fn git_commit() {
    println!("cargo:rerun-if-env-changed=REEL_GIT_COMMIT");
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

fn main() {
    git_commit();
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=REEL_REQUIRE_NVCC");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    // The emulation library: the emulator and every kernel compiled for the host.
    let mut emu = cc::Build::new();
    emu.cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("REEL_EMU", None)
        .include("kernels")
        .file("kernels/emu/emu.cpp")
        .warnings(false);
    for src in &sources {
        // The .cu files are C++ under REEL_EMU.
        let copy = out.join(format!(
            "{}.emu.cpp",
            src.file_stem().unwrap_or_default().to_string_lossy()
        ));
        let text = std::fs::read_to_string(src).expect("read kernel source");
        let abs = std::fs::canonicalize("kernels").expect("kernels dir");
        std::fs::write(
            &copy,
            text.replace(
                "#include \"common/",
                &format!("#include \"{}/common/", abs.display()),
            ),
        )
        .expect("write emu source");
        emu.file(&copy);
    }
    emu.compile("reel_emu");

    // Fatbins for the GPU.
    let nvcc = find_nvcc();
    let require = std::env::var("REEL_REQUIRE_NVCC")
        .map(|v| v == "1")
        .unwrap_or(false);
    let mut table = String::from("/// (kernel file stem, fatbin) for every kernels/*.cu, built by nvcc.\npub static FATBINS: &[(&str, &[u8])] = &[\n");
    let mut reports = String::from("/// (kernel file stem, ptxas -v report).\npub static PTXAS_REPORTS: &[(&str, &str)] = &[\n");
    match &nvcc {
        Some(nvcc) => {
            for src in &sources {
                let stem = src.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                let fatbin = out.join(format!("{stem}.fatbin"));
                let o = Command::new(nvcc)
                    .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"])
                    .args(["-gencode", "arch=compute_90a,code=sm_90a"])
                    .args(["-gencode", "arch=compute_80,code=sm_80"])
                    .args(["-gencode", "arch=compute_80,code=compute_80"])
                    .arg("-Ikernels")
                    .arg("-o")
                    .arg(&fatbin)
                    .arg(src)
                    .output()
                    .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
                let report = String::from_utf8_lossy(&o.stderr).into_owned();
                if !o.status.success() {
                    panic!("nvcc failed on {}:\n{report}", src.display());
                }
                let rpath = out.join(format!("{stem}.ptxas.txt"));
                std::fs::write(&rpath, &report).expect("write ptxas report");
                table += &format!("    ({stem:?}, include_bytes!({:?})),\n", fatbin.display().to_string());
                reports += &format!("    ({stem:?}, include_str!({:?})),\n", rpath.display().to_string());
            }
            let cuobjdump = nvcc.with_file_name("cuobjdump");
            println!("cargo:rustc-env=REEL_CUOBJDUMP={}", cuobjdump.display());
            println!("cargo:rustc-env=REEL_NVCC={}", nvcc.display());
        }
        None if require => panic!(
            "REEL_REQUIRE_NVCC=1 but no nvcc in $NVCC, $CUDA_HOME/bin, PATH or .toolchain/: run tools/install-cuda-toolchain.sh"
        ),
        None => {
            println!(
                "cargo:warning=no nvcc found: building the SIMT emulator only (no GPU kernels). Run tools/install-cuda-toolchain.sh for them."
            );
            println!("cargo:rustc-env=REEL_CUOBJDUMP=");
            println!("cargo:rustc-env=REEL_NVCC=");
        }
    }
    table += "];\n";
    reports += "];\n";
    std::fs::write(out.join("kernels.rs"), table + &reports).expect("write kernels.rs");
    let _ = Path::new("kernels");
}
