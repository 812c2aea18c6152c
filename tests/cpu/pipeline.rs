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

/// On a kernel device the pipeline does what the plan decided: with room, the text encoder
/// stays on the device beside the DiT and the VAE; on a budget that only the freed plan
/// fits, the text encoder is freed before the DiT's and the VAE's weights go up (and up
/// again for the next video's prompts). Either way the video is the same and the device
/// memory the pipeline held stays within that plan's peak.
#[test]
fn device_pipeline_frees_the_text_encoder_when_the_plan_says_so() {
    use reel::plan::{plan, PlanArgs};
    let dev = crate::kernels::dev();
    let root = reel::models::embedded::ensure().unwrap();
    let (size, frames) = ("32x32", 5);
    let plan_at = |gib: Option<f64>| {
        plan(&PlanArgs {
            model: Some(root.display().to_string()),
            size: Some(size.into()),
            frames: Some(frames),
            device_memory_gib: gib,
            arch: None,
            causal: None,
        })
        .unwrap()
    };
    let roomy = plan_at(Some(80.0));
    assert!(roomy.fits && roomy.text_encoder_resident, "{roomy:?}");
    // One byte: nothing fits, and the peak reported is the freed plan's.
    let freed_peak = plan_at(Some(1.0 / (1u64 << 30) as f64)).peak_bytes;
    let tight = plan_at(Some(freed_peak as f64 / (1u64 << 30) as f64));
    assert!(tight.fits && !tight.text_encoder_resident, "{tight:?}");
    assert!(roomy.peak_bytes > tight.peak_bytes);

    let run = |resident: bool| {
        let mut pipe = Pipeline::load(&root).unwrap();
        pipe.to_device(dev.clone(), resident).unwrap();
        let memory = pipe.device_memory().unwrap().clone();
        memory.reset_peak();
        let mut video = Vec::new();
        // Two videos, so that the freed text encoder goes up a second time.
        for prompt in ["a red circle moving right", "a blue square moving up"] {
            let cond = pipe.encode_prompts(&[prompt], &[""], 4.0, 512).unwrap();
            let shape = pipe.latent_shape(1, frames, 32, 32);
            let noise = reel::Tensor::new(
                shape.to_vec(),
                reel::rng::gaussian(3, shape.iter().product()),
            )
            .unwrap();
            let mut sampler = build(&pipe.scheduler, SamplerKind::Unipc, 2, None).unwrap();
            let latents = pipe
                .denoise(noise, &cond, 4.0, sampler.as_mut(), &mut |_, _| Ok(()))
                .unwrap();
            let mut sink = CollectSink::new(1);
            pipe.decode_to(&latents, &mut sink).unwrap();
            video.extend_from_slice(sink.into_tensor().unwrap().data());
        }
        (video, memory.peak(), pipe.text_resident())
    };
    let (v_resident, held_resident, r) = run(true);
    assert_eq!(r, Some(true));
    let (v_freed, held_freed, r) = run(false);
    assert_eq!(r, Some(false));
    eprintln!(
        "resident: held {held_resident} B (plan {}); freed: held {held_freed} B (plan {})",
        roomy.peak_bytes, tight.peak_bytes
    );
    assert!(held_resident <= roomy.peak_bytes, "resident");
    assert!(held_freed <= tight.peak_bytes, "freed");
    assert!(held_freed < held_resident);
    assert_eq!(v_resident, v_freed, "the same video either way");
}
