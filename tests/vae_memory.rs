//! Streaming decode and whole generations: peak memory must not grow with the number of
//! frames beyond what the latent sequence itself takes. A test binary of its own, because it
//! counts every allocation of the process with a global allocator (and its tests take turns:
//! the counters are the process's).

#[path = "cpu/causal_demo.rs"]
mod causal_demo;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use reel::cpu::conv::Frames;
use reel::models::wan_vae::{FrameSink, WanVae};
use reel::Tensor;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(n: usize) {
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call forwards to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CURRENT.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            grow(new - l.size());
        } else {
            CURRENT.fetch_sub(l.size() - new, Relaxed);
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One measuring test at a time.
static TURN: Mutex<()> = Mutex::new(());

/// Keeps nothing but a frame count and a checksum, as a video writer streaming to disk
/// keeps nothing of the frames it has written.
/// With `keep`, the caller keeps every frame instead (as an in-memory consumer would).
struct Discard {
    frames: usize,
    sum: f64,
    keep: bool,
    kept: Vec<Frames>,
}

impl FrameSink for Discard {
    fn push(&mut self, _b: usize, f: &Frames) -> reel::Result<()> {
        self.frames += f.t;
        if self.keep {
            self.kept.push(f.clone());
        }
        self.sum += f.data.iter().map(|&v| v as f64).sum::<f64>();
        Ok(())
    }
}

fn latents(t: usize) -> Tensor {
    let mut rng = reel::models::random::Normal::new(t as u64);
    let n = 4 * t * 3 * 5;
    Tensor::new(vec![1, 4, t, 3, 5], (0..n).map(|_| rng.sample()).collect()).unwrap()
}

/// Peak bytes allocated above the level at the start of the decode.
fn peak_of_decode(vae: &WanVae, z: &Tensor, keep: bool) -> (usize, usize) {
    let mut sink = Discard {
        frames: 0,
        sum: 0.0,
        keep,
        kept: Vec::with_capacity(64), // the same bookkeeping whatever the length
    };
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    vae.decode_to(z, &mut sink).unwrap();
    assert!(sink.sum.is_finite());
    (PEAK.load(Relaxed) - base, sink.frames)
}

#[test]
fn vae_streaming_decode_memory_does_not_grow_with_frames() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/vae_a");
    let vae = WanVae::load(&dir).unwrap();
    let (z2, z16) = (latents(2), latents(16));
    peak_of_decode(&vae, &z2, false); // warm up: the thread pool and first-use allocations
    let (p2, f2) = peak_of_decode(&vae, &z2, false);
    let (p16, f16) = peak_of_decode(&vae, &z16, false);
    assert_eq!((f2, f16), (5, 61));
    let extra_output = (f16 - f2) * 3 * 24 * 40 * 4;
    eprintln!("peak above baseline, frames discarded: {p2} B for 2 latent frames, {p16} B for 16");
    // A streaming caller keeps nothing: the peak must not grow at all (the caches hold
    // their full CACHE_T frames from the first chunk on, and latents are read a frame at
    // a time).
    assert!(
        p16 <= p2,
        "peak grew from {p2} to {p16} B with 14 more latent frames"
    );

    // A caller that keeps every frame: the peak grows by what it keeps, no more.
    let (k2, _) = peak_of_decode(&vae, &z2, true);
    let (k16, _) = peak_of_decode(&vae, &z16, true);
    eprintln!("frames kept: {k2} B and {k16} B; the extra output kept is {extra_output} B");
    assert!(
        k16 - k2.min(k16) <= extra_output,
        "peak grew by {} B, more than the {extra_output} B of extra output kept",
        k16 - k2.min(k16)
    );
}

/// Runs `reel generate` (in process) on the embedded demo model and returns the peak bytes
/// allocated above the level at its start, and the sidecar.
fn peak_of_generation(frames: usize, out: &std::path::Path) -> (usize, reel::generate::Sidecar) {
    let args = reel::generate::GenerateArgs {
        prompt: Some("a red circle moving right".into()),
        frames: Some(frames),
        steps: Some(2),
        count: 1,
        fps: 16,
        quiet: true,
        output: out.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let mut side = reel::generate::generate(&args).unwrap();
    (PEAK.load(Relaxed) - base, side.remove(0))
}

/// The peak of the decode alone of `frames` frames of (arbitrary) latents through the
/// pipeline's de-normalisation and streaming VAE decoder, above the level at its start.
fn peak_of_decode_phase(pipe: &reel::pipeline::Pipeline, frames: usize) -> usize {
    let shape = pipe.latent_shape(1, frames, 64, 64);
    let n = shape.iter().product();
    let mut rng = reel::models::random::Normal::new(frames as u64);
    let z = Tensor::new(shape.to_vec(), (0..n).map(|_| rng.sample()).collect()).unwrap();
    let mut sink = Discard {
        frames: 0,
        sum: 0.0,
        keep: false,
        kept: Vec::new(),
    };
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    pipe.decode_to(&z, &mut sink).unwrap();
    assert_eq!(sink.frames, frames);
    PEAK.load(Relaxed) - base
}

/// A 60-second video (961 frames) of the embedded demo model end to end on the cpu: the
/// text encoder, the DiT over all 241 latent frames, the streaming decode into a .y4m. What
/// grows with length is the latent sequence the DiT works on (a fixed number of token-wide
/// rows of activations; the latents themselves); the decode holds the same whatever the
/// length, and the decoded video (47 MB of f32 frames here) is never held.
#[test]
fn a_961_frame_generation_holds_memory_flat_in_length() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("reel-mem-961-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    peak_of_generation(5, &dir.join("warm.y4m")); // the thread pool, the model's first load
    let (p_short, s_short) = peak_of_generation(161, &dir.join("short.y4m"));
    let (p_long, s_long) = peak_of_generation(961, &dir.join("long.y4m"));
    assert_eq!((s_short.frames, s_long.frames), (161, 961));
    let (w, h) = (64usize, 64usize);
    assert_eq!(s_long.size, format!("{w}x{h}"));
    // The file holds every frame: a y4m header, then per frame "FRAME\n" and 4:4:4 planes.
    let file = std::fs::metadata(dir.join("long.y4m")).unwrap().len() as usize;
    let frame_bytes = "FRAME\n".len() + w * h * 3;
    assert!(
        file > 961 * frame_bytes && file < 961 * frame_bytes + 256,
        "{file} bytes for 961 frames of {frame_bytes}"
    );
    // Latent tokens after the 2x2 patch: (T/4 + 1) frames of (h/16)·(w/16).
    let tokens = |f: usize| ((f - 1) / 4 + 1) * (h / 16) * (w / 16);
    let token_growth = tokens(961) - tokens(161);
    // The demo DiT: width 128, FFN 384, two guidance passes. A per-token budget of 16 rows of
    // the model width and 4 of the FFN's, f32, for each pass (measured: about 12 KB a token
    // for both passes together).
    let per_token = 2 * (16 * 128 + 4 * 384) * 4;
    let decoded_growth = (961 - 161) * w * h * 3 * 4;
    eprintln!(
        "generation peak above baseline: {p_short} B at 161 frames, {p_long} B at 961; \
         {token_growth} more latent tokens (budget {} B); the extra decoded video is {decoded_growth} B",
        token_growth * per_token
    );
    let growth = p_long.saturating_sub(p_short);
    assert!(
        growth <= token_growth * per_token,
        "the peak grew by {growth} B, more than the latent sequence's {} B",
        token_growth * per_token
    );
    // The decode phase alone: flat (a little slack for the thread pool's bookkeeping).
    let root = reel::models::embedded::ensure().unwrap();
    let pipe = reel::pipeline::Pipeline::load(&root).unwrap();
    peak_of_decode_phase(&pipe, 5);
    let (d_short, d_long) = (
        peak_of_decode_phase(&pipe, 161),
        peak_of_decode_phase(&pipe, 961),
    );
    // What may grow: the de-normalised copy of the latents (z_dim f32 per latent pixel).
    let latent_growth = (tokens(961) - tokens(161)) * 4 * pipe.vae.config.z_dim * 4;
    eprintln!(
        "decode peak above baseline: {d_short} B at 161 frames, {d_long} B at 961 \
         (the latents grew by {latent_growth} B)"
    );
    assert!(
        d_long <= d_short + latent_growth + (64 << 10),
        "the decode's peak grew from {d_short} to {d_long} B with 800 more frames"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Block-causal streaming (`reel generate --stream`) holds the same memory for a minute as
/// for ten seconds: the K/V cache keeps a fixed window of frames, each chunk's activations
/// are those of a few latent frames, the decoder's caches are fixed and the frames go
/// straight to the file. Nothing grows with the length, so the peak may not either (a
/// little slack for the thread pool's bookkeeping).
#[test]
fn block_causal_streaming_holds_memory_flat_in_length() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("reel-mem-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = causal_demo::causal_demo(&dir);
    let run = |seconds: usize, name: &str| {
        let args = reel::generate::GenerateArgs {
            model: Some(root.display().to_string()),
            prompt: Some("a red circle moving right".into()),
            size: Some("64x64".into()),
            frames: Some(16 * seconds + 1),
            count: 1,
            fps: 16,
            quiet: true,
            stream: true,
            output: dir.join(name).to_string_lossy().into_owned(),
            ..Default::default()
        };
        let base = CURRENT.load(Relaxed);
        PEAK.store(base, Relaxed);
        let mut side = reel::generate::generate(&args).unwrap();
        (PEAK.load(Relaxed) - base, side.remove(0))
    };
    run(1, "warm.y4m"); // the thread pool, first-use allocations
    let (p10, s10) = run(10, "ten.y4m");
    let (p60, s60) = run(60, "sixty.y4m");
    assert_eq!((s10.frames, s60.frames), (161, 961));
    let file = std::fs::metadata(dir.join("sixty.y4m")).unwrap().len() as usize;
    assert!(file > 961 * 64 * 64 * 3, "{file} bytes for 961 frames");
    eprintln!("streaming peak above baseline: {p10} B for 10 s, {p60} B for 60 s");
    assert!(
        p60 <= p10 + (64 << 10),
        "the peak grew from {p10} B to {p60} B between 10 and 60 seconds"
    );
    std::fs::remove_dir_all(&dir).ok();
}
