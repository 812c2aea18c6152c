//! `reel bench`: the JSON report and the counted FLOPs.

use reel::models::wan_dit::{WanDit, WanDitConfig};

use crate::scratch;

#[test]
fn bench_json_has_every_field() {
    let out = scratch("bench").join("bench.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "-q",
            "bench",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--profile",
            "--vae",
            "--text",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("tokens/s"));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for field in [
        "model",
        "device",
        "gpu",
        "size",
        "frames",
        "tokens",
        "steps",
        "step_seconds",
        "tokens_per_second",
        "achieved_tflops",
        "mfu",
        "peak_memory_bytes",
        "ops",
        "commit",
        "passes_per_step",
    ] {
        assert!(j.get(field).is_some(), "missing {field}: {j}");
    }
    assert_eq!(j["device"], "cpu");
    assert!(j["gpu"].is_null() && j["mfu"].is_null());
    assert_eq!(j["passes_per_step"], 2);
    assert_eq!(j["tokens"], 80); // 64x64, 17 frames: 5 x 4 x 4 after the (1, 2, 2) patch
    let s = &j["step_seconds"];
    assert!(s["p10"].as_f64().unwrap() <= s["median"].as_f64().unwrap());
    assert!(s["median"].as_f64().unwrap() <= s["p90"].as_f64().unwrap());
    let tps = j["tokens_per_second"].as_f64().unwrap();
    assert!((tps - 160.0 / s["median"].as_f64().unwrap()).abs() < 1e-6 * tps);
    assert!(j["peak_memory_bytes"].as_u64().unwrap() > 0);
    let ops = j["ops"].as_array().unwrap();
    let names: Vec<&str> = ops.iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["gemm", "attention", "norm/rope/elementwise", "vae_conv"]
    );
    assert!(
        ops.iter().all(|o| o["calls"].as_u64().unwrap() > 0),
        "{ops:?}"
    );
    assert!(j["commit"].as_str().unwrap().len() >= 7);
    // --device cuda without a GPU driver: a clear error, no panic.
    if !reel::cuda::driver_present() {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(["bench", "--device", "cuda"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("libcuda"), "{err}");
    }
}

#[test]
fn bench_flops_equal_a_hand_count() {
    // D = 2·8 = 16, F = 24, 1 layer, text_dim 12, freq 8, in/out 4, patch (1, 2, 2);
    // batch 2, grid 1x2x3 (L = 6), 5 text tokens.
    let c = WanDitConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        in_channels: 4,
        out_channels: Some(4),
        text_dim: 12,
        freq_dim: 8,
        ffn_dim: 24,
        num_layers: 1,
        ..Default::default()
    };
    let (b, l, lt, d, f) = (2u64, 6u64, 5u64, 16u64, 24u64);
    let patch = 2 * b * l * d * 16; // K = 4 channels x 1 x 2 x 2
    let time = 2 * b * (8 * d + d * d + d * 6 * d);
    let text = 2 * b * lt * (12 * d + d * d);
    let self_proj = 4 * 2 * b * l * d * d;
    let self_attn = 2 * 4 * b * l * l * 8; // heads x 4·L·L·head_dim
    let cross_proj = 2 * 2 * b * l * d * d + 2 * 2 * b * lt * d * d;
    let cross_attn = 2 * 4 * b * l * lt * 8;
    let ffn = 2 * 2 * b * l * d * f;
    let head = 2 * b * l * d * 16; // out 4 x patch volume 4
    let want = patch + time + text + self_proj + self_attn + cross_proj + cross_attn + ffn + head;
    assert_eq!(WanDit::flops_of(&c, 2, [1, 2, 3], 5), want);
}

#[test]
fn bench_on_emu_times_the_device_dit_step() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "-q",
            "bench",
            "--device",
            "emu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--profile",
            "--json",
            "-",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["device"].as_str().unwrap().starts_with("emu"), "{j}");
    assert_eq!(j["passes_per_step"], 2);
    assert_eq!(j["tokens"], 80);
    // The device memory is the plan's: weights + arena + persistent buffers.
    assert!(j["peak_memory_bytes"].as_u64().unwrap() > 1 << 20, "{j}");
    let ops: Vec<&str> = j["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(
        ops.contains(&"gemm") && ops.contains(&"attention"),
        "{ops:?}"
    );
    // --text and --vae time umT5 and the VAE decode on the device too (random weights made
    // there), each with its TFLOP/s; a tiny size keeps the emulated decode short.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "-q", "bench", "--device", "emu", "--steps", "1", "--warmup", "0", "--text", "--vae",
            "--size", "16x16", "--frames", "1", "--json", "-",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in [
        "text_seconds",
        "vae_decode_seconds",
        "text_tflops",
        "vae_decode_tflops",
    ] {
        assert!(j[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {j}");
    }
}

/// --generation: one generation timed end to end on the device (text, guided steps,
/// decode), its parts inside its total, the device memory it held above the DiT's weights;
/// without a device, a clear error.
#[test]
fn bench_generation_times_a_whole_generation_on_the_device() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "-q",
            "bench",
            "--device",
            "emu",
            "--generation",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--size",
            "32x32",
            "--frames",
            "5",
            "--json",
            "-",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k}: {j}"));
    assert_eq!(j["generation_steps"], 3, "{j}");
    let (total, text, decode) = (
        f("generation_seconds"),
        f("text_seconds"),
        f("vae_decode_seconds"),
    );
    // Two steps after the first in the percentiles; three steps in the total.
    let p10 = j["step_seconds"]["p10"].as_f64().unwrap();
    assert!(text > 0.0 && decode > 0.0 && p10 > 0.0, "{j}");
    assert!(total >= text + decode + 2.0 * p10, "{j}");
    assert!(j.get("generation_estimate_seconds").is_none(), "{j}");
    // Weights of the three models and the sessions: more than the DiT's step alone holds.
    assert!(j["peak_memory_bytes"].as_u64().unwrap() > 4 << 20, "{j}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["-q", "bench", "--generation"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--device"), "{err}");
}

#[test]
fn bench_of_a_preset_makes_only_what_it_measures() {
    // The 1.3B preset's DiT (and VAE) without the text encoder: what `reel bench` makes
    // unless --text is given. Checked on the estimate; the 1.3B does not run in CI.
    let (dit_only, need) = reel::generate::random_preset_bytes("wan2.1-t2v-1.3b", false);
    let (all, need_all) = reel::generate::random_preset_bytes("wan2.1-t2v-1.3b", true);
    assert!(need < 20_000_000_000, "{need} bytes: fits a 24 GB machine");
    assert!(
        need_all > 50_000_000_000,
        "{need_all}: umT5-XXL alone is ~22.7 GB of f32"
    );
    assert!(all - dit_only > 20_000_000_000);
    // A machine too small for even the 14B DiT gets the numbers, naming what is made (on a
    // machine large enough this would make 114 GB of weights: skipped there).
    let (_, need14) = reel::generate::random_preset_bytes("wan2.1-t2v-14b", false);
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let l = m
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024);
    if avail.is_none_or(|a| a >= need14) {
        eprintln!("this machine could make the 14B's weights: the refusal is not checked here");
        return;
    }
    let e = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "bench",
            "--model",
            "wan2.1-t2v-14b",
            "--random-weights",
            "--size",
            "128x128",
            "--frames",
            "9",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("the DiT, the VAE,") && !err.contains("umT5"),
        "{err}"
    );
}

/// `reel bench --stream` on emu with the embedded block-causal demo: every frame of a
/// second of video reaches the sink, chunk by chunk, and the device memory reel held is
/// exactly the weights plus the two sessions' plans.
#[test]
fn bench_stream_on_emu_counts_frames_and_memory() {
    let r = reel::stream_bench::bench_stream(&reel::stream_bench::StreamBenchArgs {
        model: None,
        random_weights: false,
        size: Some("16x16".into()),
        seconds: vec![1],
        causal: None,
        device: reel::kernels::KernelDevice::Emu,
    })
    .unwrap();
    let run = &r.runs[0];
    assert_eq!((run.frames, run.chunks), (17, 2));
    assert!(run.first_frame_seconds > 0.0 && run.first_frame_seconds < run.wall_seconds);
    assert_eq!(
        run.device_peak_bytes,
        r.weights_bytes + r.dit_plan_bytes + r.vae_plan_bytes
    );
    assert!(reel::stream_bench::render(&r).contains("FPS"));
}
