//! The whole pipeline against diffusers' WanPipeline (float32), both samplers.

use reel::io::TensorFile;
use reel::models::wan_vae::CollectSink;
use reel::pipeline::{Conditioning, Pipeline};
use reel::sampler::{build, SamplerKind};
use reel::tensor::rel_l2;

use crate::data;

const TOL: f64 = 1e-3;

fn check(kind: SamplerKind) {
    let dir = data("pipeline_tiny");
    let pipe = Pipeline::load(&dir).unwrap();
    let inputs = TensorFile::open(&dir.join("inputs.safetensors")).unwrap();
    let refs = TensorFile::open(&dir.join(format!("output_{}.safetensors", kind.name()))).unwrap();
    let mut sampler = build(&pipe.scheduler, kind, 6, Some(3.0)).unwrap();

    // The schedule itself: timesteps the DiT receives and the sigmas.
    let (_, ts) = refs.tensor_f64("timesteps").unwrap();
    let (_, sig) = refs.tensor_f64("sigmas").unwrap();
    for (a, b) in sampler.timesteps().iter().zip(&ts) {
        assert!(
            (*a as f64 - b).abs() <= 1e-3 * b.abs().max(1.0),
            "{}: timestep {a} vs {b}",
            kind.name()
        );
    }
    for (a, b) in sampler.sigmas().iter().zip(&sig) {
        assert_eq!(*a as f64, *b, "{}: sigma", kind.name());
    }

    let cond = Conditioning {
        prompt_embeds: inputs.tensor("prompt_embeds").unwrap(),
        negative_prompt_embeds: Some(inputs.tensor("negative_prompt_embeds").unwrap()),
    };
    let latents = pipe
        .denoise(
            inputs.tensor("latents").unwrap(),
            &cond,
            5.0,
            sampler.as_mut(),
            &mut |_, _| Ok(()),
        )
        .unwrap();
    let (shape, want) = refs.tensor_f64("latents").unwrap();
    assert_eq!(latents.shape(), &shape[..]);
    let err = rel_l2(latents.data(), &want);
    eprintln!("pipeline {}: latents rel L2 = {err:.3e}", kind.name());
    assert!(err <= TOL, "{}: latents {err:.3e}", kind.name());

    // Video: [B, F, 3, H, W] in [0, 1] as output_type "pt".
    let mut sink = CollectSink::new(latents.shape()[0]);
    pipe.decode_to(&latents, &mut sink).unwrap();
    let video = sink.into_tensor().unwrap(); // [B, 3, F, H, W] in [-1, 1]
    let s = video.shape().to_vec();
    let (b, c, f, hw) = (s[0], s[1], s[2], s[3] * s[4]);
    let mut pt = vec![0.0f32; video.numel()];
    for bi in 0..b {
        for ci in 0..c {
            for fi in 0..f {
                for p in 0..hw {
                    let v = video.data()[((bi * c + ci) * f + fi) * hw + p];
                    pt[((bi * f + fi) * c + ci) * hw + p] = (v * 0.5 + 0.5).clamp(0.0, 1.0);
                }
            }
        }
    }
    let (vshape, vwant) = refs.tensor_f64("video").unwrap();
    assert_eq!(vshape, vec![b, f, c, s[3], s[4]]);
    let err = rel_l2(&pt, &vwant);
    eprintln!("pipeline {}: video rel L2 = {err:.3e}", kind.name());
    assert!(err <= TOL, "{}: video {err:.3e}", kind.name());
}

#[test]
fn pipeline_unipc_matches_diffusers() {
    check(SamplerKind::Unipc);
}

#[test]
fn pipeline_euler_matches_diffusers() {
    check(SamplerKind::Euler);
}
