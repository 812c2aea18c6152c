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
