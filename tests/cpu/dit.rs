//! Wan DiT parity against diffusers (float64 references), through the code path of
//! `reel component dit`.

use reel::io::TensorFile;
use reel::tensor::rel_l2;

use crate::{data, scratch};

const TOL: f64 = 1e-4;

fn check_case(case: &str, model_arg: &str) {
    let dir = data(case);
    let out_path = scratch(&format!("dit-{case}")).join("out.safetensors");
    // The same function the CLI calls for `reel component dit`.
    reel::cli::component_dit(
        &dir.join(model_arg),
        &dir.join("input.safetensors"),
        &out_path,
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));
    let got = TensorFile::open(&out_path)
        .unwrap()
        .tensor("sample")
        .unwrap();
    let (shape, want) = TensorFile::open(&dir.join("output.safetensors"))
        .unwrap()
        .tensor_f64("sample")
        .unwrap();
    assert_eq!(got.shape(), &shape[..], "{case}: output shape");
    assert!(
        got.data().iter().all(|v| v.is_finite()),
        "{case}: non-finite output"
    );
    let err = rel_l2(got.data(), &want);
    eprintln!("{case}: rel L2 = {err:.3e}");
    assert!(err <= TOL, "{case}: relative L2 {err:.3e} > {TOL:e}");
}

#[test]
fn dit_odd_sharded_from_pipeline_root() {
    check_case("dit_odd", "");
}

#[test]
fn dit_batch2_bf16_weights() {
    check_case("dit_batch2", "transformer");
}

#[test]
fn dit_head_dim_48_no_cross_norm() {
    check_case("dit_hd48", "transformer");
}

#[test]
fn dit_head_dim_128() {
    check_case("dit_hd128", "");
}

#[test]
fn dit_temporal_patch() {
    check_case("dit_patch222", "transformer");
}

#[test]
fn dit_bad_inputs_are_errors_naming_the_tensor() {
    use reel::models::wan_dit::WanDit;
    use reel::Tensor;
    let dit = WanDit::load(&data("dit_odd")).unwrap();
    let f = TensorFile::open(&data("dit_odd").join("input.safetensors")).unwrap();
    let (x, t, ctx) = (
        f.tensor("hidden_states").unwrap(),
        f.tensor("timestep").unwrap(),
        f.tensor("encoder_hidden_states").unwrap(),
    );
    let msg = |r: reel::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let odd_w = Tensor::zeros(&[1, 4, 3, 6, 9]);
    assert!(msg(dit.forward(&odd_w, &t, &ctx)).contains("width"));
    let wrong_c = Tensor::zeros(&[1, 5, 3, 6, 10]);
    assert!(msg(dit.forward(&wrong_c, &t, &ctx)).contains("channels"));
    let wrong_t = Tensor::zeros(&[2]);
    assert!(msg(dit.forward(&x, &wrong_t, &ctx)).contains("timestep"));
    let wrong_ctx = Tensor::zeros(&[1, 7, 23]);
    assert!(msg(dit.forward(&x, &t, &wrong_ctx)).contains("encoder_hidden_states"));
    // Missing input tensor: the error names it.
    let path = scratch("dit-missing").join("in.safetensors");
    reel::io::write_f32(&path, &[("hidden_states", &x), ("timestep", &t)]).unwrap();
    let err = reel::cli::component_dit(&data("dit_odd"), &path, &path.with_extension("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
}

#[test]
fn dit_cli_binary_runs_component() {
    let dir = data("dit_hd48");
    let out = scratch("dit-cli").join("out.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["component", "dit", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(dir.join("input.safetensors"))
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = TensorFile::open(&out).unwrap().tensor("sample").unwrap();
    let (_, want) = TensorFile::open(&dir.join("output.safetensors"))
        .unwrap()
        .tensor_f64("sample")
        .unwrap();
    assert!(rel_l2(got.data(), &want) <= TOL);
    // A bad flag value is refused with an error that names the flag.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "component",
            "dit",
            "--model",
            "/nonexistent",
            "--input",
            "x",
            "--output",
            "y",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent"));
}

/// `--text-once` (the text's K/V made before the timed runs) gives the forward's output bit
/// for bit, and `--profile` reports the last run's ops: the GEMMs and attentions by shape.
#[test]
fn dit_cli_component_text_once_and_profile() {
    let dir = data("dit_hd48");
    let tmp = scratch("dit-cli-profile");
    let run = |out: &std::path::Path, extra: &[&str]| -> serde_json::Value {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(["component", "dit", "--model"])
            .arg(&dir)
            .arg("--input")
            .arg(dir.join("input.safetensors"))
            .arg("--output")
            .arg(out)
            .args(["--repeat", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8(o.stdout).unwrap();
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let plain = run(&tmp.join("plain.safetensors"), &[]);
    assert!(plain.get("profile").is_none());
    let line = run(&tmp.join("once.safetensors"), &["--text-once", "--profile"]);
    assert_eq!(line["forward_seconds"].as_array().unwrap().len(), 2);
    let sample = |f: &str| {
        TensorFile::open(&tmp.join(f))
            .unwrap()
            .tensor("sample")
            .unwrap()
            .data()
            .to_vec()
    };
    assert_eq!(sample("plain.safetensors"), sample("once.safetensors"));
    let ops: Vec<&str> = line["profile"]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    assert!(
        ops.contains(&"gemm") && ops.contains(&"attention"),
        "{ops:?}"
    );
    let labels: Vec<&str> = line["profile"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["label"].as_str().unwrap())
        .collect();
    assert!(labels.iter().any(|l| l.starts_with("gemm m")), "{labels:?}");
    assert!(
        labels.iter().any(|l| l.starts_with("attention b")),
        "{labels:?}"
    );
    // The text K/V were made before the profiled run: no GEMM of the text's rows in it.
    let text = TensorFile::open(&dir.join("input.safetensors"))
        .unwrap()
        .tensor("encoder_hidden_states")
        .unwrap();
    let text_rows = text.shape()[0] * text.shape()[1];
    let of_text = |l: &&str| l.starts_with(&format!("gemm m{text_rows} "));
    assert!(
        !labels.iter().any(of_text),
        "text GEMMs in a --text-once run: {labels:?}"
    );
    // ... and without --text-once they are there (the check above can fail).
    let each = run(&tmp.join("each.safetensors"), &["--profile"]);
    assert!(
        each["profile"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| of_text(&l["label"].as_str().unwrap())),
        "{each}"
    );
}

/// Every golden DiT case through the device forward on REEL_TEST_DEVICE (emu by default):
/// bf16 storage, reel's GEMM and flash attention, within the kernel-device tolerance of
/// diffusers' float64 output. The session allocates exactly what its plan says.
#[test]
fn dit_device_forward_matches_diffusers_on_every_case() {
    use reel::models::wan_dit::gpu::{DitSession, DitShape};
    use reel::models::wan_dit::WanDit;
    let dev = reel::kernels::KernelDevice::from_test_env().unwrap();
    for (case, model) in [
        ("dit_odd", ""),
        ("dit_batch2", "transformer"),
        ("dit_hd48", "transformer"),
        ("dit_hd128", ""),
        ("dit_patch222", "transformer"),
    ] {
        let dir = data(case);
        let dit = WanDit::load(&dir.join(model)).unwrap();
        let w = dit.upload(&dev).unwrap();
        let f = TensorFile::open(&dir.join("input.safetensors")).unwrap();
        let (x, t, ctx) = (
            f.tensor("hidden_states").unwrap(),
            f.tensor("timestep").unwrap(),
            f.tensor("encoder_hidden_states").unwrap(),
        );
        let got = dit
            .forward_on(&dev, &w, &x, &t, &ctx)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let (shape, want) = TensorFile::open(&dir.join("output.safetensors"))
            .unwrap()
            .tensor_f64("sample")
            .unwrap();
        assert_eq!(got.shape(), &shape[..]);
        let err = rel_l2(got.data(), &want);
        eprintln!("{case} on {}: rel L2 {err:.3e}", dev.describe());
        assert!(err <= 2e-2, "{case}: rel L2 {err:.3e} > 2e-2");
        // The allocation is the plan's.
        let s = x.shape();
        let session = DitSession::new(
            &dev,
            &dit.config,
            DitShape {
                batch: s[0],
                frames: s[2],
                height: s[3],
                width: s[4],
                text_len: ctx.shape()[1],
            },
        )
        .unwrap();
        let p = session.plan();
        assert_eq!(
            session.allocated_bytes(),
            p.arena_bytes + p.persistent_bytes,
            "{case}"
        );
        assert!(p.arena_bytes > 0 && p.persistent_bytes > 0);
    }
}

#[test]
fn dit_cli_runs_component_on_emu() {
    let dir = data("dit_batch2");
    let out = scratch("dit-cli-emu").join("out.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args(["component", "dit", "--device", "emu", "--model"])
        .arg(dir.join("transformer"))
        .arg("--input")
        .arg(dir.join("input.safetensors"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = TensorFile::open(&out).unwrap().tensor("sample").unwrap();
    let (_, want) = TensorFile::open(&dir.join("output.safetensors"))
        .unwrap()
        .tensor_f64("sample")
        .unwrap();
    let err = rel_l2(got.data(), &want);
    assert!(err <= 2e-2, "rel L2 {err:.3e}");
}

/// Block-causal streaming against the PyTorch reference of tools/golden.py: the stored noise
/// in, every chunk's x0 within 1e-4 of the reference's, the whole video and each chunk alone
/// (a mix-up confined to the later, evicting chunks must show).
/// `device` None: the CPU reference within 1e-4; Some: the device session (bf16) within
/// 2e-2, allocating what its plan says.
fn check_stream(case: &str, device: Option<&reel::kernels::KernelDevice>) {
    use reel::models::wan_dit::gpu::{CausalSession, DeviceChunks, DitShape};
    use reel::models::wan_dit::{
        stream_with, CausalConfig, CpuChunks, KvCache, StreamShape, WanDit,
    };
    let tol = if device.is_some() { 2e-2 } else { TOL };
    let dir = data(case);
    let dit = WanDit::load(&dir).unwrap();
    let cfg = CausalConfig::load(dit.dir())
        .unwrap()
        .expect("causal_config.json");
    let input = TensorFile::open(&dir.join("input.safetensors")).unwrap();
    let text = input.tensor("encoder_hidden_states").unwrap();
    let noise = input.tensor("noise").unwrap(); // [chunks, steps, 1, C, c, H, W]
    let ns = noise.shape().to_vec();
    let (want_shape, want) = TensorFile::open(&dir.join("output.safetensors"))
        .unwrap()
        .tensor_f64("latents")
        .unwrap();
    let [_, ch, frames, h, w] = want_shape[..] else {
        panic!("latents shape {want_shape:?}")
    };
    let per: usize = ns[2..].iter().product();
    let kv = dit.text_kv(&text).unwrap();
    let uncond = input.contains("negative_encoder_hidden_states").then(|| {
        dit.text_kv(&input.tensor("negative_encoder_hidden_states").unwrap())
            .unwrap()
    });
    assert_eq!(uncond.is_some(), cfg.guided());
    let mut got = vec![0.0f32; ch * frames * h * w];
    let mut chunks = 0;
    let [_, ph, pw] = dit.config.patch_size;
    let mut cpu = CpuChunks {
        dit: &dit,
        text: &kv,
        uncond: uncond.as_ref(),
        cache: KvCache::new(&dit, 1, [h / ph, w / pw]),
        window: cfg.window(),
    };
    let weights = device.map(|dev| dit.upload(dev).unwrap());
    let mut session = device.map(|dev| {
        let prompts = 1 + uncond.is_some() as usize;
        let mut s = CausalSession::new(
            dev,
            &dit.config,
            cfg.window(),
            DitShape {
                batch: 1,
                frames: cfg.chunk_frames,
                height: h,
                width: w,
                text_len: text.shape()[1],
            },
            prompts,
        )
        .unwrap();
        let p = s.plan();
        assert_eq!(s.allocated_bytes(), p.arena_bytes + p.persistent_bytes);
        let mut texts = text.data().to_vec();
        if uncond.is_some() {
            let n = input.tensor("negative_encoder_hidden_states").unwrap();
            texts.extend_from_slice(n.data());
        }
        s.set_text(weights.as_ref().unwrap(), &texts).unwrap();
        s
    });
    let mut on_device;
    let model: &mut dyn reel::models::wan_dit::ChunkModel = match (&mut session, &weights) {
        (Some(session), Some(weights)) => {
            on_device = DeviceChunks { session, weights };
            &mut on_device
        }
        _ => &mut cpu,
    };
    stream_with(
        model,
        &cfg,
        StreamShape {
            channels: ch,
            frames,
            height: h,
            width: w,
        },
        &mut |k, step, n| {
            assert_eq!(n, per);
            let at = (k * ns[1] + step) * per;
            noise.data()[at..at + n].to_vec()
        },
        &mut |f0, x0| {
            let c = x0.shape()[2];
            for ci in 0..ch {
                for f in 0..c {
                    let src = &x0.data()[(ci * c + f) * h * w..][..h * w];
                    got[(ci * frames + f0 + f) * h * w..][..h * w].copy_from_slice(src);
                }
            }
            chunks += 1;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(chunks, ns[0]);
    let err = rel_l2(&got, &want);
    let on = device.map_or("cpu".into(), |d| d.describe());
    eprintln!("{case} on {on}: rel L2 = {err:.3e}");
    let (plane, c) = (h * w, cfg.chunk_frames);
    for k in 0..chunks {
        let pick = |v: &[f32]| -> Vec<f32> {
            (0..ch)
                .flat_map(|ci| v[(ci * frames + c * k) * plane..][..c * plane].to_vec())
                .collect()
        };
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let want_k: Vec<f64> = pick(&want32).iter().map(|&v| v as f64).collect();
        let e = rel_l2(&pick(&got), &want_k);
        eprintln!("  chunk {k}: {e:.3e}");
        assert!(
            e <= tol,
            "{case} chunk {k} on {on}: relative L2 {e:.3e} > {tol:e}"
        );
    }
    assert!(
        err <= tol,
        "{case} on {on}: relative L2 {err:.3e} > {tol:e}"
    );
}

/// Self-Forcing's re-noising sampler: five chunks of two latent frames, three steps each, a
/// sink of one frame and a window that evicts from the third chunk on, a context timestep
/// of 50.
#[test]
fn causal_stream_matches_the_pytorch_reference() {
    check_stream("causal_stream", None);
}

/// Euler steps per chunk at guidance 3 (a negative prompt over the same cache), no sink,
/// chunks of three frames with six attended.
#[test]
fn causal_euler_stream_matches_the_pytorch_reference() {
    check_stream("causal_euler", None);
}

/// A guidance scale per step (`guidance_steps`: 1, 4, 4, 2): the first step without the
/// negative prompt's pass, the others each at its own scale; Euler steps, a sink of one
/// frame, four chunks of two frames with five attended.
#[test]
fn causal_guided_steps_stream_matches_the_pytorch_reference() {
    check_stream("causal_guided_steps", None);
}

/// `previous_frame_sigma`: a chunk after the first starts from the last latent frame of the
/// chunk before, mixed with its start noise at the σ of the first step at or below the value,
/// and runs only the steps from there. A model whose flow is zero leaves each chunk where it
/// starts, so every chunk after the first must be (1 − σ)·(the last frame before) + σ·noise,
/// with its DiT called at that step's timestep and the ones after only.
#[test]
fn causal_stream_starts_a_chunk_from_the_frame_before_it() {
    use reel::models::wan_dit::{stream_with, CausalConfig, ChunkModel, StreamShape};
    use reel::tensor::Tensor;
    struct Still {
        calls: Vec<(usize, f32)>,
    }
    impl ChunkModel for Still {
        fn flow(&mut self, x: &Tensor, t: f32, f0: usize, _neg: bool) -> reel::Result<Tensor> {
            self.calls.push((f0, t));
            Tensor::new(x.shape().to_vec(), vec![0.0; x.data().len()])
        }
        fn cache(&mut self, _x: &Tensor, _t: f32, _f0: usize) -> reel::Result<()> {
            Ok(())
        }
    }
    let cfg: CausalConfig = serde_json::from_str(
        r#"{"chunk_frames": 2, "local_attn_frames": 4, "denoising_steps": [1000, 750, 500, 250],
            "timestep_shift": 1.0, "sampler": "euler", "previous_frame_sigma": 0.6}"#,
    )
    .unwrap();
    cfg.validate(std::path::Path::new("causal_config.json"))
        .unwrap();
    assert_eq!((cfg.first_step(0), cfg.first_step(2)), (0, 2));
    assert_eq!(cfg.steps_label(), "4 (2 after the first chunk)");
    let (ch, c, h, w) = (2, 2, 3, 4);
    let shape = StreamShape {
        channels: ch,
        frames: 6,
        height: h,
        width: w,
    };
    let n = ch * c * h * w;
    // Each chunk's start noise: distinct values per chunk and position.
    let start = |k: usize, i: usize| ((k * 31 + i * 7) % 17) as f32 / 8.0 - 1.0;
    let mut model = Still { calls: Vec::new() };
    let mut chunks: Vec<Vec<f32>> = Vec::new();
    stream_with(
        &mut model,
        &cfg,
        shape,
        &mut |k, step, len| {
            assert_eq!((step, len), (0, n), "Euler steps draw only the start");
            (0..len).map(|i| start(k, i)).collect()
        },
        &mut |f0, x0| {
            assert_eq!(f0, chunks.len() * c);
            chunks.push(x0.data().to_vec());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(chunks.len(), 3);
    let plane = h * w;
    assert_eq!(chunks[0], (0..n).map(|i| start(0, i)).collect::<Vec<_>>());
    for k in 1..3 {
        for i in 0..n {
            let (cc, p) = (i / (c * plane), i % plane);
            let before = chunks[k - 1][(cc * c + c - 1) * plane + p];
            let want = 0.5 * before + 0.5 * start(k, i);
            assert!(
                (chunks[k][i] - want).abs() < 1e-6,
                "chunk {k}, element {i}: {} against {want}",
                chunks[k][i]
            );
        }
    }
    // The first chunk at all four steps; the others at σ 0.5 and 0.25 only.
    let want: Vec<(usize, f32)> = [(0, 1000.0), (0, 750.0), (0, 500.0), (0, 250.0)]
        .into_iter()
        .chain([2, 4].into_iter().flat_map(|f| [(f, 500.0), (f, 250.0)]))
        .collect();
    assert_eq!(model.calls, want);
}

/// The block-causal golden cases through the device session (REEL_TEST_DEVICE: emu by
/// default): bf16 K/V cache in frame slots, the chunk's K/V projected into it, eviction by
/// device copies; within the kernel-device tolerance of the PyTorch reference, chunk by
/// chunk.
#[test]
fn dit_device_causal_stream_matches_the_pytorch_reference() {
    let dev = reel::kernels::KernelDevice::from_test_env().unwrap();
    check_stream("causal_stream", Some(&dev));
    check_stream("causal_euler", Some(&dev));
    check_stream("causal_guided_steps", Some(&dev));
}
