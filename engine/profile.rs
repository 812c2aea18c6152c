//! Per-op timers for `reel bench --profile`: wall time, calls and counted FLOPs per op
//! class, accumulated process-wide. Off by default; when off, ops pay one relaxed atomic
//! load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// The classes the bench reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gemm = 0,
    Attention = 1,
    /// Norms, RoPE, activations, residuals, modulation.
    Elementwise = 2,
    VaeConv = 3,
}

pub const OPS: [(Op, &str); 4] = [
    (Op::Gemm, "gemm"),
    (Op::Attention, "attention"),
    (Op::Elementwise, "norm/rope/elementwise"),
    (Op::VaeConv, "vae_conv"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static CALLS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static FLOPS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Labelled calls ([`labelled`]): label → (nanoseconds, calls, flops).
static LABELS: Mutex<BTreeMap<String, (u64, u64, u64)>> = Mutex::new(BTreeMap::new());

/// Turns the timers on or off and clears them.
pub fn enable(on: bool) {
    for i in 0..4 {
        NANOS[i].store(0, Relaxed);
        CALLS[i].store(0, Relaxed);
        FLOPS[i].store(0, Relaxed);
    }
    labels_lock().clear();
    ENABLED.store(on, Relaxed);
}

/// Stops counting and keeps what was counted (for reading after a timed run).
pub fn pause() {
    ENABLED.store(false, Relaxed);
}

/// Whether the timers are on.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Records one call of `op` that took `seconds` (measured elsewhere: CUDA events).
pub fn record(op: Op, seconds: f64, flops: u64) {
    if enabled() {
        let i = op as usize;
        NANOS[i].fetch_add((seconds * 1e9) as u64, Relaxed);
        CALLS[i].fetch_add(1, Relaxed);
        FLOPS[i].fetch_add(flops, Relaxed);
    }
}

/// A running timer; records when dropped.
pub struct Timer {
    op: Op,
    flops: u64,
    start: Option<Instant>,
    label: Option<String>,
}

fn labels_lock() -> std::sync::MutexGuard<'static, BTreeMap<String, (u64, u64, u64)>> {
    // A panic while holding the lock leaves plain counters: still usable.
    LABELS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts timing one call of `op` that does `flops` floating-point operations.
pub fn time(op: Op, flops: u64) -> Timer {
    Timer {
        op,
        flops,
        start: ENABLED.load(Relaxed).then(Instant::now),
        label: None,
    }
}

/// [`time`], also accounted under the label `label()` makes (called only when the timers
/// are on), for a per-layer breakdown: e.g. each VAE convolution by its shape.
pub fn labelled(op: Op, flops: u64, label: impl FnOnce() -> String) -> Timer {
    let on = ENABLED.load(Relaxed);
    Timer {
        op,
        flops,
        start: on.then(Instant::now),
        label: on.then(label),
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let i = self.op as usize;
            NANOS[i].fetch_add(s.elapsed().as_nanos() as u64, Relaxed);
            CALLS[i].fetch_add(1, Relaxed);
            FLOPS[i].fetch_add(self.flops, Relaxed);
            if let Some(label) = self.label.take() {
                let mut labels = labels_lock();
                let e = labels.entry(label).or_default();
                e.0 += s.elapsed().as_nanos() as u64;
                e.1 += 1;
                e.2 += self.flops;
            }
        }
    }
}

/// (label, calls, seconds, flops) of every labelled call, slowest first.
pub fn labels() -> Vec<(String, u64, f64, u64)> {
    let mut v: Vec<_> = labels_lock()
        .iter()
        .map(|(k, &(ns, calls, flops))| (k.clone(), calls, ns as f64 * 1e-9, flops))
        .collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

/// (name, calls, seconds, flops) per op class.
pub fn snapshot() -> Vec<(&'static str, u64, f64, u64)> {
    OPS.iter()
        .map(|&(op, name)| {
            let i = op as usize;
            (
                name,
                CALLS[i].load(Relaxed),
                NANOS[i].load(Relaxed) as f64 * 1e-9,
                FLOPS[i].load(Relaxed),
            )
        })
        .collect()
}
