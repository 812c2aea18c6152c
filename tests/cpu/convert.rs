//! `reel convert`: a tiny DiT saved by tools/golden.py in Wan's original layout as LongLive
//! saves a training state (.pt → tools/pt_to_safetensors.py → safetensors), with a rank-4
//! LoRA in peft's layout; the converted folder against diffusers' model with the merged
//! weights.

use std::path::Path;
use std::process::Command;

use reel::io::TensorFile;
use reel::tensor::rel_l2;
use reel::weights::WeightStore;

use crate::{data, scratch};

fn convert(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .arg("convert")
        .args(args)
        .output()
        .unwrap()
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_merges_a_lora_and_matches_diffusers() {
    let dir = data("convert_wan");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("convert.json")).unwrap()).unwrap();
    let scale = meta["lora_scale"].as_f64().unwrap().to_string();
    let work = scratch("convert-lora");
    let out = work.join("transformer");
    let o = convert(&[
        arg(&dir.join("base.safetensors")),
        "-o",
        arg(&out),
        "--lora",
        arg(&dir.join("lora.safetensors")),
        "--lora-scale",
        &scale,
        "--heads",
        &meta["num_attention_heads"].to_string(),
        "--dtype",
        "f32",
        "--causal",
        "longlive",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("20 merged with the LoRA"), "{said}");
    // The tiny model is not the 1.3B the preset describes: the preset's values are written,
    // with a warning that says so.
    let warned = String::from_utf8_lossy(&o.stderr);
    assert!(
        warned.contains("--causal longlive: the preset holds the values of the published fine-tunes of Wan2.1-T2V-1.3B")
            && warned.contains("4 latent channels, width 32 and 2 blocks"),
        "{warned}"
    );
    // The converted model's forward against diffusers' on the merged weights.
    let got_path = work.join("out.safetensors");
    reel::cli::component_dit(&out, &dir.join("input.safetensors"), &got_path).unwrap();
    let got = TensorFile::open(&got_path)
        .unwrap()
        .tensor("sample")
        .unwrap();
    let (shape, want) = TensorFile::open(&dir.join("output.safetensors"))
        .unwrap()
        .tensor_f64("sample")
        .unwrap();
    assert_eq!(got.shape(), &shape[..]);
    let err = rel_l2(got.data(), &want);
    eprintln!("convert_wan: rel L2 = {err:.3e}");
    assert!(err <= 1e-4, "relative L2 {err:.3e}");
    // The LongLive preset beside it.
    let causal = reel::models::wan_dit::CausalConfig::load(&out)
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            causal.chunk_frames,
            causal.sink_frames,
            causal.local_attn_frames
        ),
        (3, 3, 12)
    );

    // Without the LoRA the merge is what moves the output: the same forward differs.
    let plain_dir = scratch("convert-plain");
    let plain = plain_dir.join("transformer");
    let o = convert(&[
        arg(&dir.join("base.safetensors")),
        "-o",
        arg(&plain),
        "--heads",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plain_out = plain_dir.join("out.safetensors");
    reel::cli::component_dit(&plain, &dir.join("input.safetensors"), &plain_out).unwrap();
    let p = TensorFile::open(&plain_out)
        .unwrap()
        .tensor("sample")
        .unwrap();
    assert!(rel_l2(p.data(), &want) > 1e-2, "the LoRA changed nothing");
    // Kept dtypes are copied bit for bit.
    let src = WeightStore::open_file(&dir.join("base.safetensors")).unwrap();
    let dst = WeightStore::open_component(&plain).unwrap();
    let (a, b) = (
        src.get("model.blocks.1.norm3.weight").unwrap(),
        dst.get("blocks.1.norm2.weight").unwrap(),
    );
    assert_eq!(b.dtype, a.dtype);
    assert_eq!(src.bytes(a), dst.bytes(b));
    assert_eq!(dst.len(), src.len());
}

#[test]
fn convert_names_what_it_cannot_take() {
    let dir = data("convert_wan");
    let base = dir.join("base.safetensors");
    let out = scratch("convert-bad").join("t");
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // A diffusers checkpoint is not in Wan's layout.
    let dit = data("dit_hd128").join("transformer");
    let e = err(convert(&[arg(&dit), "-o", arg(&out)]));
    assert!(e.contains("already in diffusers' layout"), "{e}");
    // A LoRA given as the base: its tensors are not weights of the model.
    let e = err(convert(&[
        arg(&dir.join("lora.safetensors")),
        "-o",
        arg(&out),
    ]));
    assert!(e.contains("is a LoRA tensor"), "{e}");
    // A base given as the LoRA.
    let e = err(convert(&[
        arg(&base),
        "-o",
        arg(&out),
        "--heads",
        "2",
        "--lora",
        arg(&base),
    ]));
    assert!(e.contains("neither a lora_A nor a lora_B"), "{e}");
    // Heads that do not divide the width.
    let e = err(convert(&[arg(&base), "-o", arg(&out), "--heads", "5"]));
    assert!(e.contains("heads"), "{e}");
    let e = err(convert(&[
        arg(&base),
        "-o",
        arg(&out),
        "--heads",
        "2",
        "--dtype",
        "f8",
    ]));
    assert!(e.contains("--dtype f8"), "{e}");
    // LongLive 2.0's NVFP4 export: packed 4-bit weights, named as such.
    let nvfp4 = scratch("convert-nvfp4").join("nvfp4.safetensors");
    let packed = [0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![2, 4], &packed).unwrap();
    safetensors::serialize_to_file(
        [("model.blocks.0.self_attn.q.quantized_weight_values", view)],
        None,
        &nvfp4,
    )
    .unwrap();
    let e = err(convert(&[arg(&nvfp4), "-o", arg(&out)]));
    assert!(e.contains("a materialized NVFP4 checkpoint"), "{e}");
    let e = err(convert(&[
        arg(&dir.join("missing.safetensors")),
        "-o",
        arg(&out),
    ]));
    assert!(e.contains("missing.safetensors"), "{e}");
    assert!(!out.join("config.json").exists());
}
