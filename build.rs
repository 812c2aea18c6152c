//! Build script:
//! - records the git commit (reports and `reel --version` name it);
//! - compiles every kernels/*.cu with nvcc into a fatbin (sm_90a and sm_80 machine code plus
//!   compute_80 PTX; a `*.sm90.cu` file, for Hopper-only instructions, sm_90a alone) embedded
//!   in the binary, keeping ptxas's -v report beside it. nvcc is looked up in $NVCC,
//!   $CUDA_HOME/bin, PATH, then .toolchain/ (tools/install-cuda-toolchain.sh), and must be
//!   13.0. Without it (or with another version) the build warns and goes on with the emulator
//!   only; REEL_REQUIRE_NVCC=1 makes that an error (CI sets it);
//! - always compiles the same .cu files for the host with -DREEL_EMU, with the SIMT emulator
//!   (kernels/emu), into the static library the emu device calls, and lists the kernels they
//!   export (EXPORTED), so a test can require a checked launcher for each.

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

/// nvcc's version ("13.0") from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88").
fn nvcc_version(nvcc: &Path) -> Option<String> {
    let o = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let rest = &text[text.find("release ")? + "release ".len()..];
    Some(rest.split(',').next()?.trim().to_string())
}

/// The kernels each source exports: the names in its `REEL_EMU_EXPORT(name)` lines.
fn exported(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("REEL_EMU_EXPORT("))
        .filter_map(|r| r.split(')').next())
        .map(|n| n.trim().to_string())
        .collect()
}

fn main() {
    git_commit();
    println!("cargo:rerun-if-changed=kernels");
    // A toolchain installed after the first build must trigger a rebuild with GPU kernels.
    // A missing path would rerun this script (and rebuild the crate) on every build, so
    // watch the install stamp once it exists, else the (created, empty) .toolchain folder,
    // whose contents the install then changes.
    if Path::new(".toolchain/.installed").exists() {
        println!("cargo:rerun-if-changed=.toolchain/.installed");
    } else if std::fs::create_dir_all(".toolchain").is_ok() {
        println!("cargo:rerun-if-changed=.toolchain");
    }
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
    let stem_of = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_end_matches(".cu")
            .to_string()
    };

    // The emulation library: the emulator and every kernel compiled for the host.
    let mut emu = cc::Build::new();
    emu.cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("REEL_EMU", None)
        .include("kernels")
        .file("kernels/emu/emu.cpp")
        // A kernel with a large local array must hit its fiber's guard page, not jump over it
        // into the next fiber's stack: probe every page of a large frame.
        .flag_if_supported("-fstack-clash-protection")
        // The 64-byte-aligned TensorMap parameters of the Hopper kernels: GCC notes an ABI
        // change of 2011 that concerns no caller here (the emulator passes them by pointer).
        .flag_if_supported("-Wno-psabi")
        .warnings(false);
    let mut exports = String::from(
        "/// (kernel, file stem) for every REEL_EMU_EXPORT in kernels/*.cu.\npub static EXPORTED: &[(&str, &str)] = &[\n",
    );
    let abs = std::fs::canonicalize("kernels").expect("kernels dir");
    for src in &sources {
        // The .cu files are C++ under REEL_EMU.
        let stem = stem_of(src);
        let copy = out.join(format!("{stem}.emu.cpp"));
        let text = std::fs::read_to_string(src).expect("read kernel source");
        for name in exported(&text) {
            exports += &format!("    ({name:?}, {stem:?}),\n");
        }
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
    exports += "];\n";
    emu.compile("reel_emu");

    // Fatbins for the GPU, from nvcc 13.0 only: the project's GPU machines run driver 580
    // (CUDA 13.0), which cannot load PTX from a newer nvcc.
    let require = std::env::var("REEL_REQUIRE_NVCC")
        .map(|v| v == "1")
        .unwrap_or(false);
    let nvcc = match find_nvcc() {
        Some(nvcc) => match nvcc_version(&nvcc) {
            Some(v) if v == "13.0" => Some((nvcc, v)),
            v => {
                let what = format!(
                    "{} is CUDA {}, not 13.0 (the GPU machines' driver 580 cannot load what a newer nvcc makes)",
                    nvcc.display(),
                    v.as_deref().unwrap_or("of an unknown version")
                );
                if require {
                    panic!("REEL_REQUIRE_NVCC=1: {what}; run tools/install-cuda-toolchain.sh and set NVCC=.toolchain/nvidia/cu13/bin/nvcc");
                }
                println!("cargo:warning={what}: building the SIMT emulator only (no GPU kernels)");
                None
            }
        },
        None if require => panic!(
            "REEL_REQUIRE_NVCC=1 but no nvcc in $NVCC, $CUDA_HOME/bin, PATH or .toolchain/: run tools/install-cuda-toolchain.sh"
        ),
        None => {
            println!(
                "cargo:warning=no nvcc found: building the SIMT emulator only (no GPU kernels). Run tools/install-cuda-toolchain.sh for them."
            );
            None
        }
    };
    let mut table = String::from("pub static FATBINS: &[Fatbin] = &[\n");
    match &nvcc {
        Some((nvcc, version)) => {
            for src in &sources {
                let stem = stem_of(src);
                // `.sm90.cu` files use Hopper-only instructions (wgmma, TMA): sm_90a alone.
                let targets: &[(&str, &str)] = if stem.ends_with(".sm90") {
                    &[("compute_90a", "sm_90a")]
                } else {
                    &[
                        ("compute_90a", "sm_90a"),
                        ("compute_80", "sm_80"),
                        ("compute_80", "compute_80"),
                    ]
                };
                let fatbin = out.join(format!("{stem}.fatbin"));
                let mut cmd = Command::new(nvcc);
                cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"]);
                for (arch, code) in targets {
                    cmd.args(["-gencode", &format!("arch={arch},code={code}")]);
                }
                let o = cmd
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
                let codes: Vec<&str> = targets.iter().map(|t| t.1).collect();
                table += &format!(
                    "    Fatbin {{ stem: {stem:?}, image: include_bytes!({:?}), targets: {:?}, ptxas_report: include_str!({:?}) }},\n",
                    fatbin.display().to_string(),
                    codes.join(" "),
                    rpath.display().to_string()
                );
            }
            let cuobjdump = nvcc.with_file_name("cuobjdump");
            println!("cargo:rustc-env=REEL_CUOBJDUMP={}", cuobjdump.display());
            println!("cargo:rustc-env=REEL_NVCC={}", nvcc.display());
            println!("cargo:rustc-env=REEL_NVCC_VERSION={version}");
        }
        None => {
            println!("cargo:rustc-env=REEL_CUOBJDUMP=");
            println!("cargo:rustc-env=REEL_NVCC=");
            println!("cargo:rustc-env=REEL_NVCC_VERSION=");
        }
    }
    table += "];\n";
    std::fs::write(out.join("kernels.rs"), table + &exports).expect("write kernels.rs");
}
