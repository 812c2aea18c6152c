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
