//! `reel plan`: the static memory plan of a generation, computed without a GPU.

use reel::plan::{plan, render, PlanArgs};

fn args(model: &str, size: &str, frames: usize) -> PlanArgs {
    PlanArgs {
        model: Some(model.into()),
        size: Some(size.into()),
        frames: Some(frames),
        device_memory_gib: Some(80.0),
        arch: None,
        causal: None,
    }
}

#[test]
fn a_minute_of_480p_fits_80_gb_for_the_1_3b_and_720p_for_the_14b() {
    let r = plan(&args("wan2.1-t2v-1.3b", "832x480", 961)).unwrap();
    assert_eq!(r.tokens, 241 * 30 * 52);
    assert!(r.fits, "{}", render(&r));
    assert!(
        r.peak_bytes > 10 << 30,
        "a 376k-token step needs more than 10 GiB of activations"
    );
    let r = plan(&args("wan2.1-t2v-14b", "1280x720", 81)).unwrap();
    assert_eq!(r.tokens, 21 * 45 * 80);
    assert!(r.fits, "{}", render(&r));
    assert!(
        r.dit_weights_bytes > 26 << 30,
        "14B parameters, mostly bf16"
    );
    // The same run on a 24 GiB card does not fit, and says so.
    let small = plan(&PlanArgs {
        device_memory_gib: Some(24.0),
        ..args("wan2.1-t2v-14b", "1280x720", 81)
    })
    .unwrap();
    assert!(!small.fits && render(&small).contains("does NOT fit"));
}

#[test]
fn plan_of_a_folder_matches_a_session_on_emu() {
    // The embedded demo model: what reel plan reports is what a DiT session allocates.
    let r = plan(&PlanArgs {
        model: None,
        size: None,
        frames: None,
        device_memory_gib: Some(1.0),
        arch: None,
        causal: None,
    })
    .unwrap();
    assert_eq!(
        (r.generated.as_str(), r.frames, r.tokens),
        ("64x64", 17, 80)
    );
    let dir = reel::models::embedded::ensure().unwrap();
    let dit = reel::models::wan_dit::WanDit::load(&dir).unwrap();
    let s = reel::models::wan_dit::gpu::DitSession::new(
        &reel::kernels::KernelDevice::Emu,
        &dit.config,
        reel::models::wan_dit::gpu::DitShape {
            batch: 2,
            frames: 5,
            height: 8,
            width: 8,
            text_len: 512,
        },
    )
    .unwrap();
    assert_eq!(
        s.allocated_bytes(),
        r.dit_arena_bytes + r.dit_persistent_bytes
    );
}

#[test]
fn plan_rejects_bad_arguments_naming_the_flag() {
    let e = plan(&args("wan2.1-t2v-1.3b", "832x480", 80))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--frames 80"), "{e}");
    let e = plan(&args("wan2.1-t2v-1.3b", "832", 81))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--size"), "{e}");
    let e = plan(&PlanArgs {
        arch: Some("sm_70".into()),
        ..args("wan2.1-t2v-1.3b", "832x480", 81)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--arch sm_70"), "{e}");
    let e = plan(&args("/no/such/model", "832x480", 81))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/no/such/model"), "{e}");
}

/// Block-causal streaming of the 1.3B at 480p with LongLive's config (`reel plan --causal
/// longlive`): one chunk of 3 latent frames planned, the K/V cache of 12 frames in every
/// block exactly, and the same plan for 10 s and 60 s.
#[test]
fn streaming_plan_of_the_1_3b_is_flat_in_length() {
    let at = |seconds: usize| {
        let mut a = args("wan2.1-t2v-1.3b", "832x480", 16 * seconds + 1);
        a.causal = Some(reel::convert::CausalPreset::Longlive.config());
        plan(&a).unwrap()
    };
    let (ten, sixty) = (at(10), at(60));
    let st = ten.streaming.clone().expect("a streaming plan");
    // 30 blocks × K and V × 12 frames × 30·52 tokens × 1536 × 2 bytes.
    assert_eq!(st.kv_cache_bytes, 30 * 2 * 12 * 1560 * 1536 * 2);
    assert_eq!(
        (ten.tokens, ten.batch, ten.latent),
        (3 * 1560, 1, [41, 60, 104])
    );
    assert_eq!(sixty.latent[0], 241);
    assert_eq!(ten.peak_bytes, sixty.peak_bytes);
    assert_eq!(ten.dit_persistent_bytes, sixty.dit_persistent_bytes);
    assert!(ten.fits, "{}", render(&ten));
    assert!(render(&sixty).contains("block-causal"));
}
