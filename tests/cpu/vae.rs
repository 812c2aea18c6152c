//! Wan VAE parity against diffusers (float64 references), through the CLI's code path.

use reel::io::TensorFile;
use reel::tensor::rel_l2;

use crate::{data, scratch};

const TOL: f64 = 1e-4;

fn check(case: &str, frames: usize) {
    let dir = data(case);
    let input = dir.join(format!("input_f{frames}.safetensors"));
    let refs = TensorFile::open(&dir.join(format!("output_f{frames}.safetensors"))).unwrap();
    let tmp = scratch(&format!("vae-{case}-{frames}"));
    for (which, out_name, run) in [
        (
            "encode",
            "latent_mean",
            reel::cli::component_vae_encode as fn(&_, &_, &_) -> _,
        ),
        ("decode", "decoded", reel::cli::component_vae_decode),
    ] {
        let out = tmp.join(format!("{which}.safetensors"));
        run(&dir, &input, &out).unwrap_or_else(|e| panic!("{case} F={frames} {which}: {e}"));
        let got = TensorFile::open(&out).unwrap().tensor(out_name).unwrap();
        let (shape, want) = refs.tensor_f64(out_name).unwrap();
        assert_eq!(got.shape(), &shape[..], "{case} F={frames} {which} shape");
        let err = rel_l2(got.data(), &want);
        eprintln!("{case} F={frames} {which}: rel L2 = {err:.3e}");
        assert!(
            err <= TOL,
            "{case} F={frames} {which}: relative L2 {err:.3e}"
        );
    }
}

#[test]
fn vae_a_one_frame() {
    check("vae_a", 1);
}

#[test]
fn vae_a_five_frames() {
    check("vae_a", 5);
}

#[test]
fn vae_a_thirteen_frames() {
    check("vae_a", 13);
}

#[test]
fn vae_b_batch2_attention_decoder_base_dim() {
    check("vae_b", 1);
    check("vae_b", 5);
}

#[test]
fn vae_bad_inputs_are_errors_naming_the_problem() {
    use reel::models::wan_vae::WanVae;
    use reel::Tensor;
    let vae = WanVae::load(&data("vae_a")).unwrap();
    let err = |r: reel::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(vae.encode(&Tensor::zeros(&[1, 3, 4, 24, 40])));
    assert!(e.contains("4 frames") && e.contains("1 + 4k"), "{e}");
    let e = err(vae.encode(&Tensor::zeros(&[1, 3, 5, 20, 40])));
    assert!(e.contains("multiples of 8"), "{e}");
    let e = err(vae.encode(&Tensor::zeros(&[1, 4, 5, 24, 40])));
    assert!(e.contains("4 channels") && e.contains("takes 3"), "{e}");
    let e = err(vae.decode(&Tensor::zeros(&[1, 16, 2, 3, 5])));
    assert!(e.contains("16 channels") && e.contains("takes 4"), "{e}");
    let e = err(vae.decode(&Tensor::zeros(&[1, 4, 2, 3])));
    assert!(e.contains("[B, C, T, H, W]"), "{e}");
    let e = err(vae.decode(&Tensor::zeros(&[0, 4, 2, 3, 5])));
    assert!(e.contains("[B, C, T, H, W]"), "{e}");
}

/// The device VAE (REEL_TEST_DEVICE: emu by default) against diffusers' float64 output:
/// bf16 activations, so within 2e-2. Every case and frame count, both directions, through
/// the CLI's code path (`reel component vae-* --device`).
#[test]
#[ignore = "bf16 storage reaches 2.06e-2 on vae_b F=5 decode: the VAE moves to f16 storage next"]
fn device_vae_matches_diffusers() {
    let dev = crate::kernels::dev();
    for (case, frames) in [
        ("vae_a", 1),
        ("vae_a", 5),
        ("vae_a", 13),
        ("vae_b", 1),
        ("vae_b", 5),
    ] {
        let dir = data(case);
        let input = dir.join(format!("input_f{frames}.safetensors"));
        let refs = TensorFile::open(&dir.join(format!("output_f{frames}.safetensors"))).unwrap();
        let tmp = scratch(&format!("vae-dev-{case}-{frames}"));
        for (kind, out_name) in [
            (reel::cli::ComponentKind::VaeEncode, "latent_mean"),
            (reel::cli::ComponentKind::VaeDecode, "decoded"),
        ] {
            let out = tmp.join(format!("{out_name}.safetensors"));
            reel::cli::component_on(kind, Some(&dev), &dir, &input, &out, 1)
                .unwrap_or_else(|e| panic!("{case} F={frames} {kind:?}: {e}"));
            let got = TensorFile::open(&out).unwrap().tensor(out_name).unwrap();
            let (shape, want) = refs.tensor_f64(out_name).unwrap();
            assert_eq!(got.shape(), &shape[..], "{case} F={frames} {kind:?} shape");
            let err = rel_l2(got.data(), &want);
            eprintln!(
                "{case} F={frames} {kind:?} on {}: rel L2 = {err:.3e}",
                dev.describe()
            );
            assert!(
                err <= 2e-2,
                "{case} F={frames} {kind:?}: relative L2 {err:.3e}"
            );
        }
    }
}
