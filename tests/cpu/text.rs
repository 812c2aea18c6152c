//! umT5 text encoder and tokenizer against transformers (float64 references and ids).

use reel::io::TensorFile;
use reel::models::umt5::{relative_position_bucket, Umt5Config, Umt5Encoder};
use reel::tensor::rel_l2;
use reel::text::{prompt_clean, PromptTokenizer, TextEncoder};

use crate::{data, scratch};

const TOL: f64 = 1e-4;

fn check_encoder(case: &str) {
    let dir = data(case);
    let out_path = scratch(&format!("te-{case}")).join("out.safetensors");
    reel::cli::component_text_encoder(&dir, &dir.join("input.safetensors"), &out_path)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let got = TensorFile::open(&out_path)
        .unwrap()
        .tensor("last_hidden_state")
        .unwrap();
    let refs = TensorFile::open(&dir.join("output.safetensors")).unwrap();
    let (shape, want) = refs.tensor_f64("last_hidden_state").unwrap();
    assert_eq!(got.shape(), &shape[..]);
    let err = rel_l2(got.data(), &want);
    eprintln!("{case}: rel L2 = {err:.3e}");
    assert!(err <= TOL, "{case}: relative L2 {err:.3e}");

    // The bucket function against transformers' over relative positions -600..=600.
    let cfg: Umt5Config = reel::models::read_json(&dir.join("text_encoder/config.json")).unwrap();
    let (_, rel) = refs.tensor_i64("relative_position").unwrap();
    let (_, bucket) = refs.tensor_i64("bucket").unwrap();
    for (&r, &b) in rel.iter().zip(&bucket) {
        let ours = relative_position_bucket(
            r,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        );
        assert_eq!(ours as i64, b, "{case}: bucket of {r}");
    }
}

#[test]
fn umt5_a_parity_with_tokenizer_ids() {
    check_encoder("umt5_a");
}

#[test]
fn umt5_b_parity_longer_than_max_distance() {
    check_encoder("umt5_b");
}

#[test]
fn tokenizer_ids_match_transformers() {
    let tok = PromptTokenizer::load(&data("tokenizer")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("tokenizer").join("cases.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tok.vocab_size() as u64,
        cases["vocab_size"].as_u64().unwrap()
    );
    let max_len = cases["max_length"].as_u64().unwrap() as usize;
    for case in cases["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let clean = case["clean"].as_str().unwrap();
        assert_eq!(prompt_clean(prompt), clean, "prompt_clean({prompt:?})");
        let want: Vec<i64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let got = tok.encode(&[prompt], max_len).unwrap();
        let n = got.seq_len(0);
        assert_eq!(&got.ids[..n], &want[..], "ids of {prompt:?}");
        assert!(got.ids[n..].iter().all(|&i| i == 0) && got.mask[n..].iter().all(|&m| m == 0));
        assert_eq!(
            got.truncated[0],
            want.len() == max_len && prompt.len() > 1000,
            "truncation flag of {prompt:?}"
        );
    }
}

#[test]
fn prompt_embeds_match_wan_pipeline() {
    let dir = data("umt5_a");
    let te = TextEncoder::load(&dir).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let max_len = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let refs = TensorFile::open(&dir.join("prompt_embeds.safetensors")).unwrap();
    let got = te.encode_prompts(&prompts, max_len).unwrap();
    let (_, want) = refs.tensor_f64("prompt_embeds").unwrap();
    let err = rel_l2(got.data(), &want);
    assert!(err <= TOL, "prompt embeds: {err:.3e}");
    // The default negative prompt is "" encoded like any prompt: not a zero tensor.
    let neg = te.encode_prompts(&["", ""], max_len).unwrap();
    let (_, want) = refs.tensor_f64("negative_prompt_embeds").unwrap();
    assert!(want.iter().any(|&v| v != 0.0));
    let err = rel_l2(neg.data(), &want);
    assert!(err <= TOL, "negative prompt embeds: {err:.3e}");
}

#[test]
fn text_encoder_errors() {
    // Missing tokenizer.json: component text-encoder still works, prompt encoding says why.
    let dir = data("umt5_b");
    let te = TextEncoder::load(&dir).unwrap();
    let e = te.encode_prompts(&["a cat"], 16).unwrap_err().to_string();
    assert!(e.contains("tokenizer"), "{e}");
    let e = PromptTokenizer::load(&dir).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");

    // A tokenizer larger than the embedding is refused at load.
    let bad = scratch("te-small-vocab");
    let src = data("umt5_a");
    std::fs::create_dir_all(bad.join("text_encoder")).unwrap();
    std::fs::create_dir_all(bad.join("tokenizer")).unwrap();
    std::fs::copy(
        src.join("tokenizer/tokenizer.json"),
        bad.join("tokenizer/tokenizer.json"),
    )
    .unwrap();
    let store = reel::weights::WeightStore::open_component(&src.join("text_encoder")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    cfg["vocab_size"] = 100.into();
    std::fs::write(bad.join("text_encoder/config.json"), cfg.to_string()).unwrap();
    let tensors: Vec<(String, reel::Tensor)> = store
        .entries()
        .map(|e| {
            let mut shape = e.shape.clone();
            let mut data = store.f32(e).unwrap().into_owned();
            if e.name.ends_with("shared.weight") || e.name.ends_with("embed_tokens.weight") {
                shape[0] = 100;
                data.truncate(100 * shape[1]);
            }
            (e.name.clone(), reel::Tensor::new(shape, data).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &reel::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    reel::io::write_f32(&bad.join("text_encoder/model.safetensors"), &refs).unwrap();
    assert!(Umt5Encoder::load(&bad).is_ok());
    let e = TextEncoder::load(&bad).err().unwrap().to_string();
    assert!(e.contains("145 tokens") && e.contains("100 rows"), "{e}");

    // Token ids outside the vocabulary are an error naming the id.
    let enc = Umt5Encoder::load(&data("umt5_a")).unwrap();
    let e = enc
        .forward(&[5, 999_999], &[1, 1], 1, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("999999"), "{e}");
}

/// umT5 on the device REEL_TEST_DEVICE names (emu by default) against transformers' float64
/// output, through `reel component text-encoder --device`: f16 matrices and GEMM inputs,
/// the f32 residual stream, the biased flash kernel. The bound is 2e-2; f16
/// measures 3.2e-3 and 4.7e-3, so 1e-2 here catches a slide towards bf16's 2e-2..3e-2.
/// bf16 storage (selectable) runs too and stays within 6e-2.
#[test]
fn device_text_encoder_matches_transformers() {
    let dev = crate::kernels::dev();
    for case in ["umt5_a", "umt5_b"] {
        let dir = data(case);
        let out_path = scratch(&format!("te-dev-{case}")).join("out.safetensors");
        reel::cli::component_on(
            reel::cli::ComponentKind::TextEncoder,
            Some(&dev),
            &dir,
            &dir.join("input.safetensors"),
            &out_path,
            1,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let got = TensorFile::open(&out_path)
            .unwrap()
            .tensor("last_hidden_state")
            .unwrap();
        let refs = TensorFile::open(&dir.join("output.safetensors")).unwrap();
        let (shape, want) = refs.tensor_f64("last_hidden_state").unwrap();
        assert_eq!(got.shape(), &shape[..]);
        let err = rel_l2(got.data(), &want);
        eprintln!("{case} on {}: rel L2 = {err:.3e}", dev.describe());
        assert!(err <= 1e-2, "{case}: relative L2 {err:.3e}");
        // bf16 storage through the library.
        let enc = Umt5Encoder::load(&dir).unwrap();
        let input = TensorFile::open(&dir.join("input.safetensors")).unwrap();
        let (shape, ids) = input.tensor_i64("input_ids").unwrap();
        let (_, mask) = input.tensor_i64("attention_mask").unwrap();
        let w = enc.upload(&dev, reel::gpu::WDtype::Bf16).unwrap();
        let got = enc
            .forward_on(&dev, &w, &ids, &mask, shape[0], shape[1])
            .unwrap();
        let err = rel_l2(got.data(), &want);
        eprintln!(
            "{case} on {}, bf16 storage: rel L2 = {err:.3e}",
            dev.describe()
        );
        assert!(err <= 6e-2, "{case} bf16: relative L2 {err:.3e}");
    }
}
