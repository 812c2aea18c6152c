//! Weight loading: clear errors for every kind of bad file, and no panic on any bytes.

use std::path::Path;

use reel::models::wan_dit::WanDit;
use reel::weights::WeightStore;

use crate::{data, scratch};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match WanDit::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the single-file transformer of a copy of `dit_hd48` through `edit`.
fn edited(name: &str, edit: impl FnOnce(&mut Vec<(String, reel::Tensor)>)) -> std::path::PathBuf {
    let dir = scratch(name);
    copy_dir(&data("dit_hd48"), &dir);
    let wfile = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let store = WeightStore::open_file(&wfile).unwrap();
    let mut tensors: Vec<(String, reel::Tensor)> = store
        .entries()
        .map(|e| {
            let t = reel::Tensor::new(e.shape.clone(), store.f32(e).unwrap().into_owned()).unwrap();
            (e.name.clone(), t)
        })
        .collect();
    drop(store);
    edit(&mut tensors);
    let refs: Vec<(&str, &reel::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    reel::io::write_f32(&wfile, &refs).unwrap();
    dir
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited("w-missing", |t| {
        t.retain(|(n, _)| n != "blocks.0.attn1.norm_k.weight")
    });
    let e = load_err(&dir);
    assert!(
        e.contains("blocks.0.attn1.norm_k.weight") && e.contains("transformer"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited("w-unexpected", |t| {
        t.push(("blocks.0.extra.weight".into(), reel::Tensor::zeros(&[3])))
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unexpected") && e.contains("blocks.0.extra.weight"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = edited("w-shape", |t| {
        for (n, v) in t.iter_mut() {
            if n == "proj_out.bias" {
                *v = reel::Tensor::zeros(&[63]);
            }
        }
    });
    let e = load_err(&dir);
    assert!(
        e.contains("proj_out.bias") && e.contains("[63]") && e.contains("[64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = scratch("w-dtype");
    copy_dir(&data("dit_hd48"), &dir);
    let wfile = dir.join("transformer/diffusion_pytorch_model.safetensors");
    // Rewrite one tensor as I32 with the same shape.
    let store = WeightStore::open_file(&wfile).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for e in store.entries() {
        let (dt, bytes) = if e.name == "proj_out.bias" {
            (safetensors::Dtype::I32, vec![0u8; e.numel() * 4])
        } else {
            (e.dtype, store.bytes(e).to_vec())
        };
        owned.push((e.name.clone(), dt, e.shape.clone(), bytes));
    }
    drop(store);
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &wfile).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("proj_out.bias") && e.contains("I32"), "{e}");
}

#[test]
fn missing_files_and_bad_configs_are_named() {
    let dir = scratch("w-nofile");
    copy_dir(&data("dit_hd48"), &dir);
    std::fs::remove_file(dir.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("no safetensors weights"), "{e}");

    let dir = scratch("w-badconfig");
    copy_dir(&data("dit_hd48"), &dir);
    std::fs::write(
        dir.join("transformer/config.json"),
        "{\"num_layers\": \"two\"",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json"), "{e}");

    let dir = scratch("w-i2v");
    copy_dir(&data("dit_hd48"), &dir);
    let cfg = std::fs::read_to_string(dir.join("transformer/config.json")).unwrap();
    let cfg = cfg.replace("\"image_dim\": null", "\"image_dim\": 1280");
    std::fs::write(dir.join("transformer/config.json"), cfg).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("image-to-video"), "{e}");

    // A shard named by the index is missing.
    let dir = scratch("w-shard");
    copy_dir(&data("dit_odd"), &dir);
    std::fs::remove_file(
        dir.join("transformer/diffusion_pytorch_model-00002-of-00004.safetensors"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("diffusion_pytorch_model-00002-of-00004.safetensors"),
        "{e}"
    );

    let e = load_err(Path::new("/definitely/not/here"));
    assert!(e.contains("/definitely/not/here"), "{e}");
}

#[test]
fn truncated_files_are_errors() {
    let src =
        std::fs::read(data("dit_patch222").join("transformer/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let dir = scratch("w-trunc");
    let path = dir.join("t.safetensors");
    // Every cut in the header, then a spread of cuts through the data.
    let header = 8 + u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let cuts: Vec<usize> = (0..header + 8)
        .chain((header..src.len()).step_by(997))
        .collect();
    for cut in cuts {
        std::fs::write(&path, &src[..cut]).unwrap();
        let e = WeightStore::open_file(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("t.safetensors"), "cut at {cut}: {e:?}");
    }
}

#[test]
fn mutated_files_never_panic() {
    // Random byte flips over a real file (header-heavy, where parsing happens), loaded as a
    // model and run. Every outcome must be Ok or Err, never a panic.
    let dir = scratch("w-fuzz");
    copy_dir(&data("dit_patch222"), &dir);
    let wfile = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let src = std::fs::read(&wfile).unwrap();
    let header = 8 + u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let input =
        reel::io::TensorFile::open(&data("dit_patch222").join("input.safetensors")).unwrap();
    let (x, t, ctx) = (
        input.tensor("hidden_states").unwrap(),
        input.tensor("timestep").unwrap(),
        input.tensor("encoder_hidden_states").unwrap(),
    );
    let mut state = 0x243F6A8885A308D3u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..300 {
        let mut bytes = src.clone();
        for _ in 0..1 + next() % 4 {
            // Mostly in the header (JSON and length), sometimes anywhere.
            let span = if next() % 4 == 0 { bytes.len() } else { header };
            let i = (next() % span as u64) as usize;
            bytes[i] = match next() % 3 {
                0 => next() as u8,
                1 => bytes[i] ^ (1 << (next() % 8)),
                _ => b"0123456789\"{}[],:.-eE"[(next() % 21) as usize],
            };
        }
        std::fs::write(&wfile, &bytes).unwrap();
        match WanDit::load(&dir) {
            Ok(m) => {
                ok += 1;
                let _ = m.forward(&x, &t, &ctx);
            }
            Err(_) => err += 1,
        }
    }
    eprintln!("mutations: {ok} loaded, {err} refused");
    assert!(err > 0);
}

#[test]
fn inspect_reports_pipeline_and_component() {
    let reports = reel::inspect::inspect(&data("dit_odd")).unwrap();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.class_name.as_deref(), Some("WanTransformer3DModel"));
    assert_eq!(r.files.len(), 4, "four shards");
    // The parameter count equals the sum over the weight list the model itself expects.
    let cfg: reel::models::wan_dit::WanDitConfig =
        reel::models::read_json(&data("dit_odd").join("transformer/config.json")).unwrap();
    let expected: u64 = WanDit::weight_specs(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(r.parameters, expected);
    assert_eq!(r.dtypes.get("F32"), Some(&expected));
    let text = reel::inspect::render(&reports);
    assert!(
        text.contains("blocks.{i}.attn1.to_q.weight") && text.contains("×2"),
        "{text}"
    );
    let bf16 = reel::inspect::inspect(&data("dit_batch2").join("transformer")).unwrap();
    assert!(bf16[0].dtypes.contains_key("BF16"));
}
