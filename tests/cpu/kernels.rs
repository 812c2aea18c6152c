//! Kernels against the CPU reference on the kernel device REEL_TEST_DEVICE names (the SIMT
//! emulator by default; `cuda` on a GPU machine, see tools/gpu-check.sh), the launchers'
//! argument structs against the kernels' C++ signatures, and static checks of the nvcc build
//! (ptxas spills, sm_90a code). The wrappers' self-tests are in wrappers.rs, the emulator's
//! own rules in emu.rs.

use reel::kernels::{self as k, Buf, Elem, KernelDevice, FATBINS};

/// The device under test.
pub fn dev() -> KernelDevice {
    KernelDevice::from_test_env().expect("REEL_TEST_DEVICE")
}

pub fn up<T: Elem>(d: &KernelDevice, v: &[T]) -> Buf<T> {
    Buf::upload(d, v).unwrap()
}

pub fn down<T: Elem>(b: &Buf<T>) -> Vec<T> {
    b.download().unwrap()
}

pub fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = reel::models::random::Normal::new(seed);
    (0..n).map(|_| 3.0 * rng.sample()).collect()
}

/// Integers in lo..=hi (xorshift).
pub fn small_ints(n: usize, seed: u64, lo: i32, hi: i32) -> Vec<i32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (s % (hi - lo + 1) as u64) as i32
        })
        .collect()
}

pub fn bf16s(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| half::bf16::from_f32(x)).collect()
}

pub fn f32s(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn gelu_f32_matches_cpu_reference() {
    for n in [1usize, 255, 257, 100_003] {
        let x = vals(n, n as u64);
        let d = dev();
        let mut yb = Buf::filled(&d, n, f32::NAN).unwrap(); // poisoned: every element must be written
        k::gelu_tanh_f32(&d, &up(&d, &x), &mut yb).unwrap();
        let y = down(&yb);
        let mut want = x.clone();
        reel::cpu::gelu(&mut want);
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!(a.is_finite(), "n={n}: element {i} not written");
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "n={n} [{i}]: emu {a} vs cpu {b}"
            );
        }
    }
    let d = dev();
    let mut two = Buf::filled(&d, 2, 0.0f32).unwrap();
    assert!(k::gelu_tanh_f32(&d, &up(&d, &[1.0]), &mut two).is_err());
}

#[test]
fn bf16_conversions_match_half() {
    let mut x = vals(10_007, 9);
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        3.4e38,
        f32::from_bits(0x3F80_8000), // 1 + 2^-8: a tie, rounds to even (down)
        f32::from_bits(0x3F81_8000), // 1 + 3·2^-8: a tie, rounds to even (up)
    ]);
    let d = dev();
    let mut bb = Buf::filled(&d, x.len(), half::bf16::from_bits(0x7fc1)).unwrap();
    k::f32_to_bf16(&d, &up(&d, &x), &mut bb).unwrap();
    let b = down(&bb);
    for (i, (&got, &v)) in b.iter().zip(&x).enumerate() {
        assert_eq!(
            got.to_bits(),
            half::bf16::from_f32(v).to_bits(),
            "[{i}] {v}"
        );
    }
    let mut backb = Buf::filled(&d, x.len(), f32::NAN).unwrap();
    k::bf16_to_f32(&d, &bb, &mut backb).unwrap();
    let back = down(&backb);
    assert!(back
        .iter()
        .zip(&b)
        .all(|(&f, &h)| f.to_bits() == h.to_f32().to_bits()));
    let mut nan = Buf::filled(&d, 1, half::bf16::ZERO).unwrap();
    k::f32_to_bf16(&d, &up(&d, &[f32::NAN]), &mut nan).unwrap();
    assert!(down(&nan)[0].is_nan());
}

#[test]
fn layernorm_modulate_bf16_matches_cpu_within_bf16_rounding() {
    use half::bf16;
    for (rows_per_group, groups, d) in [(5usize, 3usize, 333usize), (2, 2, 1536), (1, 1, 7)] {
        let rows = rows_per_group * groups;
        let x: Vec<bf16> = vals(rows * d, d as u64)
            .iter()
            .map(|&v| bf16::from_f32(v + 0.5))
            .collect();
        let mul: Vec<f32> = vals(groups * d, 7).iter().map(|v| 1.0 + 0.1 * v).collect();
        let add: Vec<f32> = vals(groups * d, 8).iter().map(|v| 0.1 * v).collect();
        let dv = dev();
        let mut yb = Buf::filled(&dv, rows * d, bf16::from_bits(0x7fc1)).unwrap(); // poisoned with NaN
        k::layernorm_modulate_bf16(
            &dv,
            &up(&dv, &x),
            &mut yb,
            d,
            &up(&dv, &mul),
            &up(&dv, &add),
            rows_per_group,
            1e-6,
        )
        .unwrap();
        let y = down(&yb);
        // The f32 oracle on the same (bf16) inputs, and the naive bf16 reference: the oracle
        // rounded to bf16.
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut want = vec![0.0f32; rows * d];
        reel::cpu::layer_norm(
            &xf,
            &mut want,
            d,
            1e-6,
            Some(&mul),
            Some(&add),
            rows_per_group,
        );
        let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let got: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "d={d}: unwritten or non-finite outputs"
        );
        let naive: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let err = reel::tensor::rel_l2(&got, &want64);
        let naive_err = reel::tensor::rel_l2(&naive, &want64);
        assert!(
            err <= 1e-2 && err <= 2.0 * naive_err,
            "d={d}: rel L2 {err:.3e} (naive bf16 {naive_err:.3e})"
        );
    }
}

/// bf16 kernel vs the f32 CPU oracle on the same (bf16) inputs: relative L2 ≤ 1e-2 and no
/// worse than 2× the naive bf16 reference (the oracle rounded to bf16).
fn check_bf16(name: &str, got: &[half::bf16], want: &[f32]) {
    check_half(name, got, want)
}

/// `got` within twice the error of rounding `want` to T (and 1e-2).
fn check_half<T: reel::kernels::Half>(name: &str, got: &[T], want: &[f32]) {
    let g: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
    assert!(
        g.iter().all(|v| v.is_finite()),
        "{name}: unwritten or non-finite outputs"
    );
    let w64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let naive: Vec<f32> = want.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let (err, naive_err) = (
        reel::tensor::rel_l2(&g, &w64),
        reel::tensor::rel_l2(&naive, &w64),
    );
    assert!(
        err <= 1e-2 && err <= 2.0 * naive_err.max(1e-7),
        "{name}: rel L2 {err:.3e} (rounding to storage {naive_err:.3e})"
    );
}

#[test]
fn rms_norm_rope_bf16_matches_cpu() {
    for (heads, hd, grid) in [
        (2usize, 16usize, [2usize, 3, 2]),
        (3, 24, [1, 2, 5]),
        (1, 128, [3, 2, 2]),
    ] {
        let d = heads * hd;
        let rope = reel::cpu::wan_rope_tables(hd, grid[0], grid[1], grid[2], 10000.0);
        let rows = 2 * rope.tokens; // batch 2: rows wrap around the tables
        let x = bf16s(&vals(rows * d, d as u64));
        let bias: Vec<f32> = vals(d, 3).iter().map(|v| 0.1 * v).collect();
        let w: Vec<f32> = vals(d, 4).iter().map(|v| 1.0 + 0.1 * v).collect();
        for with_rope in [true, false] {
            let r = with_rope.then_some(&rope);
            let dv = dev();
            let (cos, sin) = (up(&dv, &rope.cos), up(&dv, &rope.sin));
            let rb = with_rope.then_some(k::Rope {
                cos: cos.slice(),
                sin: sin.slice(),
                head_dim: rope.head_dim,
                tokens: rope.tokens,
            });
            let mut gb = up(&dv, &x);
            k::rms_norm_rope_bf16(
                &dv,
                &mut gb,
                d,
                Some(up(&dv, &bias).slice()),
                &up(&dv, &w),
                1e-6,
                rb,
            )
            .unwrap();
            let got = down(&gb);
            let mut want = f32s(&x);
            reel::cpu::rms_norm_rope(&mut want, d, Some(&bias), &w, 1e-6, r);
            check_bf16(
                &format!("rms_norm_rope hd={hd} rope={with_rope}"),
                &got,
                &want,
            );
        }
    }
}

fn channel_rms_silu_matches_cpu<T: reel::kernels::Half>() {
    // Odd c (16-bit singles), rows not a multiple of the block's 8, in place and not.
    for (rows, c) in [(37usize, 8usize), (5, 96), (3, 384), (11, 3), (9, 70)] {
        let x: Vec<T> = vals(rows * c, c as u64)
            .iter()
            .map(|&v| T::from_f32(v))
            .collect();
        let gamma: Vec<f32> = vals(c, 5).iter().map(|v| 1.0 + 0.1 * v).collect();
        for (silu, in_place) in [(true, false), (false, true), (true, true)] {
            let dv = dev();
            let xb = up(&dv, &x);
            let yb = Buf::filled(&dv, rows * c, T::from_f32(f32::NAN)).unwrap();
            let out = if in_place { &xb } else { &yb };
            k::channel_rms_silu(&dv, &xb, out, c, &up(&dv, &gamma), silu).unwrap();
            let got = down(out);
            let mut want: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            reel::cpu::channel_rms_norm(&mut want, c, &gamma, silu);
            check_half(&format!("channel_rms c={c} silu={silu}"), &got, &want);
        }
    }
}

#[test]
fn channel_rms_silu_bf16_matches_cpu() {
    channel_rms_silu_matches_cpu::<half::bf16>()
}

#[test]
fn channel_rms_silu_f16_matches_cpu() {
    channel_rms_silu_matches_cpu::<half::f16>()
}

#[test]
fn residual_gate_and_gelu_bf16_match_cpu() {
    let (per, groups, d) = (7usize, 3usize, 40usize);
    let rows = per * groups;
    let x = bf16s(&vals(rows * d, 1));
    let y = bf16s(&vals(rows * d, 2));
    let bias = vals(d, 3);
    let gate = vals(groups * d, 4);
    for (b, g) in [
        (Some(&bias[..]), Some(&gate[..])),
        (None, Some(&gate[..])),
        (Some(&bias[..]), None),
        (None, None),
    ] {
        let dv = dev();
        let (bb, gg) = (b.map(|v| up(&dv, v)), g.map(|v| up(&dv, v)));
        let mut gb = up(&dv, &x);
        k::residual_gate_bf16(
            &dv,
            &mut gb,
            &up(&dv, &y),
            d,
            k::opt(bb.as_ref()),
            k::opt(gg.as_ref()),
            per,
        )
        .unwrap();
        let got = down(&gb);
        let mut want = f32s(&x);
        reel::cpu::residual_add(&mut want, &f32s(&y), d, b, g, per);
        check_bf16(
            &format!("residual bias={} gate={}", b.is_some(), g.is_some()),
            &got,
            &want,
        );
    }
    let x = bf16s(&vals(10_001, 6));
    let dv = dev();
    let mut gb = Buf::filled(&dv, x.len(), half::bf16::from_bits(0x7fc1)).unwrap();
    k::gelu_tanh_bf16(&dv, &up(&dv, &x), &mut gb).unwrap();
    let got = down(&gb);
    let mut want = f32s(&x);
    reel::cpu::gelu(&mut want);
    check_bf16("gelu_tanh_bf16", &got, &want);
}

#[test]
fn launcher_argument_structs_match_the_kernel_signatures() {
    let layouts = k::param_layouts();
    assert!(
        layouts.len() >= 20,
        "only {} exported kernels found",
        layouts.len()
    );
    for l in &layouts {
        assert_eq!(
            l.launcher_module,
            Some(l.file),
            "{}: exported by kernels/{}.cu but no launcher declares it there",
            l.name,
            l.file
        );
        assert!(!l.cpp.is_empty(), "{}: no parameters exported", l.name);
        assert_eq!(
            l.rust, l.cpp,
            "{}: the Rust argument struct (left) does not match the C++ parameters (right)",
            l.name
        );
    }
    // The check itself can fail: the C++ side reports kinds as well as sizes, so a float
    // passed where the kernel takes an int is caught.
    let ln = layouts
        .iter()
        .find(|l| l.name == "layernorm_modulate_bf16")
        .unwrap();
    let kinds: String = ln.cpp.iter().map(|p| p.kind as u8 as char).collect();
    assert_eq!(kinds, "ppppiiif");
    assert_eq!(
        ln.cpp.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [0, 8, 16, 24, 32, 36, 40, 44]
    );
}

#[test]
fn nvcc_build_has_sm90a_code_and_no_spills() {
    if env!("REEL_NVCC").is_empty() {
        // Only a build without nvcc gets here; CI sets REEL_REQUIRE_NVCC=1, so it never does.
        eprintln!("no nvcc in this build: static checks skipped");
        return;
    }
    assert_eq!(env!("REEL_NVCC_VERSION"), "13.0");
    assert!(
        !FATBINS.is_empty(),
        "nvcc was found but no fatbin was embedded"
    );
    let sources = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "cu"))
                .count()
        })
        .unwrap_or(0);
    if sources > 0 {
        assert_eq!(FATBINS.len(), sources, "a kernels/*.cu without a fatbin");
    }
    for f in FATBINS {
        let report = f.ptxas_report;
        let spills: Vec<&str> = report
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        assert!(
            spills.is_empty(),
            "{}: ptxas reports spills: {spills:?}",
            f.stem
        );
        if f.stem.ends_with(".sm90") {
            assert_eq!(f.targets, "sm_90a", "{}", f.stem);
            assert!(
                report.contains("sm_90a") && !report.contains("sm_80"),
                "{}: {report}",
                f.stem
            );
        } else {
            assert_eq!(f.targets, "sm_90a sm_80 compute_80", "{}", f.stem);
            assert!(
                report.contains("sm_90a") && report.contains("sm_80"),
                "{}: {report}",
                f.stem
            );
        }
    }
    // cuobjdump of the build machine: on the GPU machine (tools/gpu-check.sh, no toolkit
    // there) it is absent and this part is skipped; CI (REEL_REQUIRE_NVCC=1) requires it.
    let cuobjdump = env!("REEL_CUOBJDUMP");
    if !std::path::Path::new(cuobjdump).is_file() {
        assert!(
            std::env::var("REEL_REQUIRE_NVCC").as_deref() != Ok("1"),
            "REEL_REQUIRE_NVCC=1 but the build's cuobjdump {cuobjdump} is missing"
        );
        eprintln!("{cuobjdump} is not on this machine (built elsewhere): cuobjdump checks skipped");
        return;
    }
    let dir = crate::scratch("fatbins");
    let list = |what: &str, path: &std::path::Path| {
        let o = std::process::Command::new(cuobjdump)
            .arg(what)
            .arg(path)
            .output()
            .unwrap();
        assert!(o.status.success(), "cuobjdump {what} {}", path.display());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for f in FATBINS {
        let path = dir.join(format!("{}.fatbin", f.stem));
        std::fs::write(&path, f.image).unwrap();
        let listing = list("--list-elf", &path);
        assert!(listing.contains("sm_90a"), "{}: {listing}", f.stem);
        let ptx = list("--list-ptx", &path);
        if f.stem.ends_with(".sm90") {
            assert!(
                !listing.contains("sm_80") && !ptx.contains("sm_80"),
                "{}: an sm_90a-only file holds sm_80 code",
                f.stem
            );
        } else {
            assert!(ptx.contains("sm_80"), "{}: no compute_80 PTX", f.stem);
        }
    }
}

/// Static checks of a tensor-core kernel file: in ptxas's report, `entries` functions named
/// `prefix`… with no stack frame and no spills; in the SASS of `sass_kernels` (cuobjdump +
/// nvdisasm of the build's toolchain; skipped where they are absent, as on the GPU machine),
/// HMMA, LDSM and LDGSTS for sm_90a and sm_80.
pub fn tensor_core_code(stem: &str, prefix: &str, entries: usize, sass_kernels: &[&str]) {
    if !ptxas_clean(stem, prefix, entries) {
        return;
    }
    for &name in sass_kernels {
        let Some(sass) = dump_sass(stem, name) else {
            return;
        };
        for arch in ["sm_90a", "sm_80"] {
            let section = sass_section(&sass, name, arch);
            // bf16 kernels: HMMA.16816.F32.BF16; f16 ones: HMMA.16816.F32 without a suffix.
            let bf = section.matches("HMMA.16816.F32.BF16").count();
            let hmma = if name.contains("_f16") {
                section.matches("HMMA.16816.F32").count() - bf
            } else {
                bf
            };
            let ldsm = section.matches("LDSM.16.M").count();
            let async_copies = section.matches("LDGSTS").count();
            assert!(
                hmma >= 16 && ldsm > 0 && async_copies > 0,
                "{name} on {arch}: {hmma} HMMA, {ldsm} LDSM, {async_copies} LDGSTS"
            );
        }
    }
}

/// ptxas's report of kernel file `stem`: `entries` functions named `prefix`…, each with no
/// stack frame and no spills. False (checks skipped) in a build without nvcc.
pub fn ptxas_clean(stem: &str, prefix: &str, entries: usize) -> bool {
    let Some(f) = FATBINS.iter().find(|f| f.stem == stem) else {
        eprintln!("no nvcc in this build: static checks skipped");
        return false;
    };
    let report = f.ptxas_report;
    let mut seen = 0;
    let lines: Vec<&str> = report.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.split("Function properties for ").nth(1) {
            if name.starts_with(prefix) {
                seen += 1;
                assert!(
                    lines[i + 1]
                        .contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                    "{name}: {}",
                    lines[i + 1]
                );
            }
        }
    }
    assert_eq!(seen, entries, "{stem}: functions in the ptxas report");
    true
}

/// The SASS of kernel `name` in file `stem`'s fatbin (cuobjdump runs nvdisasm, both from the
/// build's toolchain); None where they are absent (the GPU machine).
pub fn dump_sass(stem: &str, name: &str) -> Option<String> {
    let f = FATBINS.iter().find(|f| f.stem == stem)?;
    let cuobjdump = std::path::Path::new(env!("REEL_CUOBJDUMP"));
    let tools = cuobjdump.parent().unwrap();
    if !cuobjdump.is_file() || !tools.join("nvdisasm").is_file() {
        assert!(
            std::env::var("REEL_REQUIRE_NVCC").as_deref() != Ok("1"),
            "REEL_REQUIRE_NVCC=1 but {} or nvdisasm beside it is missing",
            cuobjdump.display()
        );
        eprintln!("cuobjdump/nvdisasm of the build are not here: SASS checks skipped");
        return None;
    }
    let path = crate::scratch(&format!("{stem}-sass")).join(format!("{stem}.fatbin"));
    std::fs::write(&path, f.image).unwrap();
    let path_var = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = std::process::Command::new(cuobjdump)
        .args(["--dump-sass", "--function", name])
        .arg(&path)
        .env("PATH", &path_var)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The machine code for `arch` (sm_90a, sm_80) in a [`dump_sass`] listing.
pub fn sass_section<'a>(sass: &'a str, name: &str, arch: &str) -> &'a str {
    // The ELF's section (the PTX of compute_80 has an "arch = sm_80" header too).
    sass.split("arch = ")
        .find(|s| s.starts_with(arch) && s.contains(&format!("code for {arch}")))
        .unwrap_or_else(|| panic!("{name}: no {arch} SASS"))
}

#[test]
fn cuda_device_without_a_driver_is_a_clear_error() {
    if reel::cuda::driver_present() && !FATBINS.is_empty() {
        eprintln!("libcuda is present: the no-driver error cannot be observed here");
        return;
    }
    let e = KernelDevice::cuda(0).unwrap_err().to_string();
    assert!(e.contains("libcuda") || e.contains("without nvcc"), "{e}");
    let e = KernelDevice::parse("bogus").unwrap_err().to_string();
    assert!(e.contains("\"bogus\"") && e.contains("cuda:N"), "{e}");
}

#[test]
fn fill_normal_follows_the_host_philox_mapping() {
    let d = dev();
    let n = 100_003;
    let want = reel::rng::gaussian(42, n);
    let x: Buf<f32> = Buf::filled(&d, n, f32::NAN).unwrap();
    k::fill_normal(&d, &x, 42, 0.0, 1.0).unwrap();
    let got = down(&x);
    // Philox is integer arithmetic (exact); Box-Muller runs in f32 here, in f64 on the host.
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "[{i}] {g} vs {w}");
    }
    let b: Buf<half::bf16> = Buf::filled(&d, 1001, half::bf16::NAN).unwrap();
    k::fill_normal(&d, &b, 7, 1.0, 0.5).unwrap();
    let want = reel::rng::gaussian(7, 1001);
    for (i, (g, &w)) in down(&b).iter().zip(&want).enumerate() {
        let w = 1.0 + 0.5 * w;
        assert!(
            (g.to_f32() - w).abs() <= 1e-2 * w.abs().max(1.0),
            "[{i}] {g} vs {w}"
        );
    }
}
