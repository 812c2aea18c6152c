//! Streaming decode: peak memory must not grow with the number of frames. A test binary of
//! its own, because it counts every allocation of the process with a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

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
